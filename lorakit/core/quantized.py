"""The quantised-base protocol: what a layer whose weight is stored quantised offers the rest of lorakit.

A quantised layer (the 4-bit NF4 layer of QLoRA, :class:`lorakit.core.nf4_linear.NF4Linear`) stands in for a
dense layer of another kind and keeps its weight as codes, not as a ``weight`` parameter. The layer kinds,
the adapted layer and the variants recognise such a layer by this class (never by probing for attributes):
its shape, the dense kind it replaces, its weight dequantised on demand, the tensor its codes live in, and the
dense layer it converts back to for merging.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn


class QuantizedBase(nn.Module, abc.ABC):
    """A frozen layer computing ``op(x, W) + b`` of the kind named by :attr:`lorakit_kind`, with ``W`` stored
    quantised. Subclasses set :attr:`lorakit_kind`, :attr:`out_features`, :attr:`in_features` and
    :attr:`weight_dtype`."""

    lorakit_kind: str  # the name of the layer kind it stands in for (lorakit.core.kinds)
    out_features: int
    in_features: int
    # The dtype the weight dequantises to by default: the one it was quantised from (its codes depend on it),
    # unless the layer was cast since.
    weight_dtype: torch.dtype

    @abc.abstractmethod
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """A new full-precision tensor of the weight, in the layout of the layer it stands in for."""

    @abc.abstractmethod
    def stored_weight(self) -> Tensor:
        """The tensor holding the codes: it changes (its ``_version`` with it) whenever the weight does, so
        a cache derived from the weight is keyed on it."""

    @abc.abstractmethod
    def to_dense(self) -> nn.Module:
        """The dense layer it stands for, with the dequantised weight (merging writes into that)."""
