"""DoRA: the paper's decomposition, the lean row norm, its detached gradient, caching, and PEFT parity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from layer_zoo import make_case
from torch import nn

import lorakit
from lorakit.core.dropout import keep_mask
from lorakit.kernels import KERNELS, dora_positions
from lorakit.kernels.dropped import (
    dropped_at,
    dropped_values,
    gram_on_dropped,
    product_at_dropped,
    product_on_dropped,
)
from lorakit.variants import dora


def perturb(variant: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (variant.A, variant.B, variant.m):
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def linear_case(dropout: float = 0.0) -> tuple[nn.Module, torch.Tensor]:
    model, x = make_case("linear")
    lorakit.apply(model, "dora", targets=["layer"], rank=4, alpha=8.0, dropout=dropout)
    perturb(model.layer.variant)
    return model, x


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "conv2d", "embedding"])
def test_merged_rows_have_norm_m(kind: str) -> None:
    model, x = make_case(kind)
    lorakit.apply(model, "dora", targets=["layer"], rank=4, alpha=8.0, dropout=0.0)
    layer, v = model.layer, model.layer.variant
    perturb(v)
    w0 = layer.weight_2d().detach().clone()
    vv = w0 + v.scale * v.B.detach() @ v.A.detach()  # V = W0 + s B A
    expected = v.m.detach()[:, None] * vv / vv.norm(dim=1, keepdim=True)  # Eq. 5: m V / ||V||_row
    with torch.no_grad():
        out = model(x)
        lorakit.merge(model, unload=False)
        merged = layer.weight_2d()
        torch.testing.assert_close(merged.norm(dim=1), v.m.detach().abs(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)


def test_efficient_norm_equals_naive(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    w0, a, b = (torch.randn(*shape, generator=gen) for shape in [(37, 50), (6, 50), (37, 6)])
    monkeypatch.setattr(dora, "_ROWS", 8)  # several row blocks, the last one partial
    # A bf16 base is upcast blockwise and its norm is still computed in fp32.
    for w in (w0, w0.bfloat16()):
        naive = (w.float() + 0.7 * b @ a).norm(dim=1)
        efficient = dora.row_norm(w, dora.w0_sq_norms(w), a, b, 0.7)
        assert efficient.dtype == torch.float32
        torch.testing.assert_close(efficient, naive, atol=1e-5, rtol=1e-5)


def test_gradient_does_not_flow_through_norm() -> None:
    model, x = linear_case()
    model.train()
    v, w0, b0 = model.layer.variant, model.layer.base_layer.weight, model.layer.base_layer.bias
    model(x).square().mean().backward()
    ours = [v.A.grad, v.B.grad, v.m.grad]

    def manual(detach: bool) -> list[torch.Tensor]:
        a, b, m = (p.detach().clone().requires_grad_() for p in (v.A, v.B, v.m))
        vv = w0 + v.scale * b @ a
        norm = vv.norm(dim=1, keepdim=True)
        w = m[:, None] * vv / (norm.detach() if detach else norm)
        F.linear(x, w, b0).square().mean().backward()
        return [a.grad, b.grad, m.grad]

    for g, ref in zip(ours, manual(detach=True), strict=True):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)
    # The check can fail: with the norm attached, A and B get clearly different gradients.
    attached = manual(detach=False)
    assert (attached[0] - ours[0]).abs().max() > 1e-3 and (attached[1] - ours[1]).abs().max() > 1e-3


def test_all_zero_row_gives_no_nan() -> None:
    model, x = make_case("linear")
    with torch.no_grad():
        model.layer.weight[2].zero_()
    w0 = model.layer.weight.detach().clone()
    base_out = model(x).detach()
    lorakit.apply(model, "dora", targets=["layer"], rank=4, alpha=8.0, dropout=0.1)
    v = model.layer.variant
    assert v.m[2] == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), base_out, atol=1e-6, rtol=1e-6)  # identity at init, row 2 too
    perturb(v)
    with torch.no_grad():
        v.B[2].zero_()  # V's row 2 stays exactly zero, so ||V_2|| = 0
        v.m[3] = 0.0  # a zeroed magnitude on a non-zero row: W0's row 3 is unrecoverable from W'
    model.train()
    out = model(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in (v.A, v.B, v.m))
    model.eval()
    with torch.no_grad():
        out = model(x)
        lorakit.merge(model, unload=False)
        assert torch.isfinite(model.layer.base_layer.weight).all()
        torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
        lorakit.unmerge(model)
        torch.testing.assert_close(model.layer.base_layer.weight, w0, atol=1e-6, rtol=1e-5)
        assert torch.equal(model.layer.base_layer.weight[2:4], w0[2:4])


def test_eval_norm_cache_reused_and_invalidated(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = linear_case()
    calls = []
    real = dora.row_norm
    monkeypatch.setattr(dora, "row_norm", lambda *args: calls.append(1) or real(*args))
    model.eval()
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first) and len(calls) == 1, "eval mode must reuse the cached norm"
        model.layer.variant.B.mul_(1.5)  # an in-place update (optimizer step, load) bumps B._version
        changed = model(x)
        assert len(calls) == 2 and not torch.allclose(changed, first)
        fresh, _ = make_case("linear")  # the same adapter built from scratch agrees with the refreshed cache
        lorakit.apply(fresh, "dora", targets=["layer"], rank=4, alpha=8.0, dropout=0.0)
        fresh.layer.variant.load_state_dict(model.layer.variant.state_dict())
        torch.testing.assert_close(fresh.eval()(x), changed, atol=0, rtol=0)
        model.layer.variant.A.data.add_(0.5)  # an edit through .data bumps no version: A is compared too
        edited = model(x)
        assert len(calls) == 4 and not torch.allclose(edited, changed)
        torch.testing.assert_close(copy.deepcopy(model)(x), edited)  # recomputed from scratch
    model.train()
    model(x), model(x)
    assert len(calls) == 7, "training mode recomputes the norm every forward"  # after the copy's one
    model.layer.base_layer.weight.data.mul_(2)  # the base edited through .data: a mode switch catches it
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), copy.deepcopy(model)(x))


class _SeededDropout(nn.Module):
    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * keep_mask(x, self.p, self.seed) / (1 - self.p)


def _peft_pair(kind: str, dropout: float) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    from peft import LoraConfig, get_peft_model

    ref, x = make_case(kind)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["layer"], use_dora=True, lora_dropout=dropout,
                     fan_in_fan_out=kind == "conv1d_gpt2")  # fmt: skip
    ref = get_peft_model(ref, cfg)
    ours, _ = make_case(kind)
    lorakit.apply(ours, "dora", targets=["layer"], rank=4, alpha=8.0, dropout=dropout)
    layer, v, gen = ref.base_model.model.layer, ours.layer.variant, torch.Generator().manual_seed(5)
    if kind == "embedding":
        a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    else:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight  # (out,) or (1, out, 1, ...) for convs
    with torch.no_grad():
        for p in (a, b, m):
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        v.A.copy_(a.reshape(v.A.shape)), v.B.copy_(b.reshape(v.B.shape)), v.m.copy_(m.reshape(-1))
    return ref, ours, x


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "conv1d", "conv2d", "conv3d", "embedding"])
def test_peft_parity_outputs_and_merged_weights(kind: str) -> None:
    ref, ours, x = _peft_pair(kind, dropout=0.0)
    ref.eval(), ours.eval()
    with torch.no_grad():
        out = ours(x)
        assert (out - ref(x)).abs().max() <= 1e-5
        with lorakit.disabled(ours):
            assert (out - ours(x)).abs().max() > 1e-2  # the copied adapter really changes the output
        ref_w = ref.merge_and_unload().layer.weight
        torch.testing.assert_close(lorakit.merge(ours).layer.weight, ref_w, atol=1e-6, rtol=1e-6)


def test_peft_parity_training_with_dropout() -> None:
    ref, ours, x = _peft_pair("linear", dropout=0.3)
    ref.train(), ours.train()
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # the seed lorakit's forward draws for its dropout mask
    # PEFT's dropout module replaced by the same mask (lorakit draws it from a seed)
    ref.base_model.model.layer.lora_dropout["default"] = _SeededDropout(0.3, seed)
    out_ref = ref(x)
    torch.manual_seed(11)
    out = ours(x)
    assert (out - out_ref).abs().max() <= 1e-5 and (out - ours.eval()(x)).abs().max() > 1e-3
    out_ref.square().mean().backward(), out.square().mean().backward()
    layer, v = ref.base_model.model.layer, ours.layer.variant
    refs = [layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]]
    for g, r in zip((v.A.grad, v.B.grad, v.m.grad), refs, strict=True):
        torch.testing.assert_close(g, r.weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("training", [False, True])
def test_bf16_small_magnitude_change_reaches_the_output(training: bool) -> None:
    # Under bf16 autocast c = m / ||V|| near 1 has bf16 neighbours 1 -/+ 2**-8: a 0.1% change of m reaches the
    # output only when c and c - 1 stay fp32 and the sum is rounded once.
    model, _ = linear_case()
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    v = model.layer.variant
    with torch.no_grad():
        v.m.copy_(v.weight_norm(model.layer))  # c = 1 exactly, with a non-zero B A
    model.train(training)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(x)
        v.m[3] *= 1.001
        after = model(x)
    assert after.dtype == torch.bfloat16
    changed = (after != before).sum(0)  # per output row (feature)
    assert changed[3] >= 3, "a 0.1% magnitude change must reach its output row"
    assert changed.sum() == changed[3], "other rows must not move"


def _plain_dora(
    x: torch.Tensor, layer: nn.Module, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor,
    scale: float, p: float, seed: int,
) -> torch.Tensor:  # fmt: skip
    """The paper's forward in plain autograd (Eq. 5, norm detached), on the fused path's dropout mask."""
    w0 = layer.weight_2d()
    bias = layer.bias
    y = F.linear(x, w0, bias)
    xd = x * keep_mask(x, p, seed) / (1 - p) if p > 0 else x
    norm = (w0 + scale * b @ a).norm(dim=1).detach()
    c = m / norm
    return y + (c - 1) * F.linear(xd, w0) + c * scale * F.linear(F.linear(xd, a), b)


@pytest.mark.parametrize("kind, with_bias", [("linear", True), ("linear", False), ("conv1d_gpt2", True)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.3])  # 0.1: W0 x~ from the dropped inputs (CPU)
def test_fused_function_equals_plain_autograd(kind: str, p: float, with_bias: bool) -> None:
    model, x = make_case(kind)
    if not with_bias:
        model.layer.bias = None
    lorakit.apply(model, "dora", targets=["layer"], rank=4, alpha=8.0, dropout=p)
    v, layer = model.layer.variant, model.layer
    perturb(v)
    model.train()
    x = x.clone().requires_grad_()
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
    torch.manual_seed(7)
    out = model(x)
    gen = torch.Generator().manual_seed(2)
    weights = torch.randn(out.shape, generator=gen)  # a generic upstream gradient
    (out * weights).sum().backward()
    ours = [out.detach(), x.grad, v.A.grad, v.B.grad, v.m.grad]

    xr = x.detach().clone().requires_grad_()
    a, b, m = (t.detach().clone().requires_grad_() for t in (v.A, v.B, v.m))
    ref = _plain_dora(xr, layer, a, b, m, v.scale, p, seed)
    (ref * weights).sum().backward()
    for got, want in zip(ours, [ref.detach(), xr.grad, a.grad, b.grad, m.grad], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert v.m.grad.abs().min() > 0 and v.A.grad.abs().max() > 0  # every gradient really flows


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # 0.1: fp32 from the dropped inputs, bf16 with dense products
def test_fused_function_under_bf16_autocast_matches_fp32(dropout: float) -> None:
    model, x = linear_case(dropout=dropout)
    model.train()
    v = model.layer.variant
    torch.manual_seed(5)  # the same dropout mask in both runs
    model(x).square().mean().backward()
    fp32 = [p.grad.clone() for p in (v.A, v.B, v.m)]
    model.zero_grad()
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    for got, want in zip((v.A.grad, v.B.grad, v.m.grad), fp32, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-2, rtol=3e-2)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_a_trained_base_weight_gets_the_gradient_of_the_definition(p: float) -> None:
    """A base weight or bias the user trains too reaches W0 through both ``W0 x`` and ``(c - 1) W0 x~``."""
    model, x = make_case("linear")
    lorakit.apply(model, "dora", targets=["layer"], rank=4, alpha=8.0, dropout=p)
    v, layer = model.layer.variant, model.layer
    perturb(v)
    w0, bias = layer.base_layer.weight, layer.base_layer.bias
    w0.requires_grad_(True)
    bias.requires_grad_(True)
    model.train()
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
    torch.manual_seed(7)
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()

    wr, br = (t.detach().clone().requires_grad_() for t in (w0, bias))
    xd = x * keep_mask(x, p, seed) / (1 - p) if p > 0 else x
    c = v.m.detach() / (wr + v.scale * v.B.detach() @ v.A.detach()).norm(dim=1).detach()
    lora = F.linear(F.linear(xd, v.A.detach()), v.B.detach())
    ref = F.linear(x, wr, br) + (c - 1) * F.linear(xd, wr) + c * v.scale * lora
    (ref * weights).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w0.grad, wr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias.grad, br.grad, atol=1e-5, rtol=1e-5)


def dropped_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An input, a keep-mask dropping about 10% (one row keeps everything: an empty bag) and a weight."""
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(64, 40, generator=gen), torch.randn(24, 40, generator=gen)
    keep = keep_mask(x, 0.1, 5)
    assert 0 < (~keep).sum() < 0.2 * keep.numel()
    keep[3] = True
    return x, keep, w


def test_products_with_the_dropped_inputs_equal_the_dense_products() -> None:
    x, keep, w = dropped_case()
    flat = (~keep).view(-1).nonzero().squeeze(1)
    at = dropped_at(flat, keep.shape)
    values = dropped_values(x, flat)
    torch.testing.assert_close(values, x[~keep])
    dropped = x * ~keep
    torch.testing.assert_close(product_on_dropped(values, w, at), dropped @ w.t(), atol=1e-5, rtol=1e-5)
    g = torch.randn(64, 24, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(product_at_dropped(g, w, at), (g @ w)[~keep], atol=1e-5, rtol=1e-5)
    gz = torch.randn(64, 3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(gram_on_dropped(gz, values, at, 40), gz.t() @ dropped, atol=1e-5, rtol=1e-5)


def test_the_dropped_input_forms_and_the_dense_products_give_the_same_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []

    def counted(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return product_at_dropped(*args)

    def grads(kernel: str) -> list[torch.Tensor]:
        model, x = make_case("linear")
        lorakit.apply(model, "dora", targets=["layer"], rank=4, alpha=8.0, dropout=0.1)
        layer, v = model.layer, model.layer.variant
        perturb(v)
        x = x.clone().requires_grad_()
        torch.manual_seed(3)
        KERNELS[kernel].run(layer, x, v.form(layer)).square().sum().backward()
        return [x.grad, v.A.grad, v.B.grad, v.m.grad]

    monkeypatch.setattr(dora_positions.dropped, "product_at_dropped", counted)
    folded = grads("dora_positions")
    assert calls == [1]  # the folded backward ran
    dense = grads("dora")  # as on a GPU: dense products
    assert calls == [1]
    for got, want in zip(folded, dense, strict=True):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_base_layer_whose_output_a_hook_changes_keeps_the_definition_with_dropout() -> None:
    """``W0 x~`` may be taken as ``y - W0 (x * dropped)`` only where ``y`` is exactly ``W0 x + b0``."""
    model, x = make_case("linear")
    lorakit.apply(model, "dora", targets=["layer"], rank=4, alpha=8.0, dropout=0.1)
    v, layer = model.layer.variant, model.layer
    perturb(v)
    layer.base_layer.register_forward_hook(lambda m, i, out: out * 1.5 + 0.25)
    model.train()
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    torch.manual_seed(7)
    out = model(x)
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias
    xd = x * keep_mask(x, 0.1, seed) / 0.9
    c = v.m / (w0 + v.scale * v.B @ v.A).norm(dim=1)
    y = F.linear(x, w0, b0) * 1.5 + 0.25
    expected = y + (c - 1) * F.linear(xd, w0) + c * v.scale * F.linear(F.linear(xd, v.A), v.B)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
