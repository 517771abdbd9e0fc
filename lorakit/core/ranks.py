"""The rank view of an adapted model, for every variant through the contract (``Variant.rank`` and friends).

Choosing a rank after training (DyLoRA), scoring every rank, and reading the ranks a model uses now (AdaLoRA's
live ranks) or a saved adapter holds. No variant is named here: a variant without rank choices refuses.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lorakit.common.errors import AdapterStateError, SettingError
from lorakit.core.layer import AdaptedLayer


def _layers(model: nn.Module) -> list[AdaptedLayer]:
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    if not layers:
        raise AdapterStateError(
            "model has no lorakit adapter; call lorakit.apply(model, ...) or lorakit.load first"
        )
    return layers


def rank_choices(model: nn.Module) -> range | None:
    """The ranks the model's adapter can be used at after training (None: its rank is fixed)."""
    return _layers(model)[0].variant.rank_choices()


def set_rank(model: nn.Module, b: int | None) -> None:
    """Use rank ``b`` in every adapted layer outside training; ``None`` restores the largest rank."""
    layers = _layers(model)
    choices = layers[0].variant.rank_choices()
    if choices is None:
        raise SettingError(
            f"variant '{layers[0].variant.name}' has a fixed rank; a rank can only be chosen for variants "
            "trained at several ranks"
        )
    if b is not None:
        span = f"choose an integer in [{choices[0]}, {choices[-1]}]"
        if not isinstance(b, int) or isinstance(b, bool):
            raise SettingError(f"rank {b!r} is not an integer: {span}")
        if b not in choices:
            raise SettingError(f"rank {b!r} is out of range: {span}")
    if any(layer.merged for layer in layers):
        raise AdapterStateError(
            "cannot change the rank of merged adapters; call lorakit.unmerge(model) first"
        )
    for layer in layers:
        layer.variant.choose_rank(b)


def evaluate_all_ranks(
    model: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]]
) -> dict[int, dict[str, float]]:
    """``evaluate(model)`` at every rank of one trained adapter; the rank in use is restored after."""
    layers = _layers(model)
    choices = rank_choices(model)
    previous = layers[0].variant.rank
    if choices is None:
        set_rank(model, None)  # raises: a fixed rank has nothing to scan
    try:
        return {b: _at(model, b, evaluate) for b in choices}
    finally:
        set_rank(model, None if previous == choices[-1] else previous)


def _at(model: nn.Module, b: int, evaluate: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
    set_rank(model, b)
    return evaluate(model)


def live_ranks(model: nn.Module) -> dict[str, int]:
    """The rank each adapted layer uses now, by module name."""
    return {n: m.variant.rank for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def round_ranks(model: nn.Module) -> tuple[int, int] | None:
    """``(low, high)`` when a federated server draws one rank per round for this adapter, else None."""
    return _layers(model)[0].variant.round_ranks()
