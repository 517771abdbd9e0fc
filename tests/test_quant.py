"""NF4 quantisation (QLoRA, arXiv:2305.14314): bit-identity with bitsandbytes, error bounds, NF4Linear."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.core import quant
from lorakit.core.nf4_linear import NF4Linear
from lorakit.core.quant import NF4_VALUES, NF4Tensor, dequantize_nf4, dynamic_map, quantize_nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Largest distance from a value in [-1, 1] to its nearest NF4 level: half the widest gap (0.7230 .. 1.0).
HALF_GAP = max(b - a for a, b in zip(NF4_VALUES, NF4_VALUES[1:], strict=False)) / 2


@pytest.fixture(scope="module")
def bnbf() -> Any:
    bnb = pytest.importorskip("bitsandbytes")
    # The oracle is bitsandbytes 0.50's CPU kernels; other releases quantise the nested scales differently.
    if not bnb.__version__.startswith("0.50."):
        pytest.skip(f"bit-identity is pinned to bitsandbytes 0.50.x, found {bnb.__version__}")
    return pytest.importorskip("bitsandbytes.functional")


def _weight(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def _assert_matches_bnb(
    bnbf: Any,
    w: Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    dequant_dtypes: tuple[torch.dtype, ...] = tuple(DTYPES),
) -> None:
    packed, state = bnbf.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
    )
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == packed.shape
    assert torch.equal(q.packed, packed)
    if double_quant:
        assert q.absmax is None
        assert torch.equal(q.absmax_codes, state.absmax)
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.offset, state.offset)
        assert torch.equal(dynamic_map(), state.state2.code)
        assert state.state2.blocksize == 256
    else:
        assert q.absmax_codes is None and q.nested_absmax is None and q.offset is None
        assert torch.equal(q.absmax, state.absmax)
    assert q.absmax is None or q.absmax.dtype == torch.float32
    # bitsandbytes 0.50's native CPU dequantiser indexes blocks row by row and gets rows wrong whenever the
    # last dim is not a multiple of the blocksize; its flat layout (as on CUDA and in its reference kernel)
    # is what quantize_4bit writes, so dequantise the flat view and reshape.
    state.shape = torch.Size([w.numel()])
    for dtype in dequant_dtypes:
        state.dtype = dtype
        # Odd sizes take bitsandbytes' torch.compile'd fallback; compiling it would dominate the test time.
        with torch.compiler.set_stance("force_eager"):
            expected = bnbf.dequantize_4bit(packed, state).reshape(w.shape)
        got = dequantize_nf4(q, dtype)
        assert got.dtype == dtype and got.shape == w.shape
        assert torch.equal(got, expected)


# --- bit-identity with bitsandbytes ------------------------------------------------------------------------
def test_code_tables_match_bitsandbytes(bnbf: Any) -> None:
    assert torch.equal(torch.tensor(NF4_VALUES), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (33, 17), (130,), (7,), (1,), (3, 5, 7)])
def test_bit_identical_to_bitsandbytes(
    bnbf: Any, shape: tuple[int, ...], dtype: torch.dtype, double_quant: bool
) -> None:
    _assert_matches_bnb(bnbf, _weight(shape, dtype), double_quant=double_quant)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024])
def test_bit_identical_other_blocksizes(bnbf: Any, blocksize: int, double_quant: bool) -> None:
    _assert_matches_bnb(bnbf, _weight((96, 200)), blocksize=blocksize, double_quant=double_quant)


def _special_weights() -> dict[str, Tensor]:
    w = _weight((256, 256))
    w[3] = 0.0  # all-zero blocks: absmax 0
    w[:, 7] = 5.0  # outliers in every block
    tail = torch.zeros(130)
    tail[:64] = 1.0  # a zero short last block: its stored absmax is the 1e-38 floor
    g = torch.Generator().manual_seed(1)
    # Block scales spread over six decades, so double quantisation uses the whole dynamic map.
    wide = torch.randn(512, 128, generator=g) * torch.logspace(-6, 0, 512).unsqueeze(1)
    return {
        # 1205 blocks: several nested blocks of 256 scales and a short last one.
        "nested_tail_block": _weight((300, 257)),
        "zeros_and_outliers": w,
        "signs": torch.sign(torch.randn(512, 512, generator=g)),  # equal absmax everywhere: nested absmax 0
        "ones": torch.ones(300, 65),
        "all_zero": torch.zeros(100, 3),
        "zero_tail_block": tail,
        "wide_range": wide,
    }


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("name", list(_special_weights()))
def test_bit_identical_special_weights(bnbf: Any, name: str, double_quant: bool) -> None:
    _assert_matches_bnb(bnbf, _special_weights()[name], double_quant=double_quant)


@pytest.mark.parametrize("double_quant", [True, False])
def test_bit_identical_subnormal_scales(bnbf: Any, double_quant: bool) -> None:
    # Subnormal block scales: the nested 1/absmax overflows to inf, and 0 * inf gives NaN inside bitsandbytes.
    # Not bf16 output: bitsandbytes converts with AVX512-BF16 where the CPU has it, flushing subnormals to 0.
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(2)) * 1e-39
    _assert_matches_bnb(bnbf, w, double_quant=double_quant, dequant_dtypes=(torch.float32, torch.float16))


def test_bit_identical_large_weight(bnbf: Any, big_weight: Tensor) -> None:
    # 65536 block scales: 256 nested blocks exercise every dynamic-map code bitsandbytes' lookup table yields.
    _assert_matches_bnb(bnbf, big_weight)


def test_ties_go_to_the_lower_level(bnbf: Any) -> None:
    levels = torch.tensor(NF4_VALUES)
    midpoints = (levels[:-1] + levels[1:]) / 2
    # absmax 1 makes every value its own normalised value, so each sits exactly on a midpoint.
    w = torch.cat([torch.ones(1), midpoints, torch.zeros(64 - 16)])
    q = quantize_nf4(w, double_quant=False)
    codes = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 15], 1).view(-1)
    assert codes[1:16].tolist() == list(range(15))
    _assert_matches_bnb(bnbf, w, double_quant=False)


def test_layout_first_element_in_high_nibble() -> None:
    # Levels -1 (code 0) then 1 (code 15), and an odd numel padded with a zero (code 7).
    q = quantize_nf4(torch.tensor([-1.0, 1.0, 1.0]), double_quant=False)
    assert q.packed.view(-1).tolist() == [0x0F, 0xF7]
    assert q.absmax.tolist() == [1.0]


# --- accuracy and storage --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_weight() -> Tensor:
    return _weight((2048, 2048), seed=3)


@pytest.fixture(scope="module")
def big_plain(big_weight: Tensor) -> NF4Tensor:
    return quantize_nf4(big_weight, double_quant=False)


@pytest.fixture(scope="module")
def big_dq(big_weight: Tensor) -> NF4Tensor:
    return quantize_nf4(big_weight)


def test_dequant_error_within_half_a_level(big_weight: Tensor, big_plain: NF4Tensor) -> None:
    q = big_plain
    diff = dequantize_nf4(q) - big_weight
    bound = q.absmax.unsqueeze(1) * HALF_GAP
    assert bool((diff.abs().view(-1, 64) <= bound * (1 + 1e-6)).all())
    rel = diff.norm() / big_weight.norm()
    assert 0.05 < rel.item() < 0.1  # ~0.092 for Gaussian weights


def test_double_quant_error_bound(big_weight: Tensor, big_plain: NF4Tensor, big_dq: NF4Tensor) -> None:
    absmax, absmax_dq = big_plain.absmax, big_dq.block_absmax()
    # The 8-bit scales are off by well under 1% of a typical scale (QLoRA: no measurable accuracy loss).
    assert ((absmax_dq - absmax).abs().max() / absmax.mean()).item() < 0.01
    # w - q*a' = (w - q*a) + q*(a - a') with |q| <= 1.
    diff = dequantize_nf4(big_dq) - big_weight
    bound = absmax.unsqueeze(1) * HALF_GAP + (absmax - absmax_dq).abs().unsqueeze(1)
    assert bool((diff.abs().view(-1, 64) <= bound * (1 + 1e-5)).all())
    rel = diff.norm() / big_weight.norm()
    assert rel.item() < 0.1


def test_storage_bytes(big_weight: Tensor, big_plain: NF4Tensor, big_dq: NF4Tensor) -> None:
    n, dq, plain = big_weight.numel(), big_dq, big_plain
    # n/2 code bytes + n/64 scale codes + n/64/256 fp32 nested scales + the fp32 offset.
    assert dq.nbytes == n // 2 + n // 64 + n // 64 // 256 * 4 + 4
    assert 0.127 <= dq.nbytes / (n * 4) <= 0.135
    assert plain.nbytes == n // 2 + n // 64 * 4
    assert plain.nbytes / (n * 4) == pytest.approx(0.140625)


def test_quantisation_is_vectorised(big_weight: Tensor, big_dq: NF4Tensor) -> None:
    # big_dq has warmed the cached code tables.
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        quantize_nf4(big_weight)
        best = min(best, time.perf_counter() - start)
    # ~0.15 s on an idle 2-core runner; a loop over the 65536 blocks would take tens of seconds. The margin
    # is for loaded CI machines.
    assert best < 2.0


def test_dequantize_defaults_to_original_dtype() -> None:
    q = quantize_nf4(_weight((64, 64), torch.bfloat16))
    assert q.dtype == torch.bfloat16 and q.dequantize().dtype == torch.bfloat16
    assert q.dequantize(torch.float32).dtype == torch.float32
    assert torch.equal(q.to("cpu").dequantize(), q.dequantize())


def test_bnb_state_built_for_cuda_fast_path_is_correct(bnbf: Any) -> None:
    # The CUDA fast path hands our state to bitsandbytes; check that state on CPU (last dim a multiple of 64,
    # where bitsandbytes' CPU kernel is right).
    for double_quant in (True, False):
        q = quantize_nf4(_weight((96, 128)), double_quant=double_quant)
        for dtype in DTYPES:
            assert torch.equal(quant._bnb_dequantize(q, dtype), dequantize_nf4(q, dtype))


# --- NF4Linear -------------------------------------------------------------------------------------------
def _linear(in_features: int = 128, out_features: int = 96, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias)


def test_nf4linear_forward_close_to_dense() -> None:
    dense = _linear()
    layer = NF4Linear.from_linear(dense)
    x = torch.randn(4, 7, 128)
    with torch.no_grad():
        y, ref = layer(x), dense(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert ((y - ref).norm() / ref.norm()).item() < 0.1
    assert layer.compute_dtype == torch.bfloat16
    assert (layer.in_features, layer.out_features) == (128, 96)


def test_nf4linear_forward_is_linear_of_dequantised_weight() -> None:
    dense = _linear()
    layer = NF4Linear.from_linear(dense, compute_dtype=torch.float32, double_quant=False)
    x = torch.randn(5, 128)
    expected = F.linear(x, layer.dequantized_weight(torch.float32), dense.bias)
    assert torch.equal(layer(x), expected)
    assert layer(x.half()).dtype == torch.float16


def test_nf4linear_holds_no_trainable_weight() -> None:
    layer = NF4Linear.from_linear(_linear())
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert not layer.bias.requires_grad
    assert layer.weight_packed.dtype == torch.uint8
    assert set(layer.state_dict()) == {
        "bias",
        "weight_packed",
        "weight_absmax_codes",
        "weight_nested_absmax",
        "weight_offset",
    }
    plain = NF4Linear.from_linear(_linear(bias=False), double_quant=False)
    assert set(plain.state_dict()) == {"weight_packed", "weight_absmax"} and plain.bias is None


def test_nf4linear_backward_matches_dense_reference() -> None:
    layer = NF4Linear.from_linear(_linear(), compute_dtype=torch.float32)
    layer.bias.requires_grad_(True)
    w = layer.dequantized_weight(torch.float32)
    x = torch.randn(3, 4, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = layer.bias.detach().clone().requires_grad_(True)
    grad = torch.randn(3, 4, 96)
    layer(x).backward(grad)
    F.linear(x_ref, w, bias_ref).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.bias.grad, bias_ref.grad)


def test_nf4linear_dtype_casts_keep_fp32_scales() -> None:
    layer = NF4Linear.from_linear(_linear())
    before = layer.dequantized_weight(torch.float32)
    layer.half()
    layer.to(torch.bfloat16)
    assert layer.weight_nested_absmax.dtype == torch.float32 and layer.weight_offset.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantized_weight(torch.float32), before)
    layer.to("cpu")
    assert torch.equal(layer.dequantized_weight(torch.float32), before)


def test_nf4linear_state_dict_round_trip() -> None:
    layer = NF4Linear.from_linear(_linear())
    other = NF4Linear.from_linear(nn.Linear(128, 96))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.dequantized_weight(), layer.dequantized_weight())


def test_nf4linear_to_linear() -> None:
    dense = _linear().to(torch.bfloat16)
    layer = NF4Linear.from_linear(dense)
    back = layer.to_linear()
    assert type(back) is nn.Linear and back.weight.dtype == torch.bfloat16
    assert torch.equal(back.weight, layer.dequantized_weight())
    assert torch.equal(back.bias, dense.bias)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(back(x), layer(x))


def test_nf4linear_is_a_linear_kind() -> None:
    from lorakit.core.kinds import kind_of

    layer = NF4Linear.from_linear(_linear())
    kind = kind_of(layer)
    assert kind is not None and kind.name == "linear"
    assert kind.shape_2d(layer) == (96, 128)
    assert torch.equal(kind.weight_2d(layer), layer.dequantized_weight())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dequantise_matches_cpu() -> None:
    q = quantize_nf4(_weight((256, 320)))
    layer = NF4Linear.from_linear(_linear()).cuda()
    assert torch.equal(q.to("cuda").dequantize(torch.bfloat16).cpu(), q.dequantize(torch.bfloat16))
    assert layer(torch.randn(2, 128, device="cuda")).device.type == "cuda"


# --- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: quantize_nf4(torch.arange(64)), TypeError, "float32/float16/bfloat16"),
        (lambda: quantize_nf4(torch.zeros(64, dtype=torch.uint8)), TypeError, "already quantised"),
        (lambda: quantize_nf4(torch.zeros(64, dtype=torch.float64)), TypeError, r"\.float\(\)"),
        (lambda: quantize_nf4([1.0, 2.0]), TypeError, "torch.Tensor"),
        (lambda: quantize_nf4(torch.ones(64), quant_type="fp4"), ValueError, "quant_type must be 'nf4'"),
        (lambda: quantize_nf4(torch.ones(64), blocksize=48), ValueError, "blocksize must be one of"),
        (lambda: quantize_nf4(torch.empty(0, 4)), ValueError, "empty"),
        (lambda: quantize_nf4(torch.tensor([1.0, float("nan")])), ValueError, "NaN or Inf"),
        (lambda: quantize_nf4(torch.tensor([1.0, float("inf")])), ValueError, "NaN or Inf"),
        (lambda: dequantize_nf4(quantize_nf4(torch.ones(64)), torch.int32), TypeError, "dequantise"),
        (lambda: NF4Linear.from_linear(NF4Linear.from_linear(_linear())), TypeError, "already NF4-quantised"),
        (lambda: NF4Linear.from_linear(nn.Conv1d(2, 2, 1)), TypeError, "expects an nn.Linear"),
        (lambda: NF4Linear.from_linear(_linear(), compute_dtype=torch.int32), TypeError, "compute_dtype"),
        (lambda: NF4Linear.from_linear(_linear(), quant_type="fp4"), ValueError, "quant_type"),
        (lambda: NF4Linear(quantize_nf4(torch.ones(64)), compute_dtype=torch.float32), ValueError, "2-D"),
        (lambda: NF4Linear.from_linear(_linear())(torch.ones(2, 128, dtype=torch.long)), TypeError, "float"),
    ],
)
def test_errors(call: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_inconsistent_nf4tensor_is_rejected() -> None:
    q = quantize_nf4(torch.ones(64))
    with pytest.raises(ValueError, match="either `absmax` or all of"):
        NF4Tensor(q.packed, torch.ones(1), q.absmax_codes, None, None, q.shape, q.dtype)
    with pytest.raises(ValueError, match="either `absmax` or all of"):
        NF4Tensor(q.packed, None, q.absmax_codes, None, q.offset, q.shape, q.dtype)


def test_nf4linear_from_gpt2_conv1d_quantises_the_transposed_weight() -> None:
    from transformers.pytorch_utils import Conv1D

    from lorakit.core.kinds import kind_of

    torch.manual_seed(0)
    conv = Conv1D(96, 128)  # nf = out, nx = in: weight stored (in, out)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    layer = NF4Linear.from_linear(conv, compute_dtype=torch.float32)
    ref = quantize_nf4(conv.weight.t().contiguous())  # (out, in), as bitsandbytes' transformers integration
    assert torch.equal(layer.weight_packed, ref.packed) and torch.equal(
        layer.weight_absmax_codes, ref.absmax_codes
    )
    assert (layer.out_features, layer.in_features) == (96, 128) and kind_of(layer).name == "conv1d_gpt2"
    deq = layer.dequantized_weight(torch.float32)
    assert deq.shape == conv.weight.shape and torch.equal(deq.t(), ref.dequantize(torch.float32))
    x = torch.randn(3, 5, 128)
    dense = Conv1D(96, 128)
    with torch.no_grad():
        dense.weight.copy_(deq)
        dense.bias.copy_(conv.bias)
        torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)
        back = layer.to_dense()
        assert type(back) is Conv1D and torch.equal(back.weight, deq) and torch.equal(back.bias, conv.bias)
        torch.testing.assert_close(back(x), layer(x), atol=1e-5, rtol=1e-5)
