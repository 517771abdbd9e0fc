"""Which layers of a model a variant adapts: target selection, the output head, and swapping modules in.

Shared by :func:`lorakit.apply` and :func:`lorakit.quantize`, so both select layers the same way.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import warnings
from collections.abc import Callable

from torch import nn

from lorakit.common.errors import LorakitError
from lorakit.core.kinds import CONV1D_GPT2, LINEAR, KindSet, kind_of, matched_kind, why_not_adaptable

# Output heads that "all-linear" leaves alone: adapting them is rarely wanted, and a new head trains in full.
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "cls", "head"})


class TargetError(LorakitError):
    """No layer (or an unsupported layer) matched the requested targets."""


def find_targets(model: nn.Module, targets: str | list[str], kinds: KindSet) -> list[str]:
    """Names of the modules ``targets`` selects, checked against the layer kinds the variant supports.

    A regex or ``"all-linear"`` must match at least one layer. In a list of suffixes an entry naming modules
    lorakit cannot adapt is refused, and one matching no module at all is warned about (one list often serves
    several model families, as in PEFT), so a misspelt entry never adapts fewer layers silently.
    """
    skipped = read_by_parent(model)
    every = list(model.named_modules(remove_duplicate=False))  # a module held twice under both names
    adaptable = {n: kind for n, m in every if n and n not in skipped and (kind := kind_of(m)) is not None}
    if targets == "all-linear":
        head = output_head_names(model)
        names = [n for n, k in adaptable.items() if k.is_matrix and n not in head]
        warn_fused(model)
        warn_read_by_parent(model, skipped)
        refused = [
            n
            for n, m in every
            if n and n not in adaptable and n not in skipped and n not in head
            if (kind := matched_kind(m)) is not None and kind.is_matrix
        ]
        if refused:  # linear layers that compute something else (a router), or have no weights yet
            warn_left_out(refused, why_not_adaptable(model.get_submodule(refused[0])))
        if not names and not skipped:
            leaves = sorted({n.split(".")[-1] for n in adaptable if n not in head})
            raise TargetError(
                "targets 'all-linear' selects the linear layers outside the output head (not embeddings or "
                "convolutions), and this model has none; pass the names of the layers to adapt"
                + (
                    f", e.g. {leaves[:3]} (adaptable layer names end in: {', '.join(leaves[:30])})"
                    if leaves
                    else ""
                )
            )
        if not names:
            raise TargetError(no_match_message(targets, list(adaptable), skipped))
    else:
        selects = _selector(targets)
        if not isinstance(targets, str):
            check_entries(model, targets, adaptable, skipped)
        names = [n for n in adaptable if selects(n)]
        if not names:
            unadaptable = _unadaptable(model, selects, skipped)
            raise TargetError(no_match_message(targets, list(adaptable), unadaptable))
    check_one_name(every, names)
    unsupported = [f"{n} ({adaptable[n].name})" for n in names if adaptable[n] not in kinds]
    if unsupported:
        raise TargetError(
            f"this variant cannot adapt {', '.join(unsupported[:5])}; it supports {kinds.names()} layers. "
            "Narrow `targets` to supported layers."
        )
    return names


# A parent that uses a child layer's weight or bias as a value (``self.out_proj.weight @ x``, or passed to a
# function) bypasses the layer's forward, so an adapter in the layer's place would be skipped or fail:
# nn.MultiheadAttention passes out_proj's to its functional form, nn.TransformerEncoderLayer's inference fast
# path reads every one of its linear layers', and Mamba mixers read dt_proj's (and, in their fused kernels,
# x_proj's, out_proj's and conv1d's). Found in the parent's source; reading an attribute of the weight
# (``.dtype``, ``.device``, ``.shape``), testing it (``isinstance``, ``is None``) or initialising it is not
# a use; nor is slicing it (``self.dense.weight[:, a:b]``): transformers does that only to emulate a
# pretraining tensor-parallel split, behind a flag off by default (Bloom's ``slow_but_exact``).
_READ = re.compile(
    r"(?<!isinstance\()(?<!getattr\()\bself\.(\w+)\.(?:weight|bias)\b"
    r"(?!\s*\.\s*(?:dtype|device|shape|ndim|is_\w+|_is_hf_initialized|requires_grad)\b)(?!\s+is\b)(?!\s*\[)"
)
_INITIALISERS = frozenset(
    {"__init__", "_init_weights", "init_weights", "reset_parameters", "_reset_parameters"}
)
# Classes whose methods only manage a model as a whole (loading, tying, generation): not scanned.
_FRAMEWORK = ("torch.nn.modules.module", "transformers.modeling_utils", "transformers.generation")


@functools.cache
def children_read(cls: type) -> frozenset[str]:
    """Names ``n`` whose ``self.n.weight`` or ``self.n.bias`` a method of ``cls`` (or of a base class) uses as
    a value (:data:`_READ`), initialisers aside."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith(_FRAMEWORK):
            continue
        for name, fn in vars(klass).items():
            if name in _INITIALISERS or not inspect.isfunction(fn):
                continue
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):  # defined without a source file
                continue
            names.update(_READ.findall(source))
    return frozenset(names)


def read_by_parent(model: nn.Module) -> dict[str, str]:
    """The adaptable layers whose parent reads their weight or bias itself (:func:`children_read`), with the
    reason: ``all-linear`` leaves them out and naming one is refused."""
    skipped = {}
    for n, m in model.named_modules():
        layers = [c for c, child in m.named_children() if kind_of(child) is not None]
        read = children_read(type(m)) if layers else frozenset()
        for child in (c for c in layers if c in read):  # in the model's order
            skipped[f"{n}.{child}" if n else child] = (
                f"{type(m).__name__} reads {child}'s weight or bias itself rather than calling the layer, so "
                "an adapter in its place would be skipped or fail; adapt other layers"
            )
    return skipped


def warn_read_by_parent(model: nn.Module, skipped: dict[str, str]) -> None:
    """Name the linear layers ``all-linear`` leaves out because their parent reads them
    (:func:`read_by_parent`), so a user reading "every linear layer" knows which are not adapted."""
    linear = [n for n in skipped if kind_of(model.get_submodule(n)) in (LINEAR, CONV1D_GPT2)]
    if linear:
        warn_left_out(linear, skipped[linear[0]])


def warn_left_out(names: list[str], why: str) -> None:
    """Warn that ``all-linear`` leaves out the layers ``names`` (the first named, with ``why``)."""
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    warnings.warn(f"targets 'all-linear' leaves out {names[0]}{more}: {why}", UserWarning, stacklevel=5)


def warn_fused(model: nn.Module) -> None:
    """Warn that ``all-linear`` leaves weights of 3 or more dimensions held by no layer lorakit adapts (a
    mixture of experts' fused expert weights, as transformers 5 stores them) without an adapter: a user
    reading "every linear layer" would otherwise not know that most of such a model's weights stay as
    they are."""
    fused = [
        (f"{n}.{name}" if n else name, tuple(p.shape))
        for n, m in model.named_modules()
        if kind_of(m) is None
        for name, p in m.named_parameters(recurse=False)
        if p.dim() >= 3 and p.shape[0] > 1  # a stack of matrices; not a (1, n, d) position embedding
    ]
    if fused:
        (first, shape), more = fused[0], len(fused) - 1
        others = f" and {more} more" if more else ""
        warnings.warn(
            f"targets 'all-linear' adapts layers; {first} {shape}{others} are weights of no layer lorakit "
            "adapts (a mixture of experts' fused experts, say) and stay without an adapter",
            UserWarning,
            stacklevel=4,
        )


def check_one_name(every: list[tuple[str, nn.Module]], names: list[str]) -> None:
    """Refuse a selected layer that the model holds under more than one name (``every``: its modules under
    every name): an adapter replaces the layer at one name, and calls through the other would run the base
    layer alone."""
    paths: dict[int, list[str]] = {}
    for n, m in every:
        paths.setdefault(id(m), []).append(n)
    modules = dict(every)
    for name in names:
        others = [n for n in paths[id(modules[name])] if n != name]
        if others:
            raise TargetError(
                f"layer {name} is the same module as {others[0]} (one module held under two names): an "
                "adapter would replace it at one name only, and calls through the other would skip it; give "
                "each use its own module, or leave it out of targets"
            )


def check_entries(
    model: nn.Module, targets: list[str], adaptable: dict[str, object], skipped: dict[str, str]
) -> None:
    """Refuse a targets list that is empty, holds a non-text entry, or has an entry that names only modules
    lorakit cannot adapt (saying why); warn about an entry that matches no module while another does (where
    none does, the caller's error says so once)."""
    if not targets:
        raise TargetError("targets is empty; pass module-name suffixes like ['query', 'value'], a regex, or "
                          "'all-linear'")  # fmt: skip
    unmatched = []
    for entry in targets:
        if not isinstance(entry, str) or not entry:
            raise TargetError(
                f"targets entry {entry!r} is not a module name; pass names like ['query', 'value']"
            )
        if not any(_suffix_of(n, entry) for n in adaptable):
            unadaptable = _unadaptable(model, _selector([entry]), skipped)
            message = no_match_message([entry], list(adaptable), unadaptable)
            if unadaptable:
                raise TargetError(message)
            unmatched.append(message)
    if len(unmatched) < len(targets):
        for message in unmatched:
            warnings.warn(f"{message}; the other entries are adapted", UserWarning, stacklevel=4)


def _suffix_of(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _selector(targets: str | list[str]) -> Callable[[str], bool]:
    """Whether a module name is selected: a regex must match the whole name, a list entry its suffix."""
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise TargetError(
                f"targets {targets!r} is not a valid regular expression ({err}); fix it"
            ) from None
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: any(_suffix_of(name, t) for t in targets)


def _unadaptable(model: nn.Module, selects: Callable[[str], bool], skipped: dict[str, str]) -> dict[str, str]:
    """Modules ``selects`` picks that lorakit cannot adapt, with the reason (for the no-match message);
    ``skipped``: the layers their parent reads (:func:`read_by_parent`)."""
    return {
        n: skipped.get(n) or why_not_adaptable(m)
        for n, m in model.named_modules(remove_duplicate=False)
        if n and selects(n) and (n in skipped or kind_of(m) is None)
    }


def output_head_names(model: nn.Module) -> set[str]:
    heads = {
        n for n, _ in model.named_modules() if n.split(".")[0] in HEAD_NAMES or n.split(".")[-1] in HEAD_NAMES
    }
    getter = getattr(model, "get_output_embeddings", None)
    out = getter() if callable(getter) else None
    heads |= {n for n, m in model.named_modules() if out is not None and m is out}
    return heads


def no_match_message(
    targets: str | list[str], adaptable: list[str], unadaptable: dict[str, str] | None = None
) -> str:
    leaves = sorted({n.split(".")[-1] for n in adaptable})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    if unadaptable:
        first, reason = next(iter(unadaptable.items()))
        more = f" (and {len(unadaptable) - 1} more)" if len(unadaptable) > 1 else ""
        return (
            f"targets {targets!r} match {first}{more}, which lorakit cannot adapt: {reason}. Adaptable layer "
            f"names end in: {', '.join(leaves[:30]) or '(none)'}"
        )
    near = sorted({m for t in wanted for m in difflib.get_close_matches(str(t).split(".")[-1], leaves, n=3)})
    hint = f" Did you mean {near}?" if near else ""
    return (
        f"no layer matches targets {targets!r}.{hint} Adaptable layer names end in: "
        f"{', '.join(leaves[:30]) or '(none)'} (pass suffixes like ['query', 'value'], a regex, or "
        "'all-linear')"
    )


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
