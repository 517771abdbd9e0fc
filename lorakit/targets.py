"""Which layers of a model a variant adapts: target selection, the output head, and swapping modules in.

Shared by :func:`lorakit.apply` and :func:`lorakit.quantize`, so both select layers the same way.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from lorakit.core.kinds import KindSet, kind_of
from lorakit.errors import LorakitError

# Output heads that "all-linear" leaves alone: adapting them is rarely wanted, and a new head trains in full.
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "cls", "head"})


class TargetError(LorakitError):
    """No layer (or an unsupported layer) matched the requested targets."""


def find_targets(model: nn.Module, targets: str | list[str], kinds: KindSet) -> list[str]:
    """Names of the modules ``targets`` selects, checked against the layer kinds the variant supports."""
    adaptable = {n: kind_of(m) for n, m in model.named_modules() if n and kind_of(m) is not None}
    if targets == "all-linear":
        head = output_head_names(model)
        names = [n for n, k in adaptable.items() if k.is_matrix and n not in head]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise TargetError(
                f"targets {targets!r} is not a valid regular expression ({err}); fix it"
            ) from None
        names = [n for n in adaptable if pattern.fullmatch(n)]
    else:
        names = [n for n in adaptable if any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise TargetError(no_match_message(targets, list(adaptable)))
    unsupported = [f"{n} ({adaptable[n].name})" for n in names if adaptable[n] not in kinds]
    if unsupported:
        raise TargetError(
            f"this variant cannot adapt {', '.join(unsupported[:5])}; it supports {kinds.names()} layers. "
            "Narrow `targets` to supported layers."
        )
    return names


def output_head_names(model: nn.Module) -> set[str]:
    heads = {
        n for n, _ in model.named_modules() if n.split(".")[0] in HEAD_NAMES or n.split(".")[-1] in HEAD_NAMES
    }
    getter = getattr(model, "get_output_embeddings", None)
    out = getter() if callable(getter) else None
    heads |= {n for n, m in model.named_modules() if out is not None and m is out}
    return heads


def no_match_message(targets: str | list[str], adaptable: list[str]) -> str:
    leaves = sorted({n.split(".")[-1] for n in adaptable})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    near = sorted({m for t in wanted for m in difflib.get_close_matches(str(t).split(".")[-1], leaves, n=3)})
    hint = f" Did you mean {near}?" if near else ""
    return (
        f"no layer matches targets {targets!r}.{hint} Adaptable layer names end in: {', '.join(leaves[:30])}"
        " (pass suffixes like ['query', 'value'], a regex, or 'all-linear')"
    )


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
