"""``NF4Linear``: a frozen linear layer whose weight is stored in 4-bit NF4 (QLoRA, arXiv:2305.14314).

The weight format (blocks, double quantisation) lives in :mod:`lorakit.core.quant`; this module is the layer
that holds it, dequantises it per forward in the compute dtype, and converts back to the dense layer it was
built from. It stands in for an ``nn.Linear`` or for transformers' GPT-2 ``Conv1D`` (``y = x W + b`` with
``W`` stored ``(in, out)``): the Conv1D weight is quantised transposed, as ``(out, in)``, which is what
bitsandbytes' integration in transformers does, so both compute ``F.linear(x, W_(out, in), b)``. The layer
keeps its source's layer kind (``lorakit_kind``), so an adapter on it sees the same kind as on the dense
layer and merging gives back a layer of the original type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.core.kinds import MATRIX_KINDS, kind_of
from lorakit.core.quant import _FLOAT_DTYPES, NF4Tensor, dequantize_nf4, quantize_nf4
from lorakit.core.quantized import QuantizedBase


class _NF4LinearFunction(torch.autograd.Function):
    """``F.linear`` with an NF4 weight that is dequantised again in backward instead of being saved.

    Saving the dense weight for backward would keep a full-precision copy of every frozen base layer alive
    during training, undoing the memory saving QLoRA exists for (paper section 3).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, q: NF4Tensor, bias: Tensor | None, compute_dtype: torch.dtype) -> Tensor:
        ctx.q = q
        ctx.compute_dtype = compute_dtype
        return F.linear(x, dequantize_nf4(q, compute_dtype), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_nf4(ctx.q, ctx.compute_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


# Buffers holding fp32 quantisation state: they follow the module's device but never its dtype.
_FP32_STATE = ("weight_absmax", "weight_nested_absmax", "weight_offset")


class NF4Linear(QuantizedBase):
    """A frozen linear layer whose weight is stored in NF4 (QLoRA, arXiv:2305.14314), the base of QLoRA.

    Build one with :meth:`from_linear` from an ``nn.Linear`` or a GPT-2 ``Conv1D``. The quantised weight lives
    in buffers (``weight_packed``, ``weight_absmax`` or ``weight_absmax_codes`` + ``weight_nested_absmax`` +
    ``weight_offset``), so ``.to(device)`` moves it and no optimiser ever sees it; ``.to(dtype)`` /
    ``.half()`` cast only the bias, never the fp32 block scales. ``forward`` dequantises to ``compute_dtype``
    (QLoRA computes in bf16) and returns the result in the input's dtype; gradients flow to the input (and to
    the bias if it is made trainable), never to the weight.
    """

    # The layer kind lorakit adapts this layer as (see lorakit.core.kinds): the kind of the layer it replaces.
    lorakit_kind: str = "linear"

    weight_packed: Tensor
    weight_absmax: Tensor | None
    weight_absmax_codes: Tensor | None
    weight_nested_absmax: Tensor | None
    weight_offset: Tensor | None

    def __init__(
        self,
        weight: NF4Tensor,
        bias: Tensor | None = None,
        *,
        compute_dtype: torch.dtype,
        source: type[nn.Module] = nn.Linear,
    ) -> None:
        """Wrap an already quantised ``(out_features, in_features)`` weight; prefer :meth:`from_linear`.

        ``source``: the dense layer type this stands for, ``nn.Linear`` or transformers' ``Conv1D``.
        """
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        _check_compute_dtype(compute_dtype)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.source = source
        self.lorakit_kind = "linear" if issubclass(source, nn.Linear) else "conv1d_gpt2"
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight.dtype
        self.blocksize = weight.blocksize
        self.register_buffer("weight_packed", weight.packed)
        self.register_buffer("weight_absmax", weight.absmax)
        self.register_buffer("weight_absmax_codes", weight.absmax_codes)
        self.register_buffer("weight_nested_absmax", weight.nested_absmax)
        self.register_buffer("weight_offset", weight.offset)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            # Original dtype, so to_linear is lossless; frozen like the weight unless a caller opts in.
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        double_quant: bool = True,
        blocksize: int = 64,
        quant_type: str = "nf4",
    ) -> NF4Linear:
        """Quantise the ``(out, in)`` weight of ``linear`` (an ``nn.Linear``, or a GPT-2 ``Conv1D`` whose
        ``(in, out)`` weight is transposed first) to NF4 (see :func:`quantize_nf4`) on the device it is on.

        Raises:
            TypeError: ``linear`` is neither an ``nn.Linear`` nor a GPT-2 ``Conv1D``, is already quantised,
                or has a non-float weight; or ``compute_dtype`` is not a float dtype.
            ValueError: unknown ``quant_type``/``blocksize``, or a weight with NaN/Inf values.
        """
        if isinstance(linear, NF4Linear):
            raise TypeError(
                "this layer is already NF4-quantised; use it as is, or pass the original nn.Linear"
            )
        kind = kind_of(linear)
        if kind is None or kind not in MATRIX_KINDS:
            raise TypeError(
                f"NF4Linear.from_linear expects an nn.Linear or a GPT-2 Conv1D, got {type(linear).__name__}"
            )
        if linear.weight.dtype in (torch.uint8, torch.int8):
            raise TypeError(
                f"{type(linear).__name__} is already quantised (weight dtype {linear.weight.dtype}); "
                "pass the original float layer"
            )
        _check_compute_dtype(compute_dtype)
        w2d = kind.weight_2d(linear)  # (out, in): a Conv1D weight transposed, as bitsandbytes stores it
        q = quantize_nf4(w2d, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
        return cls(q, linear.bias, compute_dtype=compute_dtype, source=type(linear))

    @property
    def quantized_weight(self) -> NF4Tensor:
        """The weight as an :class:`NF4Tensor` view of this module's buffers (on their current device)."""
        return NF4Tensor(
            packed=self.weight_packed,
            absmax=self.weight_absmax,
            absmax_codes=self.weight_absmax_codes,
            nested_absmax=self.weight_nested_absmax,
            offset=self.weight_offset,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight dequantised to ``dtype`` (default: the original weight dtype), in the source layer's
        layout: ``(out, in)`` for ``nn.Linear``, ``(in, out)`` (a transposed view) for a GPT-2 ``Conv1D``."""
        dtype = dtype or self.weight_dtype
        # fp64 (a model cast to it after quantising): dequantised in fp32, the precision of the scales
        w = dequantize_nf4(self.quantized_weight, dtype if dtype in _FLOAT_DTYPES else torch.float32)
        w = w.to(dtype)  # (out, in)
        return w if self.lorakit_kind == "linear" else w.t()

    def stored_weight(self) -> Tensor:
        """The packed 4-bit codes."""
        return self.weight_packed

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise TypeError(f"NF4Linear expects a float input, got {x.dtype}")
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _NF4LinearFunction.apply(
            x.to(self.compute_dtype), self.quantized_weight, bias, self.compute_dtype
        )
        return y.to(x.dtype)

    def to_dense(self) -> nn.Module:
        """The dense layer this stands for (``nn.Linear`` or the GPT-2 ``Conv1D``) with the dequantised
        weight in its original dtype, e.g. for merging."""
        device = self.weight_packed.device
        if self.lorakit_kind == "linear":
            dense = nn.utils.skip_init(
                nn.Linear,
                self.in_features,
                self.out_features,
                bias=self.bias is not None,
                device=device,
                dtype=self.weight_dtype,
            )
        else:  # Conv1D(nf=out, nx=in) takes no device/dtype: built in place, then cast
            with torch.device(device):
                dense = self.source(self.out_features, self.in_features).to(self.weight_dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def to_linear(self) -> nn.Module:
        """Same as :meth:`to_dense`."""
        return self.to_dense()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> NF4Linear:
        # nn.Module.to(dtype)/.half() cast every float buffer; a rounded block scale would silently change
        # every dequantised value, so the fp32 state only takes the device that `fn` would give it.
        held = {name: self._buffers[name] for name in _FP32_STATE if self._buffers.get(name) is not None}
        for name in held:
            self._buffers[name] = None
        super()._apply(fn, recurse)
        # The dense weight this stands for takes the cast a dense layer's weight would (``to_dense`` builds
        # it in that dtype, so a merge into a model cast to bf16 gives a bf16 layer).
        dense_weight = torch.empty(0, dtype=self.weight_dtype, device=self.weight_packed.device)
        self.weight_dtype = fn(dense_weight).dtype
        for name, tensor in held.items():
            probe = fn(torch.empty(0, dtype=torch.float32, device=tensor.device))
            if probe.dtype == torch.float32:
                self._buffers[name] = fn(tensor)  # a pure move (or e.g. share_memory_): apply it as is
            else:
                self._buffers[name] = tensor.to(probe.device)
        return self

    def extra_repr(self) -> str:
        source = "" if self.lorakit_kind == "linear" else f"source={self.source.__name__}, "
        return (
            f"{source}in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}, blocksize={self.blocksize}, "
            f"double_quant={self.weight_absmax is None}"
        )


def _check_compute_dtype(compute_dtype: Any) -> None:
    if compute_dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"compute_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {compute_dtype}"
        )
