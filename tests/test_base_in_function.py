"""The low-rank kernel forming the base output itself (:func:`lorakit.kernels.lowrank.forms_base_output`):
the same outputs and gradients as calling the base layer, and the base layer called whenever it must be
(hooks, an overridden forward, autocast, another dtype, a 4-bit or a training base). Every registered variant
whose form is the low-rank one joins the generated cases."""

from __future__ import annotations

import copy

import pytest
import torch
from layer_zoo import make_case
from torch import nn
from variant_cases import config_with_dropout

import lorakit
from lorakit.core.dropout import keep_mask
from lorakit.core.forms import LowRank
from lorakit.core.layer import AdaptedLayer
from lorakit.kernels.gaps import drawn_as_gaps
from lorakit.kernels.lowrank import _LowRankFunction, forms_base_output


def _low_rank_form(variant: str) -> bool:
    """Whether ``variant`` on a linear layer declares the low-rank computation form."""
    model, _ = make_case("linear")
    layer = lorakit.apply(model, variant, targets=["layer"], **config_with_dropout(variant, 0.0)).layer
    return isinstance(layer.variant.form(layer), LowRank)


# Every variant whose forward is the low-rank form, with each dropout rate its config takes; LoRA-FA freezes A
# (its masks are drawn again in backward). QLoRA runs unquantised here (its 4-bit base calls its own layer:
# tests/test_conformance_4bit.py).
CASES = [
    (name, p)
    for name in lorakit.VARIANTS
    if _low_rank_form(name)
    for p in (0.0, 0.1)
    if config_with_dropout(name, p) is not None
]


@pytest.mark.parametrize("a_trains", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.3])  # 0.1: from the dropped positions; 0.3: with the mask
def test_function_with_the_base_weight_equals_the_base_product_plus_the_adapter(
    p: float, a_trains: bool
) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 5, 7, dtype=torch.float64, requires_grad=True)
    w0, bias = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    a = torch.randn(3, 7, dtype=torch.float64, requires_grad=a_trains)
    b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    out = _LowRankFunction.apply(x, a, b, None, 1.5, p, 1234, w0, bias, drawn_as_gaps(p))
    x_in = x * keep_mask(x, p, 1234) / (1 - p) if p > 0 else x
    ref = x @ w0.t() + bias + 1.5 * (x_in @ a.t()) @ b.t()
    torch.testing.assert_close(out, ref)
    inputs = (x, a, b) if a_trains else (x, b)
    g = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g), strict=True
    ):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(
        lambda x, b: _LowRankFunction.apply(x, a, b, None, 1.5, p, 99, w0, bias, drawn_as_gaps(p)), (x, b)
    )


def _pair(variant: str, kind: str, dropout: float) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """The same adapted model twice: the second forced to call its base layer."""
    model, x = make_case(kind)
    model = lorakit.apply(model, variant, targets=["layer"], **config_with_dropout(variant, dropout)).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # B non-zero: every gradient generic
    plain = copy.deepcopy(model)
    for layer in plain.modules():
        if isinstance(layer, AdaptedLayer):
            layer.base_output_formable = lambda x: False
    return model, plain, x.requires_grad_()


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2"])
@pytest.mark.parametrize(("variant", "dropout"), CASES)
def test_variants_give_the_same_outputs_and_gradients_as_with_the_base_layer_called(
    variant: str, kind: str, dropout: float
) -> None:
    fused, plain, x = _pair(variant, kind, dropout)
    layer = fused.layer
    assert forms_base_output(layer, x) and not forms_base_output(plain.layer, x)
    grads = []
    for model in (fused, plain):
        torch.manual_seed(5)  # the same dropout masks
        out = model(x)
        out.square().sum().backward()
        trained = [p.grad for p in model.parameters() if p.requires_grad]
        assert trained and all(g is not None and g.abs().max() > 0 for g in trained)
        grads.append((out.detach(), x.grad.clone(), *trained))
        x.grad = None
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_base_layer_still_runs_where_a_hook_watches_it() -> None:
    model, x = make_case("linear")
    model = lorakit.apply(model, "lora", targets=["layer"], rank=4, dropout=0.1).train()
    layer = model.layer
    assert forms_base_output(layer, x)
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda m, i, out: seen.append(out) or out * 2)
    assert not forms_base_output(layer, x)
    with torch.no_grad(), lorakit.disabled(model):
        base_twice = model(x)  # the hook doubles the base output
    out = model(x)
    assert len(seen) == 2  # the hook ran in both calls, and its change is in the output (B is zero at start)
    torch.testing.assert_close(out, base_twice)
    handle.remove()
    assert forms_base_output(layer, x)


def test_the_base_layer_still_runs_where_its_class_overrides_forward() -> None:
    class Shifted(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1.0

    torch.manual_seed(0)
    model = nn.Sequential(Shifted(12, 10))
    x = torch.randn(3, 12)
    expected = model(x).detach()
    model = lorakit.apply(model, "lora", targets=["0"], rank=4).train()
    assert not forms_base_output(model[0], x)
    torch.testing.assert_close(model(x), expected)  # B is zero: the adapted model is the base


def test_the_base_layer_runs_under_autocast_in_another_dtype_and_with_a_training_base() -> None:
    model, x = make_case("linear")
    model = lorakit.apply(model, "lora", targets=["layer"], rank=4).train()
    layer = model.layer
    assert forms_base_output(layer, x) and forms_base_output(layer.to(torch.float64), x.double())
    assert not forms_base_output(layer, x.float())  # the layer is fp64 now, the input fp32
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not forms_base_output(layer, x)
    layer.base_layer.weight.requires_grad_(True)  # a base that trains gets its gradient from its own layer
    assert not forms_base_output(layer, x)
    model(x).sum().backward()
    assert layer.base_layer.weight.grad is not None and layer.base_layer.weight.grad.abs().max() > 0


def test_the_base_product_and_the_adapter_are_one_node_of_the_graph() -> None:
    model, x = make_case("linear")
    model = lorakit.apply(model, "lora", targets=["layer"], rank=4, dropout=0.1).train()
    x = torch.randn(3, 5, 12, requires_grad=True)
    node = model(x).grad_fn
    assert type(node).__name__ == "_LowRankFunctionBackward"
    parents = [type(n).__name__ for n, _ in node.next_functions if n is not None]
    assert parents == ["AccumulateGrad"] * 3  # x, A and B themselves: no node of a base op in between
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x)
    assert not any(t.shape == out.shape for t in saved)  # no copy of W0 x + b0 is kept beside the output
