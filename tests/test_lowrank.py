"""The memory-lean low-rank kernel's function: exact gradients, dropout mask regenerated identically, no input
copy; and the mask draws (plain, and as gaps on a CPU)."""

from __future__ import annotations

import pytest
import torch

from lorakit.core.dropout import draw_keep_mask, keep_mask
from lorakit.kernels import gaps as gap_draw
from lorakit.kernels.gaps import drawn_as_gaps, dropped_indices
from lorakit.kernels.lowrank import _LowRankFunction


def low_rank(x, a, b, y, scale, p, seed, w0=None, bias=None):
    """The function as its kernels call it: from the dropped positions where the mask is drawn as gaps."""
    return _LowRankFunction.apply(x, a, b, y, scale, p, seed, w0, bias, drawn_as_gaps(p))


def reference(x, a, b, scale, p, seed):
    x_in = x * keep_mask(x, p, seed) / (1 - p) if p > 0 else x
    return scale * (x_in @ a.t()) @ b.t()


@pytest.mark.parametrize("with_y", [False, True])  # with y: the base output accumulated in the product
@pytest.mark.parametrize("p", [0.0, 0.1, 0.3])  # 0.1: the products from the dropped positions; 0.3: the mask
def test_gradients_match_plain_autograd_with_and_without_dropout(p: float, with_y: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 5, 7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    inputs = (x, a, b, y) if with_y else (x, a, b)
    out = low_rank(x, a, b, y if with_y else None, 1.5, p, 1234)
    ref = reference(x, a, b, 1.5, p, 1234) + (y if with_y else 0)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g)
    ref_grads = torch.autograd.grad(ref, inputs, g)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(
        lambda x, a, b, *y: low_rank(x, a, b, y[0] if y else None, 1.5, p, 99), inputs
    )


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_saves_the_input_and_the_dropped_positions_or_a_boolean_mask_not_a_dropped_copy(p: float) -> None:
    x = torch.randn(64, 32, requires_grad=True)
    a, b = torch.randn(4, 32, requires_grad=True), torch.zeros(16, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        low_rank(x, a, b, None, 2.0, p, 7)
    big = [t for t in saved if t.numel() == x.numel() and t.dtype != torch.bool]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    if p < 0.25:  # rows, columns (int32) and row offsets of the dropped inputs, no mask
        dropped = (~keep_mask(x, p, 7)).sum().item()
        assert sorted(t.numel() for t in saved if t.dtype == torch.int32) == [64, dropped, dropped]
        assert not any(t.dtype == torch.bool for t in saved)
    else:
        assert sum(t.numel() == x.numel() for t in saved) == 2  # x itself and its 1-byte mask


def test_autocast_computes_in_bf16_and_returns_fp32_gradients() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 32, requires_grad=True)
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _LowRankFunction.apply(x, a, b, None, 0.5, 0.2, 11, None, None, False)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    ref = reference(
        x.detach().requires_grad_(), a.detach().requires_grad_(), b.detach().requires_grad_(), 0.5, 0.2, 11
    )
    assert x.grad.dtype == a.grad.dtype == b.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_the_keep_mask_has_the_dropout_rate_everywhere_and_is_reproducible() -> None:
    x = torch.empty(1000, 8, 97)  # an element count that is not a multiple of 4
    for p in (0.05, 0.3):
        masks = torch.stack([keep_mask(x, p, seed) for seed in range(8)]).float()
        assert abs(masks.mean().item() - (1 - p)) < 0.003
        # every element slot mod 4 (the comparison draw's positions in a 64-bit word), every feature and every
        # row (the gap draw's tail) drops at the rate p
        assert (masks.mean(dim=(0, 2, 3)) - (1 - p)).abs().max() < 0.03
        by_slot = masks.flatten(1).view(8, -1, 4).mean(dim=(0, 1))
        torch.testing.assert_close(by_slot, torch.full((4,), 1 - p), atol=0.01, rtol=0)
        assert (masks.mean(dim=(0, 1)) - (1 - p)).abs().max() < 0.03
        # neighbours are independent: P(both kept) = (1 - p)^2
        both = (masks[..., 1:] * masks[..., :-1]).mean().item()
        assert abs(both - (1 - p) ** 2) < 0.005
    assert torch.equal(keep_mask(x, 0.1, 5), keep_mask(x, 0.1, 5))
    assert not torch.equal(keep_mask(x, 0.1, 5), keep_mask(x, 0.1, 6))


def test_gap_draws_are_the_dropped_elements_and_do_not_depend_on_the_batching(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = torch.empty(300, 50)
    flat = dropped_indices(x.numel(), 0.05, 7, x.device)
    assert torch.equal(flat, (~keep_mask(x, 0.05, 7)).view(-1).nonzero().squeeze(1))
    assert flat.numel() == flat.unique().numel() and 0 <= flat.min() and flat.max() < x.numel()
    # the geometric gaps: P(gap = 1) = p, mean 1 / p (about 750 gaps here)
    gaps = torch.diff(dropped_indices(200_000, 0.05, 8, x.device)).float()
    assert abs(gaps.mean().item() - 20) < 0.6 and abs((gaps == 1).float().mean().item() - 0.05) < 0.005
    # a shortfall (forced: three gaps per draw) draws again from where it stopped, on the same random stream
    monkeypatch.setattr(gap_draw, "_gap_count", lambda remaining, p: 3)
    torch.testing.assert_close(dropped_indices(x.numel(), 0.05, 7, x.device), flat, rtol=0, atol=0)


def test_a_drop_rate_next_to_one_still_keeps_a_few() -> None:
    mask = draw_keep_mask(torch.empty(200_000), 1 - 1e-7, seed=0)
    assert 0 < mask.sum().item() < 20  # 2**-16 of the elements, not all of them
