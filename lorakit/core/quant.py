"""4-bit NormalFloat (NF4) weight quantisation, as in QLoRA (Dettmers et al. 2023, arXiv:2305.14314).

QLoRA stores a frozen base weight in 4 bits and trains LoRA adapters on top of it. This module is a
pure-PyTorch NF4 quantiser that is bit-identical to ``bitsandbytes`` 0.50 on CPU, so weights quantised here
can be handed to bitsandbytes (and back) and tests do not need a GPU:

- NF4 (paper section 3, "4-bit NormalFloat"): the weight is flattened and cut into blocks of ``blocksize``
  (64) values; each block is divided by its absolute maximum and every value is replaced by the index of the
  nearest of the 16 NF4 levels (:data:`NF4_VALUES`; ties go to the lower level). Two 4-bit indices are packed
  per byte, the first element in the high nibble. A last, shorter block is allowed.
- Double quantisation (paper section 3, "Double Quantization"): the fp32 block absmax constants, minus their
  mean (the ``offset``), are quantised again to 8 bits with bitsandbytes' signed dynamic map
  (:func:`dynamic_map`) in blocks of 256, keeping one fp32 absmax per 256 constants. This takes the
  constants from 32/64 = 0.5 to 8/64 + 32/(64*256) ~= 0.127 bits per weight.

Dequantisation multiplies the NF4 level by the block absmax in fp32 and only then casts to the requested
dtype, as bitsandbytes does. :class:`NF4Linear` is the frozen 4-bit base layer used by QLoRA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NF4_VALUES",
    "NF4Tensor",
    "dequantize_nf4",
    "dynamic_map",
    "quantize_nf4",
]

#: The 16 NF4 levels (QLoRA eq. 4: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero).
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# Blocksizes bitsandbytes accepts for 4-bit quantisation; accepting only these keeps states interchangeable.
_VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Double quantisation always uses blocks of 256 constants (QLoRA section 3; bitsandbytes hard-codes it).
_NESTED_BLOCKSIZE = 256
# bitsandbytes' CPU 8-bit quantiser maps [-1, 1] onto a 65536-entry grid and looks the code up in a table
# built from that grid, rather than searching the codebook directly; we must do the same to match its bytes.
_LUT_SIZE = 65536
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------------
# Code tables
# --------------------------------------------------------------------------------------------------------
def dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), 256 sorted fp32 values.

    Used for double quantisation (QLoRA section 3). It is a dynamic-exponent format (Dettmers 2016,
    arXiv:1511.04561): for each decade ``10**-6 .. 10**0`` the midpoints of ``2**i`` evenly spaced steps in
    ``[0.1, 1]``, both signs, plus 0 and 1. The arithmetic below mirrors bitsandbytes step for step (fp32
    linspace and means, then a float list) so the values are bit-identical.
    """
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-6 + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@functools.cache
def _nf4_code(device: torch.device) -> Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


@functools.cache
def _nf4_bounds(device: torch.device) -> Tensor:
    # Midpoints between neighbouring levels, computed in fp32 exactly as bitsandbytes does.
    code = _nf4_code(device)
    return (code[:-1] + code[1:]) / 2


_DYNAMIC_MAP = dynamic_map()  # built once: built under torch.compile, its Python float list breaks the graph


@functools.cache
def _dynamic_code(device: torch.device) -> Tensor:
    return _DYNAMIC_MAP.to(device)


@functools.cache
def _dynamic_lut(device: torch.device) -> Tensor:
    # Grid point i of [-1, 1] is (2i / 65535) - 1 in fp32; its code is the number of codebook midpoints
    # strictly below it (so a grid point on a midpoint takes the lower code), as in bitsandbytes' CPU kernel.
    code = dynamic_map()
    midpoints = (code[:-1] + code[1:]) * 0.5
    grid = torch.arange(_LUT_SIZE, dtype=torch.float32) * 2.0
    grid = grid / torch.full_like(grid, _LUT_SIZE - 1) - 1.0
    return torch.searchsorted(midpoints, grid, right=False).to(device)


# --------------------------------------------------------------------------------------------------------
# The quantised tensor
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class NF4Tensor:
    """A weight stored in NF4 (QLoRA, arXiv:2305.14314), laid out exactly as bitsandbytes stores it.

    Attributes:
        packed: ``uint8 [(numel + 1) // 2, 1]``, two 4-bit level indices per byte, first element in the high
            nibble; an odd numel is padded with one zero value (index 7).
        absmax: ``fp32 [n_blocks]`` block scales, when not double-quantised (else None).
        absmax_codes: ``uint8 [n_blocks]`` 8-bit dynamic-map codes of ``absmax - offset`` (double quant).
        nested_absmax: ``fp32 [ceil(n_blocks / 256)]`` scales of ``absmax_codes`` (double quant).
        offset: ``fp32 []`` mean of the block scales, subtracted before double quantisation.
        shape: the original weight shape.
        dtype: the original weight dtype (the default dtype of :meth:`dequantize`).
        blocksize: values per block of ``packed``.
    """

    packed: Tensor
    absmax: Tensor | None
    absmax_codes: Tensor | None
    nested_absmax: Tensor | None
    offset: Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64

    quant_type: ClassVar[str] = "nf4"

    def __post_init__(self) -> None:
        nested = (self.absmax_codes, self.nested_absmax, self.offset)
        plain = self.absmax is not None and all(t is None for t in nested)
        if not plain and (self.absmax is not None or any(t is None for t in nested)):
            raise ValueError(
                "NF4Tensor needs either `absmax` or all of `absmax_codes`, `nested_absmax` and `offset`; "
                "build it with quantize_nf4()"
            )

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves 8-bit quantised (QLoRA double quantisation)."""
        return self.absmax is None

    @property
    def numel(self) -> int:
        """Number of values in the original weight."""
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Total bytes stored: packed codes plus block scales (or their double-quantised form)."""
        parts = (self.packed, self.absmax, self.absmax_codes, self.nested_absmax, self.offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def block_absmax(self) -> Tensor:
        """The fp32 scale of every block, dequantised first when double-quantised."""
        if self.absmax is not None:
            return self.absmax
        assert self.absmax_codes is not None and self.nested_absmax is not None and self.offset is not None
        nested = self.nested_absmax.repeat_interleave(_NESTED_BLOCKSIZE)[: self.absmax_codes.numel()]
        # Two separate fp32 roundings (multiply, then add the offset), as bitsandbytes does them.
        return _dynamic_code(self.device)[self.absmax_codes.long()] * nested + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight back in ``dtype`` (default: the original dtype); see :func:`dequantize_nf4`."""
        return dequantize_nf4(self, dtype)

    def to(self, device: torch.device | str) -> NF4Tensor:
        """A copy on ``device`` (the stored dtypes never change)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return NF4Tensor(
            packed=self.packed.to(device),
            absmax=move(self.absmax),
            absmax_codes=move(self.absmax_codes),
            nested_absmax=move(self.nested_absmax),
            offset=move(self.offset),
            shape=self.shape,
            dtype=self.dtype,
            blocksize=self.blocksize,
        )


# --------------------------------------------------------------------------------------------------------
# Quantise / dequantise
# --------------------------------------------------------------------------------------------------------
def _check_weight(weight: Any) -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"quantize_nf4 expects a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype == torch.uint8 or weight.dtype == torch.int8:
        raise TypeError(
            f"weight has dtype {weight.dtype}: it looks already quantised; quantise the original float weight"
        )
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"NF4 quantisation needs a float32/float16/bfloat16 weight, got {weight.dtype}; "
            "cast it with .float() first"
        )
    if weight.numel() == 0:
        raise ValueError(
            f"cannot quantise an empty weight (shape {tuple(weight.shape)}): there are no blocks"
        )
    return weight


def _check_finite(absmax: Tensor) -> None:
    # A block absmax is finite exactly when its block is (amax propagates NaN), so this checks the whole
    # weight for a fraction of the cost of isfinite() on it.
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("weight has NaN or Inf values; absmax scaling needs finite weights, fix them first")


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in _VALID_BLOCKSIZES:
        raise ValueError(
            f"blocksize must be one of {_VALID_BLOCKSIZES} (as in bitsandbytes), got {blocksize}"
        )


def _quantize_4bit(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Packed NF4 codes and fp32 block absmax of a flat fp32 tensor (bitsandbytes' CPU op, step for step)."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(full // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    # Multiply by the reciprocal (not divide), with the 1e-38 floor only inside it: an all-zero block keeps
    # a stored absmax of 0. Both details change low bits, and bitsandbytes does exactly this. (It also clamps
    # to [-1, 1]; that cannot change a code, since every midpoint lies inside (-1, 1), so we skip the pass.)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1))).reshape(-1)
    if rem:
        # The short last block divides instead, and stores its floored absmax.
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, flat[full:] / tail_absmax])
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))
    # bucketize(right=False) puts a value equal to a midpoint in the lower bucket: ties go to the lower level.
    codes = torch.bucketize(scaled, _nf4_bounds(flat.device), out_int32=True).to(torch.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)
    return packed, absmax


def _quantize_dynamic_8bit(values: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """uint8 dynamic-map codes and fp32 block absmax of a flat fp32 tensor (bitsandbytes' CPU kernel)."""
    n = values.numel()
    n_blocks = -(-n // blocksize)
    # Zero padding never changes a block's absmax, and the padded codes are dropped below.
    blocks = F.pad(values, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.ones_like(absmax) / absmax
    normed = torch.clamp(blocks * inv.unsqueeze(1), -1.0, 1.0)
    # Grid index = trunc(fma((normed + 1) * 0.5, 65535, 0.5)): the kernel fuses the multiply-add, so do it
    # exactly in fp64 (every term fits in 41 bits) and round once to fp32, as the FMA does.
    grid = (((normed + 1.0) * 0.5).double() * (_LUT_SIZE - 1) + 0.5).float()
    # A NaN (0 * inf when an absmax is subnormal) becomes grid index 0 in the kernel's integer conversion.
    grid = torch.where(torch.isnan(grid), torch.zeros_like(grid), grid)
    codes = _dynamic_lut(values.device)[grid.long()].to(torch.uint8)
    # The kernel writes code 0 for a block whose absmax is exactly 0.
    codes = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n], absmax


def quantize_nf4(
    weight: Tensor, *, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4"
) -> NF4Tensor:
    """Quantise ``weight`` to NF4 with optional double quantisation (QLoRA, arXiv:2305.14314).

    Bit-identical to ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize,
    compress_statistics=double_quant, quant_type="nf4")`` on CPU: same packed bytes, block scales, nested
    codes, nested absmax and offset. Any numel is accepted (the last block may be short). Runs on the
    weight's device with vectorised torch ops only.

    Raises:
        TypeError: ``weight`` is not a float32/float16/bfloat16 tensor (e.g. already quantised).
        ValueError: unknown ``quant_type`` or ``blocksize``, an empty weight, or NaN/Inf values.
    """
    if quant_type != "nf4":
        raise ValueError(
            f"quant_type must be 'nf4' (the only 4-bit type lorakit implements), got {quant_type!r}"
        )
    _check_blocksize(blocksize)
    weight = _check_weight(weight)
    with torch.no_grad():
        flat = weight.detach().reshape(-1).float()
        packed, absmax = _quantize_4bit(flat, blocksize)
        _check_finite(absmax)
        if not double_quant:
            return NF4Tensor(packed, absmax, None, None, None, weight.shape, weight.dtype, blocksize)
        offset = absmax.mean()
        codes, nested_absmax = _quantize_dynamic_8bit((absmax - offset).contiguous(), _NESTED_BLOCKSIZE)
        return NF4Tensor(packed, None, codes, nested_absmax, offset, weight.shape, weight.dtype, blocksize)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Rebuild the weight from ``q`` in ``dtype`` (default: the original dtype), shaped as the original.

    Each value is ``NF4_VALUES[code] * block_absmax`` computed in fp32 and then cast, which is what
    bitsandbytes' ``dequantize_4bit`` computes, so the result is bit-identical to it. (Blocks run over the
    flattened weight, as bitsandbytes writes them and its CUDA kernel reads them; its 0.50 native CPU kernel
    misreads the scales of a 2-D weight whose last dim is not a multiple of ``blocksize``.) On CUDA, when
    bitsandbytes is installed, its kernel is used instead (faster; same arithmetic).
    """
    dtype = q.dtype if dtype is None else dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"can dequantise to float32/float16/bfloat16 only, got {dtype}")
    if q.packed.is_cuda:
        fast = _bnb_dequantize(q, dtype)
        if fast is not None:
            return fast
    with torch.no_grad():
        n = q.numel
        packed = q.packed.reshape(-1)
        codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]
        levels = _nf4_code(packed.device)[codes.long()]
        absmax = q.block_absmax()
        n_blocks = absmax.numel()
        levels = F.pad(levels, (0, n_blocks * q.blocksize - n)).view(n_blocks, q.blocksize)
        out = (levels * absmax.unsqueeze(1)).reshape(-1)[:n]
        return out.to(dtype).reshape(q.shape)


@functools.lru_cache(maxsize=1)
def _bnb_functional() -> Any:
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None
    return bnb_functional


def _bnb_dequantize(q: NF4Tensor, dtype: torch.dtype) -> Tensor | None:
    """bitsandbytes' CUDA dequantisation of ``q``, or None when bitsandbytes is not installed."""
    bnbf = _bnb_functional()
    # bitsandbytes transposes the output when the packed tensor has a single row (a legacy layout), so tiny
    # weights stay on the torch path.
    if bnbf is None or q.packed.shape[0] < 2:
        return None
    state2 = None
    if q.double_quant:
        state2 = bnbf.QuantState(
            absmax=q.nested_absmax,
            code=_dynamic_code(q.device),
            blocksize=_NESTED_BLOCKSIZE,
            dtype=torch.float32,
        )
    state = bnbf.QuantState(
        absmax=q.absmax if state2 is None else q.absmax_codes,
        shape=q.shape,
        code=_nf4_code(q.device),
        blocksize=q.blocksize,
        quant_type="nf4",
        dtype=dtype,
        offset=q.offset,
        state2=state2,
    )
    return bnbf.dequantize_4bit(q.packed, quant_state=state)
