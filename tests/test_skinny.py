"""Rank-thin products: the same numbers in row blocks on several threads as in one product."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.kernels import skinny
from lorakit.kernels.skinny import gram_rank_first, rank_first, rank_gram


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n", [512, 510, 8])  # 510 and 8 do not split into four blocks of 64 rows or more
def test_blocked_products_equal_the_plain_ones(n: int, four_threads: None) -> None:
    gen = torch.Generator().manual_seed(0)
    m, rows, g, z = (
        torch.randn(*shape, generator=gen, dtype=torch.float64)
        for shape in ((8, 96), (n, 96), (n, 40), (n, 8))
    )
    assert skinny._blocks(n, rows) == (4 if n == 512 else 1)
    z_first = rank_first(m, rows)
    assert (
        z_first.shape == (n, 8) and z_first.t().is_contiguous()
    )  # the transposed view the next product reads
    torch.testing.assert_close(z_first, rows @ m.t())
    torch.testing.assert_close(rank_gram(z.t(), g), z.t() @ g)
    torch.testing.assert_close(gram_rank_first(g, z), g.t() @ z)


def test_non_contiguous_rows_are_not_split(four_threads: None) -> None:
    rows = torch.randn(96, 512).t()
    assert skinny._blocks(512, rows) == 1
    torch.testing.assert_close(rank_first(torch.randn(8, 96), rows).shape, torch.Size([512, 8]))


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_a_layer_trains_to_the_same_gradients_on_one_thread_and_on_four(variant: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 32))
    model = lorakit.apply(model, variant, targets=["0", "2"], rank=8, dropout=0.1).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, 128, 64, requires_grad=True)  # N = 512 rows: four blocks of 128
    grads = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            torch.manual_seed(3)  # the same dropout masks
            model(x).square().sum().backward()
            grads.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
            model.zero_grad(set_to_none=True)
            x.grad = None
    finally:
        torch.set_num_threads(before)
    for one, four in zip(*grads, strict=True):
        assert one.abs().max() > 0
        torch.testing.assert_close(four, one, atol=1e-4, rtol=1e-4)
