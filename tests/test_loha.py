"""LoHa: the Hadamard formula, its memory-lean autograd function, merging once, and parity with PEFT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_zoo import Holder, make_case, perturb
from torch import nn

import lorakit
from lorakit.variants.loha import HadamardProduct, LoHaConfig


def test_delta_is_scaled_hadamard_product_of_two_low_rank_terms() -> None:
    torch.manual_seed(0)
    model = Holder(nn.Linear(12, 10))
    w0, b0 = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    lorakit.apply(model, "loha", targets=["layer"], rank=3, alpha=6.0, dropout=0.0)
    perturb(model)
    v = model.layer.variant
    expected = (6.0 / 3) * (v.B1 @ v.A1) * (v.B2 @ v.A2)  # s = alpha / r
    torch.testing.assert_close(v.delta_weight(), expected)
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), F.linear(x, w0 + expected, b0))
    # Rank up to r^2 = 9 (> 2r = 6, what LoRA gets from the same 2r(d_in + d_out) parameters).
    b1, a1, b2, a2 = (p.detach().double() for p in (v.B1, v.A1, v.B2, v.A2))
    assert torch.linalg.matrix_rank((b1 @ a1) * (b2 @ a2)) == 9


@pytest.mark.parametrize("init", ["peft", "lycoris"])
def test_one_zero_factor_at_init_and_only_it_gets_gradient(init: str) -> None:
    torch.manual_seed(0)
    model, x = make_case("linear")
    base = model(x).detach()
    lorakit.apply(model, "loha", targets=["layer"], rank=4, dropout=0.0, init=init)
    v = model.layer.variant
    zero = v.A2 if init == "peft" else v.B2
    others = [p for p in (v.B1, v.A1, v.B2, v.A2) if p is not zero]
    assert torch.count_nonzero(zero) == 0 and all(torch.count_nonzero(p) == p.numel() for p in others)
    out = model(x)
    assert torch.equal(out, base)
    out.square().sum().backward()
    assert zero.grad.abs().sum() > 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in others)


def test_hadamard_function_gradients_match_finite_differences_and_plain_autograd() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 3), (3, 5), (6, 3), (3, 5)]
    factors = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(lambda *t: HadamardProduct.apply(*t, 0.7), factors)
    upstream = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad(HadamardProduct.apply(*factors, 0.7), factors, upstream)
    b1, a1, b2, a2 = factors
    plain = torch.autograd.grad(0.7 * (b1 @ a1) * (b2 @ a2), factors, upstream)
    for g_ours, g_plain in zip(ours, plain, strict=True):
        torch.testing.assert_close(g_ours, g_plain, rtol=1e-12, atol=1e-12)


def saved_shapes(fn) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves while running ``fn``."""
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_hadamard_function_saves_only_the_factors() -> None:
    d_out, d_in, r = 40, 30, 4
    b1, b2 = (torch.randn(d_out, r, requires_grad=True) for _ in range(2))
    a1, a2 = (torch.randn(r, d_in, requires_grad=True) for _ in range(2))
    ours = saved_shapes(lambda: HadamardProduct.apply(b1, a1, b2, a2, 2.0))
    plain = saved_shapes(lambda: 2.0 * ((b1 @ a1) * (b2 @ a2)))
    assert sorted(ours) == sorted([(d_out, r), (r, d_in)] * 2)
    assert plain.count((d_out, d_in)) >= 2  # both products, kept alive for the elementwise product's backward


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "conv2d"])
def test_folded_weight_path_equals_two_products(kind: str) -> None:
    """Without dropout the layer applies ``W0 + dW`` once; output and every gradient equal the two-product
    path ``y + op(x, dW)`` (the one dropout and autocast use)."""
    model, x = make_case(kind)
    model, x = model.double(), x.double()  # a float64 base: summation order cannot blur the comparison
    lorakit.apply(model, "loha", targets=["layer"], rank=3, alpha=6.0, dropout=0.0)
    perturb(model)
    layer, v = model.layer, model.layer.variant
    results = []
    for folded in (True, False):
        x_in = x.clone().requires_grad_(True)
        out = v(x_in, None if folded else layer.base_layer(x_in), layer)
        grads = torch.autograd.grad(out.square().sum(), [x_in, v.B1, v.A1, v.B2, v.A2])
        results.append((out, *grads))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert layer.weight_folds_exactly(x) and not v.needs_base_output(x, layer)


def test_folded_path_is_not_taken_where_it_would_change_the_result() -> None:
    """Dropout (the base and the adapter see different inputs) and bf16 autocast (``W0 + dW`` in bf16 would
    round a small ``dW`` away) keep the two-product path: a tiny ``dW`` still reaches the output."""
    model, x = make_case("linear")
    lorakit.apply(model, "loha", targets=["layer"], rank=2, alpha=2.0, dropout=0.0)
    layer, v = model.layer, model.layer.variant
    with torch.no_grad():
        v.A2.fill_(1e-3)  # dW about 1e-3 of W0's entries (0.3): below bf16's spacing there
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.weight_folds_exactly(x)
        out = model(x).float()
        base_bf16 = layer.base_layer(x).float()
    assert (out - base_bf16).abs().max() > 0
    dropped = lorakit.apply(make_case("linear")[0], "loha", targets=["layer"], rank=2, dropout=0.5)
    perturb(dropped)
    dropped.train()
    assert not torch.equal(dropped(x), dropped(x))  # dropout still drops (the two-product path)


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "conv2d"])
def test_merge_adds_delta_exactly_once(kind: str) -> None:
    model, x = make_case(kind)
    w0 = model.layer.weight.detach().clone()
    lorakit.apply(model, "loha", targets=["layer"], rank=4, alpha=12.0, dropout=0.0)  # s = 3
    perturb(model)
    layer = model.layer
    v = layer.variant
    with torch.no_grad():
        product = (v.B1 @ v.A1) * (v.B2 @ v.A2)
        once = w0 + layer.kind.from_2d(layer.base_layer, 3.0 * product)
        twice = w0 + layer.kind.from_2d(layer.base_layer, 9.0 * product)
    plain = lorakit.merge(model)
    torch.testing.assert_close(plain.layer.weight, once, atol=1e-6, rtol=0)
    assert (plain.layer.weight - twice).abs().max() > 1e-2


def test_bad_init_is_rejected_naming_the_field() -> None:
    with pytest.raises(lorakit.ConfigError, match="'init'"):
        LoHaConfig(init="normal")


@pytest.mark.parametrize(
    ("layer", "x_shape"),
    [(lambda: nn.Linear(12, 10), (3, 5, 12)), (lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 6, 6))],
    ids=["linear", "conv2d"],
)
def test_parity_with_peft_loha(layer, x_shape) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs, ours = Holder(layer()), Holder(layer())
    ours.load_state_dict(theirs.state_dict())
    theirs = peft.get_peft_model(theirs, peft.LoHaConfig(r=4, alpha=6, target_modules=["layer"]))
    lorakit.apply(ours, "loha", targets=["layer"], rank=4, alpha=6.0, dropout=0.0)
    pl, v = theirs.base_model.model.layer, ours.layer.variant
    perturb(pl)  # only the LoHa factors train in the PEFT model
    with torch.no_grad():
        for mine, name in (
            (v.B1, "hada_w1_a"),
            (v.A1, "hada_w1_b"),
            (v.B2, "hada_w2_a"),
            (v.A2, "hada_w2_b"),
        ):
            mine.copy_(getattr(pl, name)["default"])
    theirs.eval(), ours.eval()
    x = torch.randn(x_shape)
    with torch.no_grad():
        out_theirs, out_ours = theirs(x), ours(x)
        assert (out_theirs - pl.base_layer(x)).abs().max() > 1e-2  # the adapter is not trivially zero
        assert (out_theirs - out_ours).abs().max() <= 1e-5
        merged_theirs = theirs.merge_and_unload().layer.weight
        merged_ours = lorakit.merge(ours).layer.weight
    assert torch.equal(merged_ours, merged_theirs)
