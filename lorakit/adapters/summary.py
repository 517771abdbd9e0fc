"""``lorakit.summary(model)``: trainable and total parameters, and a per-layer table."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lorakit.adapters.api import adapted_layers, takes_compiled
from lorakit.core.quantized import QuantizedBase


@dataclass
class LayerRow:
    name: str
    kind: str
    shape: tuple[int, int]
    trainable: int


@dataclass
class Summary:
    """Parameter counts of an adapted model; ``str()`` renders a table. Shared tensors count once."""

    trainable: int
    total: int
    layers: list[LayerRow] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'kind':<12} {'(out, in)':>14} {'trainable':>10}"]
        for r in self.layers:
            lines.append(f"{r.name:<{width}}  {r.kind:<12} {str(r.shape):>14} {r.trainable:>10,}")
        lines.append(
            f"trainable {self.trainable:,} of {self.total:,} parameters ({100 * self.fraction:.3f}%)"
        )
        return "\n".join(lines)


@takes_compiled
def summary(model: nn.Module) -> Summary:
    """Count trainable and total parameters (each tensor once) and list the adapted layers. A 4-bit base
    weight is a buffer of packed codes; it counts as the ``out x in`` parameters it stands for."""
    params = list(model.parameters())  # parameters() already yields a shared tensor once
    quantized = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, QuantizedBase))
    rows = [
        LayerRow(
            name,
            layer.kind.name,
            (layer.out_features, layer.in_features),
            sum(p.numel() for p in layer.variant.parameters() if p.requires_grad),
        )
        for name, layer in adapted_layers(model)
    ]
    return Summary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params) + quantized,
        layers=rows,
    )
