"""A variant's typed settings: the fields every variant shares (:class:`VariantConfig`, which each variant
extends), how a quantised base is stored, and the error a bad field raises."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lorakit.common.errors import LorakitError
from lorakit.common.settings import coerce_field


class ConfigError(LorakitError):
    """A variant config field is unknown or out of range; the message names the field and the fix."""


# How an adapter's own tensors may be stored. Not float16: AdamW's eps (1e-8) is 0 there, so a zero gradient
# (A's first one, with B = 0) makes an update of 0 / 0; bfloat16 has float32's range.
ADAPTER_DTYPES = ("float32", "bfloat16")


@dataclass
class VariantConfig:
    """Fields every variant shares.

    ``targets``: which layers to adapt: a list of module-name suffixes, a regex (full match on the module
    name), or ``"all-linear"`` (every linear layer except the output head). ``train_modules``: module-name
    suffixes trained in full and saved with the adapter (e.g. a new classification head). ``adapter_dtype``:
    how the adapter's own tensors are stored, ``float32`` (``float64`` on an fp64 layer) or, as QLoRA's paper
    keeps them, ``bfloat16`` (half the adapter's memory and its optimizer state's; the change is formed from
    them in fp32 at least, in the forward and a merge alike; an update smaller than bf16's spacing near a
    weight, about 0.4% of it, is rounded away).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"
    train_modules: list[str] = field(default_factory=list)
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check field ranges; subclasses extend this and call ``super().validate()``."""
        require(isinstance(self.rank, int) and self.rank > 0, "rank", self.rank, "a positive integer")
        require(0 < self.alpha < math.inf, "alpha", self.alpha, "a positive finite number")
        require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")
        dtypes = ", ".join(ADAPTER_DTYPES)
        require(self.adapter_dtype in ADAPTER_DTYPES, "adapter_dtype", self.adapter_dtype, f"one of {dtypes}")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        self.train_modules = list(self.train_modules)

    def max_rank(self, out_features: int, in_features: int) -> int | None:
        """The largest ``rank`` that means something on an ``(out, in)`` layer; None: no limit. Default
        ``min(out, in)``: a ``(out, r) @ (r, in)`` product has no more rank than that, so a larger ``r`` only
        adds parameters (``apply`` refuses it, naming the layer)."""
        return min(out_features, in_features)

    @classmethod
    def from_dict(cls, values: dict[str, Any], variant: str = "") -> VariantConfig:
        """Build a config, rejecting unknown fields with the list of valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names), key=str)
        if unknown:
            label = f" for variant '{variant}'" if variant else ""
            raise ConfigError(f"unknown config field(s) {unknown}{label}; valid fields: {', '.join(names)}")
        # each value of its field's type (numbers written as text are read as numbers), before validate()
        what = f"{variant} config" if variant else "variant config"
        return cls(**{k: coerce_field(cls, k, v, what) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def base_storage(self) -> BaseStorage | None:
        """How the target layers' frozen weights must be stored before the adapter wraps them (QLoRA's
        4-bit base); None: as given."""
        return None


@dataclass(frozen=True)
class BaseStorage:
    """A quantised base: ``quant_type`` (``"nf4"``), its compute dtype, and whether scales are quantised."""

    quant_type: str
    compute_dtype: str = "bfloat16"
    double_quant: bool = True


def require(ok: bool, name: str, value: object, expected: str) -> None:
    """Raise :class:`ConfigError` naming the field unless ``ok`` (used by every ``validate`` method)."""
    if not ok:
        raise ConfigError(f"config field '{name}' = {value!r} is invalid: it must be {expected}")
