"""Layer kinds: the only code in lorakit that knows layer types.

Every adaptable layer computes ``y = op(x, W) + b`` for some weight ``W``. A kind maps that weight to a 2-D
``(out, in)`` view and back, and applies a weight (or a low-rank factor of one) the way the layer does, so
variants only ever see ``(out, in)`` matrices:

- ``nn.Linear``: weight ``(out, in)``; the view is the weight itself.
- transformers' GPT-2 ``Conv1D``: weight stored ``(in, out)``; the view is its transpose.
- ``nn.Conv1d/2d/3d``: weight ``(out, in/groups, *k)``; the view flattens the kernel:
  ``(out, in/groups * k)``.
- ``nn.Embedding``: weight ``(num, dim)`` computes ``y = W[x] = W^T onehot(x)``: the view is
  ``(dim, num)``.

``down(x, A)`` applies an ``(r, in)`` factor as a layer of the same kind with ``r`` outputs (same stride,
padding, padding_idx); ``up(z, B)`` applies an ``(out, r)`` factor as a 1x1 map on the channel dimension.
Then ``op(x, B @ A) == up(down(x, A), B)`` and a variant never needs to form ``B @ A``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerKind:
    """How one layer type maps its weight to ``(out, in)`` and applies it."""

    name: str
    # Whether ``x`` is a float tensor with features on the last dim (lets variants use matrix fast paths).
    features_last: bool

    def matches(self, layer: nn.Module) -> bool:
        return _MATCHERS[self.name](layer)

    # --- weight views ------------------------------------------------------------------------------
    def weight_2d(self, layer: nn.Module, weight: Tensor | None = None) -> Tensor:
        """The layer's weight (or ``weight`` in the layer's layout) as ``(out, in)``."""
        w = _base_weight(layer) if weight is None else weight
        if self.name == "conv1d_gpt2" or self.name == "embedding":
            return w.t()
        if self.name.startswith("conv"):
            return w.reshape(w.shape[0], -1)
        return w

    def from_2d(self, layer: nn.Module, w2d: Tensor) -> Tensor:
        """Inverse of :meth:`weight_2d`: an ``(out, in)`` matrix in the layer's own layout."""
        if self.name == "conv1d_gpt2" or self.name == "embedding":
            return w2d.t()
        if self.name.startswith("conv"):
            return w2d.reshape(w2d.shape[0], *layer.weight.shape[1:])
        return w2d

    def shape_2d(self, layer: nn.Module) -> tuple[int, int]:
        """``(out, in)`` of the 2-D view, without touching (possibly quantised) weight data."""
        if self.name == "linear" or _quantized(layer):  # a 4-bit layer has no .weight; it states its shape
            return int(layer.out_features), int(layer.in_features)
        w = layer.weight
        if self.name == "conv1d_gpt2" or self.name == "embedding":
            return int(w.shape[1]), int(w.shape[0])
        return int(w.shape[0]), int(w[0].numel())

    # --- application -------------------------------------------------------------------------------
    def op(self, layer: nn.Module, x: Tensor, w2d: Tensor, bias: Tensor | None = None) -> Tensor:
        """Apply an ``(out, in)`` weight to ``x`` exactly as ``layer`` applies its own weight."""
        if self.name == "linear":
            return F.linear(x, w2d, bias)
        if self.name == "conv1d_gpt2":
            return F.linear(x, w2d, bias)
        if self.name == "embedding":
            y = _embed(layer, x, w2d.t())
            return y if bias is None else y + bias
        return _conv(layer, x, self.from_2d(layer, w2d), bias, groups=layer.groups)

    def down(self, layer: nn.Module, x: Tensor, a: Tensor) -> Tensor:
        """Apply an ``(r, in)`` factor as this kind of layer with ``r`` outputs."""
        if self.name in ("linear", "conv1d_gpt2"):
            return F.linear(x, a)
        if self.name == "embedding":
            return _embed(layer, x, a.t())
        if layer.groups != 1:
            raise ValueError(f"low-rank factors need groups=1 convolutions, got groups={layer.groups}")
        return _conv(layer, x, a.reshape(a.shape[0], *layer.weight.shape[1:]), None, groups=1)

    def up(self, z: Tensor, b: Tensor) -> Tensor:
        """Apply an ``(out, r)`` factor on the channel dimension (last dim, or dim 1 for convs)."""
        if self.features_last or self.name == "embedding":
            return F.linear(z, b)
        return torch.einsum("or,nr...->no...", b, z)

    def channel_view(self, v: Tensor) -> Tensor:
        """Reshape a per-output vector ``(out,)`` so it broadcasts against this kind's output."""
        if self.name.startswith("conv") and self.name != "conv1d_gpt2":
            return v.reshape(-1, *([1] * (int(self.name[4]))))
        return v


def _base_weight(layer: nn.Module) -> Tensor:
    # Quantised layers expose a dequantised view (in the layout of the layer they replace); plain layers
    # their weight.
    getter: Callable[[], Tensor] | None = getattr(layer, "dequantized_weight", None)
    return getter() if getter is not None else layer.weight


def _quantized(layer: nn.Module) -> bool:
    return callable(getattr(layer, "dequantized_weight", None))


def _embed(layer: nn.Module, x: Tensor, table: Tensor) -> Tensor:
    return F.embedding(
        x, table, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq, layer.sparse
    )


def _conv(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    if layer.padding_mode != "zeros":
        # Non-zero padding modes pad explicitly and convolve with no padding, as nn.ConvNd does.
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding: tuple[int, ...] | str = 0
    else:
        padding = layer.padding
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    return conv(x, weight, bias, layer.stride, padding, layer.dilation, groups)


def _is_gpt2_conv1d(layer: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 and relatives): matched by structure so transformers stays optional here.
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and layer.weight.dim() == 2


# A layer that stands in for another (a 4-bit NF4 layer) names the kind it replaces in ``lorakit_kind``.
_MATCHERS: dict[str, Callable[[nn.Module], bool]] = {
    "linear": lambda m: isinstance(m, nn.Linear) or getattr(m, "lorakit_kind", None) == "linear",
    "conv1d_gpt2": lambda m: _is_gpt2_conv1d(m) or getattr(m, "lorakit_kind", None) == "conv1d_gpt2",
    "conv1d": lambda m: isinstance(m, nn.Conv1d),
    "conv2d": lambda m: isinstance(m, nn.Conv2d),
    "conv3d": lambda m: isinstance(m, nn.Conv3d),
    "embedding": lambda m: isinstance(m, nn.Embedding),
}

KINDS: dict[str, LayerKind] = {
    "linear": LayerKind("linear", features_last=True),
    "conv1d_gpt2": LayerKind("conv1d_gpt2", features_last=True),
    "conv1d": LayerKind("conv1d", features_last=False),
    "conv2d": LayerKind("conv2d", features_last=False),
    "conv3d": LayerKind("conv3d", features_last=False),
    "embedding": LayerKind("embedding", features_last=False),
}

ALL_KINDS: frozenset[str] = frozenset(KINDS)
MATRIX_KINDS: frozenset[str] = frozenset({"linear", "conv1d_gpt2"})


def kind_of(layer: nn.Module) -> LayerKind | None:
    """The kind of ``layer``, or None when lorakit cannot adapt it."""
    for kind in KINDS.values():
        if kind.matches(layer):
            return kind
    return None
