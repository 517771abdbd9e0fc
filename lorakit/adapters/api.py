"""The public API on a model: apply, merge, unmerge, disabled, summary, hooks and optimizer groups."""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from lorakit.adapters.quantize import dtype_name, quantize_targets, release_input_grads
from lorakit.adapters.targets import TargetError as TargetError  # re-exported: part of the public API
from lorakit.adapters.targets import find_targets as find_targets
from lorakit.adapters.targets import set_module, warn_left_out
from lorakit.common.errors import AdapterStateError, SettingError
from lorakit.core.config import ConfigError, VariantConfig
from lorakit.core.contract import CapabilityError, Driver, Shared
from lorakit.core.kinds import kind_of
from lorakit.core.layer import AdaptedLayer
from lorakit.core.quantized import QuantizedBase
from lorakit.core.variant import Hook
from lorakit.variants import get_variant


@dataclass
class AdapterInfo:
    """What :func:`apply` did to a model; kept on the model as ``model.lorakit``."""

    variant: str
    config: VariantConfig
    targets: list[str]
    train_modules: list[str]
    fingerprint: str
    base_model: str | None
    # a few values of each targeted base tensor (None: not floating): recognises the base in another dtype
    base_sample: list[list[float] | None] = field(default_factory=list, repr=False)
    # the dtypes the fingerprint and the sample were taken in (a model cast later is still this base)
    base_dtypes: list[str] = field(default_factory=list)
    shared: Shared = field(default_factory=Shared)
    # requires_grad of every parameter before apply froze the model, so undoing apply restores it
    trainable_before: dict[str, bool] = field(default_factory=dict, repr=False)


_Call = TypeVar("_Call", bound=Callable[..., Any])


_DATA_PARALLEL = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` or data-parallel wrapper holds (else ``model`` itself): the wrapper runs
    that module's forward, but names every submodule ``_orig_mod.<name>`` or ``module.<name>``, which no
    adapter file or config of the bare model names."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, _DATA_PARALLEL):
            model = model.module
        else:
            return model


def takes_compiled(fn: _Call) -> _Call:
    """Let a public function take a compiled or data-parallel model: it works on the module inside, and where
    it returns the model it returns what it was given (so a compiled model stays compiled)."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        root = unwrap(model)
        out = fn(root, *args, **kwargs)
        return model if out is root else out

    return wrapper  # type: ignore[return-value]


@takes_compiled
def apply(
    model: nn.Module,
    variant: str | VariantConfig = "lora",
    *,
    targets: str | list[str] | None = None,
    train_modules: list[str] | None = None,
    **config: Any,
) -> nn.Module:
    """Freeze ``model`` and wrap its target layers with ``variant``'s adapter, in place; returns ``model``.

    ``variant`` is a registered name (``lorakit.VARIANTS``) or a config object. ``targets`` are module-name
    suffixes (``["query", "value"]``), a regex fully matching module names, or ``"all-linear"``.
    ``train_modules`` (suffixes) stay fully trainable and are saved with the adapter, e.g. a new head.
    Remaining keyword arguments are the variant's config fields (``rank=8, alpha=16, dropout=0.05``...).
    """
    return _apply(model, variant, targets, train_modules, config, saved=False)


@takes_compiled
def apply_saved(
    model: nn.Module,
    variant: str | VariantConfig,
    *,
    targets: str | list[str] | None = None,
    train_modules: list[str] | None = None,
    **config: Any,
) -> nn.Module:
    """:func:`apply` for an adapter that a file defines (:func:`lorakit.load`, ``load_peft``). Its ranks are
    the file's: a rank above what a layer can use, which PEFT writes (it adds parameters, not capacity), is
    taken as it is instead of refused."""
    return _apply(model, variant, targets, train_modules, config, saved=True)


def _apply(
    model: nn.Module,
    variant: str | VariantConfig,
    targets: str | list[str] | None,
    train_modules: list[str] | None,
    config: dict[str, Any],
    *,
    saved: bool,
) -> nn.Module:
    check_base_model(model)
    cfg = _resolve_config(variant, targets, train_modules, config)
    variant_class = get_variant(_variant_name(variant))
    names = find_targets(model, cfg.targets, variant_class.kinds)
    modules = dict(model.named_modules())
    kinds = {n: kind_of(modules[n]) for n in names}
    shapes = {n: kinds[n].shape_2d(modules[n]) for n in names}
    if cfg.targets == "all-linear":
        names = leave_out_narrow(cfg, shapes)
    if not saved:
        check_rank(cfg, {n: shapes[n] for n in names})
    check_materialised(modules, names)
    warn_undropped(cfg, [n for n in names if kinds[n].takes_ids])
    train_modules = _match_train_modules(model, cfg.train_modules)  # refused before the model changes
    check_disjoint(names, train_modules)
    trainable_before = {n: p.requires_grad for n, p in model.named_parameters()}  # before any quantising
    storage = cfg.base_storage()
    if storage is not None:
        # A variant trained on a quantised base (QLoRA): store the targets in 4 bits before wrapping them,
        # so the fingerprint below covers the quantised weights the adapter will run on.
        quantize_targets(model, names, storage)
    modules = dict(model.named_modules())
    info = AdapterInfo(
        variant=variant_class.name,
        config=cfg,
        targets=names,
        train_modules=train_modules,
        fingerprint=fingerprint(modules[n] for n in names),
        base_sample=base_sample(modules[n] for n in names),
        base_dtypes=base_dtypes(modules[n] for n in names),
        base_model=_base_model_name(model),
        trainable_before=trainable_before,
    )
    info.shared = variant_class.shared_class(targets={n: shapes[n] for n in names})
    swapped: list[tuple[str, nn.Module]] = []
    try:
        model.requires_grad_(False)
        for name in names:
            base = modules[name]
            set_module(model, name, AdaptedLayer(base, kind_of(base), variant_class, cfg, info.shared, name))
            swapped.append((name, base))
    except BaseException:
        # A layer refused while being wrapped (a VeRA projection too small for it, say): the model is put
        # back as it was, every layer and every trainable flag.
        for name, layer in swapped:
            set_module(model, name, layer)
        for name, param in model.named_parameters():
            param.requires_grad_(trainable_before.get(name, param.requires_grad))
        raise
    for name in info.train_modules:
        modules[name].requires_grad_(True)
    model.lorakit = info
    return model


def check_materialised(modules: dict[str, nn.Module], names: list[str]) -> None:
    """Refuse target layers whose weights are not there yet (on the ``meta`` device): the adapter records a
    fingerprint of the base weights and initialises from their shape and dtype."""
    for name in names:
        if any(t.is_meta for t in itertools.chain(modules[name].parameters(), modules[name].buffers())):
            raise AdapterStateError(
                f"layer {name} is on the meta device (no weights yet): load the model's weights first "
                "(model.to_empty(device=...) then load_state_dict, or from_pretrained), then apply"
            )


def warn_undropped(cfg: VariantConfig, embeddings: list[str]) -> None:
    """Say that ``cfg.dropout`` leaves out the adapted embeddings: dropout acts on an adapter's float input,
    and an embedding's input is ids (as in PEFT), so the setting would otherwise read as if it applied."""
    if cfg.dropout > 0 and embeddings:
        more = f" and {len(embeddings) - 1} more" if len(embeddings) > 1 else ""
        warnings.warn(
            f"dropout {cfg.dropout} acts on an adapter's float input; the embedding {embeddings[0]}{more} "
            "takes ids, so its adapter trains without dropout",
            UserWarning,
            stacklevel=4,
        )


def check_base_model(model: nn.Module) -> None:
    """Refuse what :func:`apply` cannot wrap: a non-module, or a model that already holds adapters (lorakit's,
    also in a submodule or after ``model.lorakit`` was removed, or PEFT's), which would be wrapped twice."""
    if not isinstance(model, nn.Module):
        raise SettingError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "lorakit", None) is not None:
        raise AdapterStateError(
            "model already has a lorakit adapter; apply to a fresh base model, or lorakit.merge(model) first"
        )
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            raise AdapterStateError(
                f"{name or 'the model'} already holds a lorakit adapter (an AdaptedLayer); call "
                "lorakit.merge(model) on the adapted model first, or start from a fresh base model"
            )
        # PEFT's adapter layers all derive from this class; matched by name so PEFT stays optional.
        if any(cls.__name__ == "BaseTunerLayer" for cls in type(module).__mro__):
            raise AdapterStateError(
                f"{name or 'the model'} holds a PEFT adapter layer; call model.merge_and_unload() (or "
                "model.unload()) first, or load the PEFT adapter with lorakit.load_peft on the base model"
            )


def check_disjoint(targets: list[str], train_modules: list[str]) -> None:
    """Refuse a module that is both adapted and trained in full (or contains, or lies inside, a target):
    the adapter would be trained on a base that moves, and saved twice under different names."""
    for module in train_modules:
        for target in targets:
            if module == target or target.startswith(module + ".") or module.startswith(target + "."):
                raise TargetError(
                    f"train_modules entry {module} overlaps the adapted layer {target}; a module is either "
                    "adapted (targets) or trained in full (train_modules): remove it from one of them"
                )


def _narrow(cfg: VariantConfig, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """The layers of ``shapes`` whose largest useful rank (:meth:`VariantConfig.max_rank`) is below
    ``cfg.rank``, with that rank."""
    limits = {name: cfg.max_rank(*shape) for name, shape in shapes.items()}
    return {name: limit for name, limit in limits.items() if limit is not None and cfg.rank > limit}


def leave_out_narrow(cfg: VariantConfig, shapes: dict[str, tuple[int, int]]) -> list[str]:
    """``all-linear``'s layers without those too narrow for the rank (a mixture of experts' ``(1, d)``
    shared-expert gate, a Mamba ``dt_proj``), named in a warning: the user asked for every linear layer,
    not for these, and refusing the model would leave only listing every other layer by hand."""
    narrow = _narrow(cfg, shapes)
    if not narrow or len(narrow) == len(shapes):  # none to leave out, or none left: check_rank says so
        return list(shapes)
    first = next(iter(narrow))
    out, into = shapes[first]
    warn_left_out(
        [f"{first} ({out} x {into})", *list(narrow)[1:]],
        f"rank {cfg.rank} is above what they can use (at most {narrow[first]}); name them in targets with a "
        "rank they can use to adapt them",
    )
    return [n for n in shapes if n not in narrow]


def check_rank(cfg: VariantConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse a rank above what a target layer can use (:meth:`VariantConfig.max_rank`), naming the layer."""
    for name, limit in _narrow(cfg, shapes).items():
        out_features, in_features = shapes[name]
        raise TargetError(
            f"rank {cfg.rank} is above what layer {name} ({out_features} x {in_features}) can use (at "
            f"most {limit}); choose rank <= {limit}, or leave that layer out of targets"
        )


def _variant_name(variant: str | VariantConfig) -> str:
    if isinstance(variant, str):
        return variant
    from lorakit.variants import VARIANTS

    for name, cls in VARIANTS.items():
        if cls.config_class is type(variant):
            return name
    raise ConfigError(
        f"variant must be a registered name ({', '.join(VARIANTS)}) or a variant's config object, "
        f"got {type(variant).__name__}"
    )


def _resolve_config(
    variant: str | VariantConfig,
    targets: str | list[str] | None,
    train_modules: list[str] | None,
    overrides: dict[str, Any],
) -> VariantConfig:
    if isinstance(variant, VariantConfig):
        values = variant.to_dict()
    else:
        values = {}
    values.update(overrides)
    if targets is not None:
        values["targets"] = targets
    if train_modules is not None:
        values["train_modules"] = train_modules
    name = _variant_name(variant)
    return get_variant(name).config_class.from_dict(values, name)


def _match_train_modules(model: nn.Module, suffixes: list[str]) -> list[str]:
    """The modules ``suffixes`` name, each with parameters to train."""
    found = []
    modules = [(n, m) for n, m in model.named_modules() if n]
    for suffix in suffixes:
        hits = [(n, m) for n, m in modules if n == suffix or n.endswith("." + suffix)]
        if not hits:
            leaves = sorted({n.split(".")[-1] for n, _ in modules})
            near = difflib.get_close_matches(suffix.split(".")[-1], leaves)
            hint = f"; did you mean {near}?" if near else ""
            raise TargetError(
                f"train_modules entry '{suffix}' matches no module{hint} (pass module-name suffixes, e.g. "
                "['classifier'])"
            )
        empty = [n for n, m in hits if next(m.parameters(), None) is None]
        if empty:
            raise TargetError(
                f"train_modules entry '{suffix}' names {empty[0]} ({type(dict(hits)[empty[0]]).__name__}), "
                "which has no parameters to train; name a module with weights, or drop the entry"
            )
        found += [n for n, _ in hits]
    return found


def _base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def fingerprint(layers: Iterator[nn.Module]) -> str:
    """SHA-256 over the targeted base weights, so an adapter is never loaded onto another base."""
    digest = hashlib.sha256()
    for layer in layers:
        for tensor in layer.state_dict().values():
            data = tensor.detach().cpu().contiguous()
            digest.update(str(tuple(data.shape)).encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def base_sample(layers: Iterator[nn.Module], per_tensor: int = 8) -> list[list[float] | None]:
    """``per_tensor`` values of every floating tensor of the targeted base layers, at fixed scattered
    positions (None for integer tensors such as packed 4-bit codes).

    The fingerprint is exact, so the same base loaded in another dtype (trained in float32, deployed in
    bfloat16) has another one; :func:`lorakit.load` then accepts it if these values agree to the rounding
    of the coarser dtype, which a different model's weights do not."""
    out: list[list[float] | None] = []
    for layer in layers:
        for tensor in layer.state_dict().values():
            flat = tensor.detach().reshape(-1)
            if not tensor.is_floating_point() or flat.numel() == 0:
                out.append(None)
                continue
            # Knuth's multiplicative hash spreads the positions over the whole tensor, rows and columns
            positions = torch.tensor([k * 2654435761 % flat.numel() for k in range(1, per_tensor + 1)])
            out.append(flat[positions.to(flat.device)].double().cpu().tolist())
    return out


QUANTIZED_DTYPE = "quantised from "  # how base_dtypes names a quantised weight


def base_dtypes(layers: Iterator[nn.Module]) -> list[str]:
    """The dtypes of the targeted base layers' floating tensors (``"float32"``...): a base loaded in another
    dtype has another fingerprint, and the load error says so instead of naming another model. A 4-bit weight
    is ``"quantised from DTYPE"``, its ``weight_dtype`` (its buffers' fp32 state says nothing)."""
    found: set[str] = set()
    for layer in layers:
        if isinstance(layer, QuantizedBase):
            found.add(f"{QUANTIZED_DTYPE}{dtype_name(layer.weight_dtype)}")
            tensors = list(layer.parameters())  # the bias
        else:
            tensors = list(layer.state_dict().values())
        found.update(dtype_name(t.dtype) for t in tensors if t.is_floating_point())
    return sorted(found)


# --- queries -------------------------------------------------------------------------------------------
@takes_compiled
def adapted_layers(model: nn.Module) -> list[tuple[str, AdaptedLayer]]:
    """``(name, layer)`` for every adapted layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]


@takes_compiled
def info(model: nn.Module) -> AdapterInfo:
    """The :class:`AdapterInfo` of an adapted model; a clear error for a plain one."""
    state = getattr(model, "lorakit", None)
    if state is None:
        raise AdapterStateError(
            "model has no lorakit adapter; call lorakit.apply(model, ...) or lorakit.load first"
        )
    return state


# --- merge / disable -----------------------------------------------------------------------------------
@takes_compiled
def merge(model: nn.Module, *, unload: bool = True) -> nn.Module:
    """Fold every adapter into its base weight.

    ``unload=True`` (default) returns the plain model: adapted layers become their base layers again and the
    adapter is gone. ``unload=False`` merges in place and keeps the adapters, so :func:`unmerge` can undo it.
    A layer that cannot be merged leaves every layer unmerged (to the rounding of :func:`unmerge`).
    """
    info(model)
    check_untied(model)
    layers = adapted_layers(model)
    done: list[AdaptedLayer] = []
    try:
        for _, layer in layers:
            if not layer.merged:
                layer.merge()
                done.append(layer)
    except BaseException:  # a layer that cannot be merged: the others are taken back out, all or nothing
        for layer in reversed(done):
            layer.unmerge()
        raise
    if unload:
        for name, layer in layers:
            set_module(model, name, layer.base_layer)
        release(model)
    return model


def release(model: nn.Module) -> None:
    """Forget the adapter of ``model``, whose layers are its base layers again: every parameter trains as it
    did before :func:`apply`, and a 4-bit base's hook on the input embeddings is removed."""
    for name, param in model.named_parameters():
        param.requires_grad_(model.lorakit.trainable_before.get(name, param.requires_grad))
    release_input_grads(model)
    del model.lorakit


def check_untied(model: nn.Module) -> None:
    """Refuse to merge into a base weight that another parameter shares (tied weights, e.g. GPT-2's input
    embedding and output head): merging writes the adapter into every module holding it, so the other module
    would change too and the merged model would not compute what the adapted one does."""
    holders: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(name)
    for name, layer in adapted_layers(model):
        weight = getattr(layer.base_layer, "weight", None)
        own = f"{name}.base_layer.weight"
        others = [n for n in holders.get(id(weight), []) if n != own]
        if others:
            raise AdapterStateError(
                f"cannot merge into {name}: its weight is shared with {', '.join(others[:3])} (tied "
                "weights), which merging would change too. Keep the adapter unmerged, or untie the weights "
                "before lorakit.apply (give each module its own copy, e.g. nn.Parameter(weight.clone()))"
            )


@takes_compiled
def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` with ``unload=False``: the base weights are restored."""
    info(model)
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


@takes_compiled
@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with lorakit.disabled(model):`` runs the base model (adapters bypassed, weights untouched)."""
    info(model)  # a plain model (also one merged with unload=True) has nothing to disable: refused
    layers = [layer for _, layer in adapted_layers(model)]
    if any(layer.merged for layer in layers):
        raise AdapterStateError("cannot disable merged adapters; call lorakit.unmerge(model) first")
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.enabled = was


# --- training support ----------------------------------------------------------------------------------
@takes_compiled
def check_driver(model: nn.Module, driver: Driver) -> None:
    """Refuse, before any training, a variant that cannot run with all its rules in ``driver``."""
    state = info(model)
    if any(layer.merged for _, layer in adapted_layers(model)):
        raise AdapterStateError(
            "the adapters are merged into the base; call lorakit.unmerge(model) before training"
        )
    reason = get_variant(state.variant).refusal(driver, state.config)
    if reason is not None:
        raise CapabilityError(reason)


@takes_compiled
def make_hooks(model: nn.Module, total_steps: int) -> list[Hook]:
    """The training-time rules the model's variant declares, built for a run of ``total_steps`` steps."""
    state = info(model)
    hook_class = get_variant(state.variant).hook
    layers = [layer for _, layer in adapted_layers(model)]
    return [hook_class(model, layers, total_steps)] if hook_class is not None else []


@takes_compiled
def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer groups: each adapter's groups plus the fully trained modules' groups, both as the variant
    sets them (LoRA+'s rates).

    Groups with the same settings are joined, and a tensor shared by several layers appears once.
    """
    state = info(model)
    check_rates(lr, weight_decay)
    groups = [g for _, layer in adapted_layers(model) for g in layer.variant.param_groups(lr, weight_decay)]
    modules = dict(model.named_modules())
    extra = [p for n in state.train_modules for p in modules[n].parameters() if p.requires_grad]
    groups += get_variant(state.variant).trained_module_groups(state.config, extra, lr, weight_decay)
    merged: dict[tuple, dict[str, Any]] = {}
    seen: set[int] = set()
    for group in groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        key = tuple(sorted(settings.items()))
        target = merged.setdefault(key, {**settings, "params": []})
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                target["params"].append(p)
    return [g for g in merged.values() if g["params"]]


def check_trained(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """Refuse optimizer ``groups`` (from :func:`param_groups`) that leave a trainable tensor out: one made
    trainable by hand outside the adapter and ``train_modules`` would get gradients but never an update (and
    is not saved with the adapter). See :func:`check_trains` too."""
    grouped = {id(p) for g in groups for p in g["params"]}
    stray = next((n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped), None)
    if stray is not None:
        raise SettingError(
            f"{stray} is trainable but neither part of the adapter nor of a module in train_modules, so "
            "lorakit would neither train nor save it; name its module in lorakit.apply(..., "
            "train_modules=[...]), or freeze it"
        )
    check_trains(model)


def check_trains(model: nn.Module) -> None:
    """Refuse a model with no trainable tensor: nothing would train."""
    if not any(p.requires_grad for p in model.parameters()):
        raise SettingError(
            f"the '{info(model).variant}' adapter has no trainable tensors (all are frozen); nothing would "
            "train"
        )


def check_rates(lr: float, weight_decay: float) -> None:
    """Refuse a learning rate that is not a positive finite number and a negative or non-finite weight decay:
    an optimizer takes either silently and trains nothing, or diverges."""
    for name, value, ok in (
        ("lr", lr, lambda v: 0 < v < math.inf),
        ("weight_decay", weight_decay, lambda v: 0 <= v < math.inf),
    ):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and ok(value)):
            rule = "a positive number" if name == "lr" else "a number >= 0"
            raise SettingError(f"{name}={value!r} is invalid: it must be {rule}")
