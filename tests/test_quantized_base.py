"""Quantised bases are recognised through :class:`lorakit.core.quantized.QuantizedBase`, never by their
attribute names: a quantised layer of another design (int8 codes in a buffer of its own name) adapts, trains,
caches and merges like the NF4 layer, and a plain layer that happens to have a ``dequantized_weight`` method
is still a plain layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_zoo import Holder
from torch import Tensor, nn

import lorakit
from lorakit.core.quantized import QuantizedBase


class Int8Linear(QuantizedBase):
    """A toy quantised linear layer: per-row absmax int8 codes in a buffer named ``codes``."""

    lorakit_kind = "linear"

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        self.out_features, self.in_features = dense.out_features, dense.in_features
        self.weight_dtype = dense.weight.dtype
        w = dense.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("codes", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        return (self.codes.float() * self.scale).to(dtype or torch.float32)

    def stored_weight(self) -> Tensor:
        return self.codes

    def to_dense(self) -> nn.Module:
        dense = nn.Linear(self.in_features, self.out_features)
        with torch.no_grad():
            dense.weight.copy_(self.dequantized_weight())
            dense.bias.copy_(self.bias)
        return dense

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)


def quantized_model() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return Holder(Int8Linear(nn.Linear(12, 10))), torch.randn(4, 12)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_a_quantised_layer_of_another_design_adapts_trains_and_merges(variant: str) -> None:
    model, x = quantized_model()
    lorakit.apply(model, variant, targets=["layer"], rank=4, dropout=0.1)
    layer = model.layer
    assert layer.weight_is_dequantised() and layer.stored_weight() is layer.base_layer.codes
    assert not layer.has_frozen_dense_weight()  # no dequantised copy may be kept for backward
    with torch.no_grad():
        for p in layer.variant.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.train()
    model(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in layer.variant.parameters())
    model.eval()
    with torch.no_grad():
        out = model(x)
        merged = lorakit.merge(model)
        assert type(merged.layer) is nn.Linear  # merging into a quantised base gives its dense layer
        torch.testing.assert_close(merged(x), out, atol=1e-5, rtol=1e-5)


def test_dora_caches_are_keyed_on_the_stored_codes() -> None:
    model, x = quantized_model()
    lorakit.apply(model, "dora", targets=["layer"], rank=4, dropout=0.0)
    model.eval()
    with torch.no_grad():
        for p in model.layer.variant.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        first = model(x)
        model.layer.base_layer.codes[0].neg_()  # the stored weight changes in place: its version moves
        assert not torch.allclose(model(x), first)


def test_a_plain_layer_with_a_dequantized_weight_method_is_no_quantised_base() -> None:
    class Helper(nn.Linear):
        def dequantized_weight(self) -> Tensor:  # a user's helper of the same name
            return self.weight * 0

    torch.manual_seed(0)
    model = Holder(Helper(12, 10))
    x = torch.randn(4, 12)
    expected = model(x).detach()
    lorakit.apply(model, "lora", targets=["layer"], rank=4)
    assert not model.layer.weight_is_dequantised()
    torch.testing.assert_close(model.layer.weight_2d(), model.layer.base_layer.weight)
    torch.testing.assert_close(model(x), expected)
