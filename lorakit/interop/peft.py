"""PEFT's adapter formats, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`save_peft` writes a lorakit adapter so that ``peft.PeftModel.from_pretrained(base, dir)`` (and
every server that reads PEFT adapters) loads it; :func:`load_peft` reads a PEFT LoRA, DoRA, LoHa or LoKr
adapter into lorakit, to evaluate, train further with lorakit's hooks, merge or save. Neither needs PEFT
installed. How each method's tensors map is in :mod:`lorakit.interop.peft_methods`; variants PEFT has no
format for are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from lorakit.adapters.api import adapted_layers, apply_saved, info, takes_compiled
from lorakit.adapters.io import (
    PEFT_CONFIG_FILE,
    AdapterFileError,
    atomic_write,
    check_output_dir,
    safetensors_bytes,
    undo_apply,
    writing,
)
from lorakit.common.errors import LorakitError
from lorakit.core.layer import AdaptedLayer
from lorakit.interop.peft_methods import METHODS
from lorakit.variants import get_variant

CONFIG_FILE = PEFT_CONFIG_FILE
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the Hub spells repo ids
# Config fields lorakit reads: their JSON types, and the methods whose files must have them (PEFT writes
# them); a null or absent optional field means PEFT's default.
NUMBER = (int, float)
FIELDS: dict[str, tuple[tuple[type, ...], tuple[str, ...]]] = {
    "r": ((int,), ("LORA", "LOHA", "LOKR", "VERA")),
    "lora_alpha": (NUMBER, ("LORA",)),
    "alpha": (NUMBER, ("LOHA", "LOKR")),
    "lora_dropout": (NUMBER, ()),
    "vera_dropout": (NUMBER, ()),
    "use_rslora": ((bool,), ()),
    "use_dora": ((bool,), ()),
    "decompose_both": ((bool,), ()),
    "decompose_factor": ((int,), ()),
    "d_initial": (NUMBER, ()),
    "projection_prng_key": ((int,), ()),
    "modules_to_save": ((list,), ()),
    "bias": ((str,), ()),
}
# PEFT settings that change what the tensors mean (or add tensors lorakit would not read).
UNSUPPORTED = {
    "rank_pattern": "a rank per layer",
    "alpha_pattern": "an alpha per layer",
    "layer_replication": "layer replication",
    "trainable_token_indices": "training of token embeddings",
    "target_parameters": "adapting parameters instead of modules",
    "alora_invocation_tokens": "activated LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA",
    "use_qalora": "QA-LoRA",
}
# PEFT's ``init_lora_weights`` values that leave the base weight as it is; the others (PiSSA, OLoRA, CorDA,
# LoftQ, LoRA-GA) subtract the initial ``s B0 A0`` from it, again when PEFT loads the adapter.
BASE_KEPT_INITS = {True, False, "gaussian", "eva", "orthogonal", "mica"}
EXPORTABLE = tuple(v for method in METHODS for v in method.variants)


@takes_compiled
def save_peft(model: nn.Module, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the model's adapter and trained head in PEFT's format; returns the directory.

    A variant with rank choices (DyLoRA) is written at the rank :func:`lorakit.set_rank` chose (the largest
    if none) as a plain LoRA of that rank. A 4-bit (QLoRA) base is not written: load the base in 4 bits on the
    PEFT side. A layer PEFT would load without error but compute differently is refused (a convolution padded
    other than with zeros, LoRA on a dilated convolution, LoKr on a Conv1d with a whole ``W2``: see
    :mod:`lorakit.interop.peft_methods`).
    """
    state = info(model)
    spec = get_variant(state.variant).peft
    method = next((m for m in METHODS if spec is not None and m.peft_type == spec.peft_type), None)
    if method is None:
        raise LorakitError(
            f"variant '{state.variant}' has no PEFT equivalent; PEFT's formats hold {', '.join(EXPORTABLE)} "
            "(Delta-LoRA until it has moved W). "
            "Use lorakit.save, or lorakit.merge and save the merged model."
        )
    layers = adapted_layers(model)
    if any(layer.merged for _, layer in layers):
        raise LorakitError(
            "the adapter is merged into the base; call lorakit.unmerge(model) before save_peft"
        )
    for name, layer in layers:
        method.check_export(name, layer)
    modules = dict(model.named_modules())
    adapted_heads = [
        n for n in state.train_modules if any(isinstance(m, AdaptedLayer) for m in modules[n].modules())
    ]
    if adapted_heads:
        raise LorakitError(
            f"{adapted_heads[0]} is both adapted and fully trained; PEFT saves a module one way"
        )
    _refuse_suffix_heads([name for name, _ in layers], state.train_modules)
    saved_whole = _saved_whole(model, state.train_modules)
    _refuse_tied(model, saved_whole)
    targets = _peft_targets(model, [name for name, _ in layers])
    _refuse_renamed_on_load(model, method.peft_type, [name for name, _ in layers], isinstance(targets, str))
    out = Path(directory)
    check_output_dir(out, (CONFIG_FILE, WEIGHTS_FILE), "a PEFT adapter", overwrite)
    variant = layers[0][1].variant
    rank = variant.rank  # a chosen rank (DyLoRA), else the config's
    tensors: dict[str, Tensor] = {}
    for name, layer in layers:
        tensors.update(method.tensors(PREFIX + name, layer, rank))
    tensors.update(method.shared_tensors([layer for _, layer in layers]))
    for name in saved_whole:
        for key, value in modules[name].state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = value.detach()
    peft_config = {
        "peft_type": method.peft_type,
        "task_type": None,
        "base_model_name_or_path": state.base_model,
        **method.config(state, [layer for _, layer in layers], rank),
        "target_modules": targets,
        "modules_to_save": list(state.train_modules) or None,
        "inference_mode": True,
    }
    contiguous = {k: v.contiguous().cpu() for k, v in tensors.items()}
    text = json.dumps(peft_config, indent=2) + "\n"
    weights = safetensors_bytes(contiguous, {"format": "pt"})
    with writing(out, "the PEFT adapter"):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / WEIGHTS_FILE, lambda path: Path(path).write_bytes(weights))
        atomic_write(out / CONFIG_FILE, lambda path: Path(path).write_text(text))
    return out


@takes_compiled
def load_peft(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Apply the PEFT adapter in ``directory`` (or a Hub repo id) to the plain base ``model``, in place.

    LoRA and DoRA adapters become ``lora``/``dora``, LoHa ``loha`` and LoKr ``lokr``. PEFT's rank and module
    dropout act only in training; lorakit trains an imported adapter with its own input dropout (0). Only
    what the adapter owns is loaded: its layers' tensors, the modules in ``modules_to_save`` and the
    embeddings PEFT saves with ``save_embedding_layers``; every tensor must have exactly the shape the model
    gives it. Anything else is refused by name (:class:`~lorakit.adapters.io.AdapterFileError`), as is a layer
    PEFT computes differently from lorakit (a convolution padded other than with zeros, LoRA on a dilated
    convolution, LoKr on a Conv1d with a whole ``W2``, an explicit LoKr factor split the other way: see
    :mod:`lorakit.interop.peft_methods`), or whose initialisation changed the base weight (PiSSA, OLoRA); a
    failure leaves the model as it was.
    """
    path = _adapter_dir(directory)
    config = _read_config(path)
    file = path / CONFIG_FILE
    method = next(m for m in METHODS if m.peft_type == config["peft_type"])
    tensors = _read_tensors(path)
    shared = {k: tensors.pop(k) for k in method.shared_keys if k in tensors}
    foreign = [k for k in tensors if not k.startswith(PREFIX)]
    if foreign:
        raise AdapterFileError(
            f"{path}: tensor names must start with '{PREFIX}' as PEFT writes them; got {foreign[:3]}"
        )
    local = {k[len(PREFIX) :]: v for k, v in tensors.items()}
    names = sorted({k.split(method.marker)[0] for k in local if method.marker in k})
    if not names:
        raise AdapterFileError(
            f"{path}: no {config['peft_type']} tensors (keys containing '{method.marker}')"
        )
    cores = [k for k in local if re.search(r"\.(hada|lokr)_t\d", k)]
    if cores:  # PEFT's use_effective_conv2d on a convolution with a kernel above 1
        raise AdapterFileError(f"{path}: {cores[0]}: a Tucker core for convolutions is not supported")
    rest = {k: v for k, v in local.items() if method.marker not in k}
    modules_to_save = config.get("modules_to_save") or []
    _check_owned(model, path, rest, modules_to_save)
    heads = [k for k in rest if any(_within(k, m) for m in modules_to_save)]
    head_modules = sorted({k.rsplit(".", 1)[0] for k in heads})
    if config.get("ensure_weight_tying"):
        _check_tied_values(model, file, rest)
    else:
        try:
            _refuse_tied(model, head_modules, "Save it from PEFT with ensure_weight_tying=True")
        except LorakitError as err:
            raise AdapterFileError(f"{file}: {err}") from None
    try:
        variant, options = method.variant_options(config, shared)
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterFileError(
            f"{file}: settings lorakit cannot read ({type(err).__name__}: {err})"
        ) from None
    exact = "|".join(re.escape(n) for n in names)  # full names, not suffixes
    touched = {k.replace(".base_layer.", ".") for k in rest}
    saved = {k: v.detach().clone() for k, v in model.state_dict().items() if k in touched}
    try:
        apply_saved(model, variant, targets=exact, train_modules=head_modules, **options)
    except LorakitError as err:
        raise AdapterFileError(f"{file}: {err}") from None
    try:
        layers = dict(adapted_layers(model))
        params = dict(model.state_dict(keep_vars=True))
        for name in names:  # PEFT itself builds these adapters, and computes them differently from lorakit
            problem = method.layer_problem(layers[name])
            if problem is not None:
                raise AdapterFileError(
                    f"{path}: {name}: {problem}; lorakit does not load a layer it would compute differently "
                    "from PEFT"
                )
        with torch.no_grad():
            method.fill_shared(list(layers.values()), shared)
            for name in names:
                method.fill(layers[name], tensors, PREFIX + name)
            for key, value in rest.items():
                params[key].copy_(value)
    except Exception as err:  # any failure: the model goes back to what it was
        undo_apply(model)  # also unfreezes what apply froze
        model.load_state_dict(saved, strict=False)
        if isinstance(err, LorakitError):
            raise
        raise AdapterFileError(
            f"{path}: the adapter tensors do not fit the model ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]})"
        ) from None
    return model


def _check_owned(model: nn.Module, path: Path, rest: dict[str, Tensor], saved: list[str]) -> None:
    """Refuse tensors besides the adapter's layers unless the adapter owns them: a module in
    ``modules_to_save`` (a trained head), or the input or output embedding PEFT saves for a resized
    vocabulary (``save_embedding_layers``). Each must match the model's tensor in name and shape."""
    current = model.state_dict()
    for key, value in rest.items():
        plain = key.replace(".base_layer.", ".")
        if not (any(_within(plain, m) for m in saved) or _is_embedding(model, plain)):
            module = plain.rsplit(".", 1)[0]
            raise AdapterFileError(
                f"{path}: {PREFIX}{key} is not part of the adapter ({module} is not in modules_to_save, "
                "and not an embedding); lorakit loads only what the adapter owns. Remove the tensor, or list "
                f"{module} in modules_to_save of {CONFIG_FILE}"
            )
        if plain not in current or current[plain].shape != value.shape:
            found = "no such tensor" if plain not in current else f"shape {tuple(current[plain].shape)}"
            raise AdapterFileError(
                f"{path}: saved {plain} {tuple(value.shape)} does not fit this model ({found})"
            )


def _is_embedding(model: nn.Module, key: str) -> bool:
    """Whether tensor ``key`` belongs to the model's input or output embedding."""
    owners = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            module = get() if callable(get) else None
        except NotImplementedError:  # a transformers model without that embedding
            module = None
        if module is not None:
            owners.append(module)
    names = {n for n, m in model.named_modules() if any(m is o for o in owners)}
    owner = key.replace(".base_layer.", ".").rsplit(".", 1)[0]
    return owner in names


def _within(key: str, module: str) -> bool:
    """Whether tensor ``key`` belongs to a module whose name ends in ``module``, or to one inside it. PEFT
    matches ``modules_to_save`` by plain string ending (``"norm"`` saves every ``*_layernorm`` too), and saves
    such a module whole: a head's ``dense`` and ``out_proj`` with it."""
    parts = key.split(".")[:-1]
    owners = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return any(owner.endswith(module) for owner in owners)


def _refuse_tied(model: nn.Module, module_names: list[str], fix: str = "") -> None:
    """PEFT keeps its own copy of a saved module, so one tied to another (embeddings) would come apart.
    ``fix``: what the message says instead of how to export (loading: why the file has the copy)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    modules = dict(model.named_modules())
    for module in module_names:
        for p in modules[module].parameters():
            others = [n for n in owners[id(p)] if not n.startswith(module + ".")]
            if others:
                raise LorakitError(
                    f"{module} shares its weight with {others[0]} (tied); PEFT's modules_to_save would untie "
                    f"them. {fix or 'Untie the weights first, or use lorakit.save'}"
                )


# PEFT's LoRA loader rewrites, for the MoE families transformers v5 fused (transformers'
# ``conversion_mapping``, which PEFT extends with Mixtral), every target whose name ends in one of these to
# the fused experts' parameters (``peft.utils.transformers_weight_conversion._MOE_TARGET_MODULE_MAPPING``):
# a dense layer or a shared expert of that name would lose its adapter.
PEFT_MOE_RENAMED = {
    "mixtral": ("gate", "w1", "w2", "w3"),
    "qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj"),
}


def _refuse_renamed_on_load(model: nn.Module, peft_type: str, targets: list[str], regex: bool) -> None:
    """Refuse targets PEFT would read as a fused MoE's experts (see ``PEFT_MOE_RENAMED``); for these
    families PEFT also reduces a regex of targets (``regex``) to the names' last parts, which would adapt
    every layer of those names."""
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as families
    except ImportError:  # transformers v4: PEFT renames nothing
        return
    model_type = model.config.model_type if isinstance(model, PreTrainedModel) else None
    family = {**families, "mixtral": "mixtral"}.get(model_type)
    renamed = PEFT_MOE_RENAMED.get(family, ()) if peft_type == "LORA" else ()
    hit = next((t for t in targets if t.rsplit(".", 1)[-1] in renamed), None)
    if hit is not None:
        raise LorakitError(
            f"{hit}: PEFT reads a LoRA target named {hit.rsplit('.', 1)[-1]} in a {model_type} model as its "
            f"fused experts and would drop this layer's adapter; leave layers named {', '.join(renamed)} out "
            "of targets, or use lorakit.save (or lorakit.merge)"
        )
    if regex and family is not None and peft_type == "LORA":
        raise LorakitError(
            f"the adapted layers' names also end other layers' names, so the export would name them by a "
            f"regex, which PEFT reduces to the names' last parts in a {model_type} model and would adapt "
            "every layer so named; use lorakit.save (or lorakit.merge)"
        )


def _check_tied_values(model: nn.Module, file: Path, rest: dict[str, Tensor]) -> None:
    """With ``ensure_weight_tying`` PEFT keeps a saved module tied and writes each name of the shared weight;
    they are one tensor in the model, so the file must give them one value."""
    saved = {k.replace(".base_layer.", "."): v for k, v in rest.items()}
    names: dict[int, str] = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        if key not in saved:
            continue
        first = names.setdefault(id(p), key)
        if not torch.equal(saved[first], saved[key]):
            raise AdapterFileError(
                f"{file}: {first} and {key} are one tied weight in the model, but the file gives them "
                "different values"
            )


def _peft_targets(model: nn.Module, names: list[str]) -> list[str] | str:
    """``target_modules`` that PEFT matches to exactly ``names``. PEFT takes a list entry as a name ending
    (``key.endswith("." + entry)``); where that would also pick a module left without an adapter, an exact
    regex (which PEFT full-matches) names the layers instead."""
    chosen = set(names)
    for name, _ in model.named_modules():
        parts = name.split(".")
        if any(".".join(parts[:i]) in chosen for i in range(1, len(parts) + 1)):
            continue  # an adapted layer, or a module inside one
        if any(".".join(parts[i:]) in chosen for i in range(1, len(parts))):
            return "(?:" + "|".join(re.escape(n) for n in names) + ")"
    return names


def _saved_whole(model: nn.Module, train_modules: list[str]) -> list[str]:
    """The modules PEFT takes for ``modules_to_save = train_modules``: every one whose name ends in an entry
    (``classifier`` is also DistilBERT's ``pre_classifier``), each of which it then reads from the file."""
    return [n for n, _ in model.named_modules() if n and any(n.endswith(m) for m in train_modules)]


def _refuse_suffix_heads(names: list[str], train_modules: list[str]) -> None:
    """PEFT matches ``modules_to_save`` as plain string endings (``"head"`` matches ``lm_head``); one that
    matches an adapted layer makes PEFT's loader fail."""
    for module in train_modules:
        hit = next((n for n in names if n.endswith(module)), None)
        if hit is not None:
            raise LorakitError(
                f"{module} (trained whole) would also match the adapted layer {hit} in PEFT, which matches "
                "modules_to_save by name ending and cannot load that; rename the module, or use lorakit.save"
            )


def _adapter_dir(directory: str | os.PathLike[str]) -> Path:
    """A local directory as given; a string ``owner/name`` that is not one is fetched from the Hugging Face
    Hub. Any other missing path is an error: a local path never sends the loader to the network."""
    path = Path(directory)
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterFileError(f"{path} is a file; pass the directory holding {CONFIG_FILE}")
    text = str(directory)
    if not (isinstance(directory, str) and _looks_like_hub_id(text)):
        raise AdapterFileError(f"no adapter directory {directory}; pass the directory holding {CONFIG_FILE}")
    from huggingface_hub import snapshot_download  # installed with transformers

    files = [CONFIG_FILE, WEIGHTS_FILE, "adapter_model.bin"]
    try:
        return Path(snapshot_download(text, allow_patterns=files))
    except Exception as err:  # offline, unknown repo, no access: all mean "not found" to the caller
        raise AdapterFileError(
            f"no adapter directory {directory}, and fetching it from the Hugging Face Hub failed: "
            f"{' '.join(str(err).split())[:300]}"
        ) from None


def _looks_like_hub_id(text: str) -> bool:
    """``owner/name`` as the Hub spells repo ids, and not a relative path whose first folder exists here."""
    if not HUB_ID.fullmatch(text) or ".." in text or "--" in text:
        return False
    return not Path(text.split("/")[0]).exists()


def _read_config(path: Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json``: every field lorakit reads present and of the right type."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterFileError(f"no {CONFIG_FILE} in {path}: not a PEFT adapter directory")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"cannot read {file}: {err}; it must be the JSON file PEFT writes") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{file} holds a JSON {type(config).__name__}; PEFT writes an object")
    types = [m.peft_type for m in METHODS]
    if config.get("peft_type") not in types:
        raise AdapterFileError(
            f"{file}: peft_type {config.get('peft_type')!r}; lorakit reads {', '.join(types)}"
        )
    for field, (kinds, required_by) in FIELDS.items():
        value = config.get(field)
        if value is None:
            if config["peft_type"] in required_by:
                raise AdapterFileError(
                    f"{file}: field '{field}' is missing; PEFT writes it for every adapter"
                )
            config.pop(field, None)  # absent and null mean the same: PEFT's default
            continue
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            expected = " or ".join(k.__name__ for k in kinds)
            raise AdapterFileError(f"{file}: field '{field}' = {value!r} must be {expected}")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("alpha", 1.0))
    if rank is not None and rank <= 0 or not (0 < alpha < math.inf):
        raise AdapterFileError(f"{file}: r = {rank!r} and alpha = {alpha!r} must be positive (and finite)")
    if not all(isinstance(m, str) and m for m in config.get("modules_to_save", [])):
        raise AdapterFileError(f"{file}: field 'modules_to_save' must be a list of module names")
    init = config.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)) or init not in BASE_KEPT_INITS:
        raise AdapterFileError(
            f"{file}: init_lora_weights={init!r} changes the base weight (PEFT subtracts the initial B A "
            "from it), which lorakit's reader does not; save the adapter from PEFT with "
            "path_initial_model_for_weight_conversion, which writes it as a plain LoRA"
        )
    for field, what in UNSUPPORTED.items():
        if config.get(field):
            raise AdapterFileError(f"{file}: {what} ({field}) is not supported by lorakit's reader")
    if config.get("bias", "none") != "none":
        raise AdapterFileError(f"{file}: trained biases (bias={config.get('bias')!r}) are not supported")
    if config.get("lora_bias"):
        raise AdapterFileError(f"{file}: a trained bias beside lora_B (lora_bias=true) is not supported")
    return config


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """The adapter's tensors: safetensors, or a legacy ``adapter_model.bin`` read without unpickling code.
    Refuses a file that does not parse, holds something other than named tensors, or non-finite values."""
    file = path / WEIGHTS_FILE
    legacy = path / "adapter_model.bin"
    try:
        if file.is_file():
            tensors = load_file(str(file))
        elif legacy.is_file():
            file = legacy
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        else:
            raise AdapterFileError(f"no {WEIGHTS_FILE} (or adapter_model.bin) in {path}")
    except AdapterFileError:
        raise
    except Exception as err:  # safetensors and torch.load raise their own error types
        raise AdapterFileError(
            f"cannot read {file}: {' '.join(str(err).split())[:200]}; it must be the weights file PEFT writes"
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in tensors.items()
    ):
        raise AdapterFileError(f"{file} does not hold named tensors; it must be the weights file PEFT writes")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise AdapterFileError(
            f"{file}: tensor(s) {bad[:5]} hold NaN or infinite values; the adapter is damaged"
        )
    return tensors
