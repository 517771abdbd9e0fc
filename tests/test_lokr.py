"""LoKr: factorization, the Kronecker formula, the vec-trick forward, parameter counts, PEFT parity."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from layer_zoo import Holder, make_case, perturb
from torch import nn

import lorakit
from lorakit.core.dropout import keep_mask
from lorakit.core.kinds import KINDS
from lorakit.core.layer import AdaptedLayer
from lorakit.kernels.kronecker import KroneckerProduct
from lorakit.variants.lokr import LoKr, LoKrConfig, factorization
from lorakit.variants.lora import LoRA, LoRAConfig


@pytest.mark.parametrize(
    ("dim", "factor", "expected"),
    [
        (768, -1, (24, 32)),
        (4096, -1, (64, 64)),
        (11008, -1, (86, 128)),
        (127, -1, (1, 127)),
        (128, 4, (4, 32)),
        (128, 64, (2, 64)),
        (100, 7, (5, 20)),
    ],
)
def test_factorization_examples(dim: int, factor: int, expected: tuple[int, int]) -> None:
    assert factorization(dim, factor) == expected


def test_factorization_matches_peft_and_lycoris() -> None:
    peft_factorization = pytest.importorskip("peft.tuners.lokr.layer").factorization
    dims = [*range(1, 1200), 2304, 3072, 5120, 11008, 14336]
    assert all(factorization(n) == peft_factorization(n) for n in dims)
    # A dividing factor above sqrt(dim): PEFT's copy returns (factor, dim / factor) unswapped; VARIANTS.md and
    # current LyCORIS put the smaller first. Otherwise the results are identical.
    for f in (1, 2, 3, 4, 8, 16, 64):
        assert all(factorization(n, f) == tuple(sorted(peft_factorization(n, f))) for n in dims)


def test_prime_dimension_warns_naming_the_layer() -> None:
    with pytest.warns(UserWarning, match=r"\(127 x 768\) layer: dimension 127 only factors as \(1, 127\)"):
        lorakit.apply(Holder(nn.Linear(768, 127)), "lokr", targets=["layer"], rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.apply(Holder(nn.Linear(768, 3072)), "lokr", targets=["layer"], rank=4)


def test_parameter_count_4096_at_rank_8() -> None:
    # 4096 = 64 * 64 on both sides; W1 (64, 64) full = 4096; W2 = W2a W2b as 8 < 64 / 2: 64*8 + 8*64 = 1024.
    def count(variant, config) -> int:
        layer = AdaptedLayer(nn.Linear(4096, 4096, device="meta"), KINDS["linear"], variant, config, {})
        return sum(p.numel() for p in layer.variant.parameters())

    assert count(LoKr, LoKrConfig(rank=8)) == 5120
    assert count(LoRA, LoRAConfig(rank=8)) == 65536
    # rank(kron(W1, W2)) = rank(W1) rank(W2): up to 64 * 8 = 512 there; 16 * 2 = 32 for a 256 x 256 layer.
    model = Holder(nn.Linear(256, 256))
    lorakit.apply(model, "lokr", targets=["layer"], rank=2)
    perturb(model)
    v = model.layer.variant
    w1, w2 = v.W1.detach().double(), v.W2a.detach().double() @ v.W2b.detach().double()
    assert w1.shape == (16, 16) and w2.shape == (16, 16)
    assert torch.linalg.matrix_rank(torch.kron(w1, w2)) == 32


@pytest.mark.parametrize(
    ("rank", "decompose_both", "params"),
    [(1, False, {"W1", "W2a", "W2b"}), (1, True, {"W1a", "W1b", "W2a", "W2b"}), (4, False, {"W1", "W2"})],
)
def test_one_zero_factor_at_init_and_decomposition_rule(
    rank: int, decompose_both: bool, params: set[str]
) -> None:
    # Linear(12, 10): d_out 10 = 2 * 5 (a, b), d_in 12 = 3 * 4 (c, d); W2 low rank iff r < 2.5, W1 iff r < 1.5
    model, x = make_case("linear")
    base = model(x).detach()
    lorakit.apply(model, "lokr", targets=["layer"], rank=rank, decompose_both=decompose_both, dropout=0.0)
    v = model.layer.variant
    assert {n for n, _ in v.named_parameters()} == params
    zero = v.W1 if v.W1 is not None else v.W1a  # PEFT's default init_weights=True
    assert torch.count_nonzero(zero) == 0
    assert all(torch.count_nonzero(p) == p.numel() for p in v.parameters() if p is not zero)
    assert torch.equal(model(x), base)


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2"])
@pytest.mark.parametrize("rank", [1, 4])
def test_vec_trick_forward_equals_explicit_kron(kind: str, rank: int) -> None:
    model, x = make_case(kind)
    w0, b0 = KINDS[kind].weight_2d(model.layer).detach().clone(), model.layer.bias.detach().clone()
    lorakit.apply(model, "lokr", targets=["layer"], rank=rank, alpha=3.0, decompose_both=True, dropout=0.0)
    perturb(model)
    v = model.layer.variant
    w1, w2 = v.factors()  # (2, 3), (5, 4)
    # kron's definition, written out: dW[i b + j, p d + q] = s W1[i, p] W2[j, q].
    by_index = torch.einsum("ip,jq->ijpq", w1, w2).reshape(10, 12) * (3.0 / rank)
    torch.testing.assert_close(v.delta_weight(), by_index)
    torch.testing.assert_close(model(x), F.linear(x, w0 + by_index, b0), atol=1e-5, rtol=1e-5)
    # With dropout the vec trick sees the dropped input of the explicit product (the mask from the same seed).
    v.dropout = nn.Dropout(0.5)
    model.train()
    torch.manual_seed(1)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # the seed the forward draws for its mask
    torch.manual_seed(1)
    out = model(x)
    expected = F.linear(x, w0, b0) + F.linear(x * keep_mask(x, 0.5, seed) / 0.5, by_index)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_scale_is_alpha_over_rank_even_with_full_factors() -> None:
    # LyCORIS would use s = 1 here (both factors full); PEFT and lorakit keep alpha / r.
    model = Holder(nn.Linear(12, 10))
    lorakit.apply(model, "lokr", targets=["layer"], rank=4, alpha=2.0)
    v = model.layer.variant
    assert v.W1 is not None and v.W2 is not None and v.scale == 0.5


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "conv2d"])
def test_merge_adds_delta_exactly_once(kind: str) -> None:
    model, _ = make_case(kind)
    w0 = model.layer.weight.detach().clone()
    lorakit.apply(model, "lokr", targets=["layer"], rank=1, alpha=3.0, dropout=0.0)  # s = 3
    perturb(model)
    layer = model.layer
    with torch.no_grad():
        kron = torch.kron(*layer.variant.factors())
        once = w0 + layer.kind.from_2d(layer.base_layer, 3.0 * kron)
    plain = lorakit.merge(model)
    torch.testing.assert_close(plain.layer.weight, once, atol=1e-6, rtol=0)
    assert (plain.layer.weight - w0).abs().max() > 1e-2


def test_bad_factor_is_rejected_naming_the_field() -> None:
    with pytest.raises(lorakit.ConfigError, match="'factor'"):
        LoKrConfig(factor=0)


@pytest.mark.parametrize(
    ("layer", "x_shape", "rank", "decompose_both"),
    [
        (lambda: nn.Linear(64, 48), (3, 5, 64), 2, False),  # W1 full, W2 = W2a W2b
        (lambda: nn.Linear(64, 48), (3, 5, 64), 2, True),  # both low rank
        (lambda: nn.Linear(64, 48), (3, 5, 64), 8, False),  # both full
        (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 6, 6), 1, False),  # W2 = W2a W2b, (4, 1) (1, 4 * 9)
        (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 6, 6), 2, False),  # W2 full, (4, 4, 3, 3) in PEFT
    ],
    ids=["linear-w2-lowrank", "linear-both-lowrank", "linear-full", "conv2d-w2-lowrank", "conv2d-full"],
)
def test_parity_with_peft_lokr(layer, x_shape, rank: int, decompose_both: bool) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs, ours = Holder(layer()), Holder(layer())
    ours.load_state_dict(theirs.state_dict())
    config = peft.LoKrConfig(r=rank, alpha=3, target_modules=["layer"], decompose_both=decompose_both)
    theirs = peft.get_peft_model(theirs, config)
    lorakit.apply(
        ours, "lokr", targets=["layer"], rank=rank, alpha=3.0, decompose_both=decompose_both, dropout=0.0
    )
    pl, v = theirs.base_model.model.layer, ours.layer.variant
    perturb(pl)  # only the LoKr factors train in the PEFT model
    names = {"W1": "lokr_w1", "W1a": "lokr_w1_a", "W1b": "lokr_w1_b"}  # lorakit name -> PEFT name
    names |= {"W2": "lokr_w2", "W2a": "lokr_w2_a", "W2b": "lokr_w2_b"}
    with torch.no_grad():
        assert {names[n] for n, _ in v.named_parameters()} == {
            n.split(".")[0] for n, _ in pl.named_parameters() if n.startswith("lokr_")
        }
        for n, mine in v.named_parameters():
            mine.copy_(getattr(pl, names[n])["default"].reshape(mine.shape))
    theirs.eval(), ours.eval()
    x = torch.randn(x_shape)
    with torch.no_grad():
        out_theirs, out_ours = theirs(x), ours(x)
        assert (out_theirs - pl.base_layer(x)).abs().max() > 1e-2  # the adapter is not trivially zero
        assert (out_theirs - out_ours).abs().max() <= 1e-5
        merged_theirs = theirs.merge_and_unload().layer.weight
        merged_ours = lorakit.merge(ours).layer.weight
    assert torch.equal(merged_ours, merged_theirs)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_kronecker_function_gradients_equal_plain_autograd(p: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = (
        torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in [(3, 5, 12), (2, 3), (5, 4)]
    )
    weights = torch.randn(3, 5, 2, 5, generator=gen, dtype=torch.float64)  # a generic upstream gradient
    ours = [t.clone().requires_grad_() for t in (x, w1, w2)]
    mask = keep_mask(x, p, 11) if p > 0 else None
    out = KroneckerProduct.apply(*ours, (3, 4), 0.7, p, mask)
    (out * weights).sum().backward()
    ref = [t.clone().requires_grad_() for t in (x, w1, w2)]
    xd = ref[0] * mask / (1 - p) if p > 0 else ref[0]
    expected = 0.7 * ref[1] @ xd.unflatten(-1, (3, 4)) @ ref[2].t()  # (3, 5, 2, 5)
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip(ours, ref, strict=True):
        assert want.grad.abs().max() > 0
        torch.testing.assert_close(got.grad, want.grad)
    # the same values through the explicit Kronecker product: out = s kron(W1, W2) x~
    torch.testing.assert_close(out.flatten(-2), F.linear(xd, 0.7 * torch.kron(w1, w2)))
