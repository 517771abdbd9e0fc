"""The low-rank kernel: ``W0 x + b0 + s B (A x~)`` (:class:`~lorakit.core.forms.LowRank`) with a backward that
saves as little as possible.

Plain autograd saves the dropped-out input (a copy of ``x``, ``N x d_in``) for every adapted layer, plus its
mask; three adapters reading the same hidden state (query, key, value) save three copies. That is why a
naively written LoRA step can need *more* activation memory than full fine-tuning. This function instead
saves the original ``x`` (the very tensor the rest of the network already keeps, so no new memory), the small
``z = A x~`` (``N x r``) and the dropout mask as booleans (a quarter of an fp32 copy); the ``positions``
kernel (a CPU, ``p <= 0.25``) forms no mask at all: the products with ``x * keep`` are taken from the
dropped inputs (:mod:`lorakit.kernels.dropped`) and their positions are kept (0.4 bytes per input at
``p = 0.05``).

If ``A`` is frozen (LoRA-FA, arXiv:2308.03303) nothing of size ``N x d_in`` is saved at all: ``dL/dB`` needs
only ``z`` and ``dL/dx`` only ``A``, ``B`` and the mask, which backward draws again from its seed.

On a plain frozen matrix layer (:func:`forms_base_output`) the function also forms the base output
``W0 x + b0`` and the base input gradient itself, so the layer is one node of the graph and neither output is
copied. The rank-thin products are written in the order a CPU runs fast
(:mod:`lorakit.kernels.skinny`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.core.dropout import apply_mask, dropout, keep_mask, new_seed, transforms_active
from lorakit.core.forms import LowRank
from lorakit.core.kinds import MATRIX_KINDS
from lorakit.core.layer import AdaptedLayer
from lorakit.kernels.dropped import (
    Dropped,
    dropped_at,
    dropped_values,
    gram_on_kept,
    product_at_dropped,
    rank_first_on_kept,
)
from lorakit.kernels.gaps import GAP_MASK, drawn_as_gaps, dropped_indices
from lorakit.kernels.policy import mask_kernel
from lorakit.kernels.registry import Kernel, register
from lorakit.kernels.skinny import gram_rank_first, rank_first, rank_gram, rows_of


class _LowRankFunction(torch.autograd.Function):
    """``out = [y +] s B (A x~)``, ``x~ = (x * m) / (1 - p)``; the ``1/(1-p)`` is applied to the small ``z``.

    Given the base output ``y`` (same dtype), the last product accumulates onto it (``addmm``): one output
    tensor and one pass, where a separate product, scaling and sum write three.

    Given instead the frozen base weight ``w0`` (``(out, in)``, with ``bias``), the function forms the base
    output itself and accumulates onto that buffer in place; backward then writes ``(dL/dy) W0`` and the
    adapter's input gradient into one tensor. That saves an output-sized copy in forward and an input-sized
    sum in backward (autograd would add the base layer's and the adapter's input gradients), and ``y`` is
    never kept beside the output."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, a: Tensor, b: Tensor, y: Tensor | None, scale: float, p: float, seed: int,
        w0: Tensor | None, bias: Tensor | None, positions: bool,
    ) -> Tensor:  # fmt: skip
        device = x.device.type
        # Under autocast the products run in the autocast dtype, as they would for nn.Linear; backward (which
        # autocast does not cover) uses the same dtype explicitly.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            a_c, b_c, x_c = a.to(dtype), b.to(dtype), x.to(dtype)
            x2, mask, at = rows_of(x_c), None, None
            if p > 0 and positions:
                flat = dropped_indices(x.numel(), p, seed, x.device)
                at = dropped_at(flat, x2.shape)
                z = rank_first_on_kept(a_c, x2, dropped_values(x2, flat), at)
            else:
                mask = keep_mask(x, p, seed) if p > 0 else None
                z = rank_first(a_c, rows_of(apply_mask(x_c, mask)) if mask is not None else x2)
            z = z.reshape(*x.shape[:-1], a.shape[0])  # (..., r)
            if p > 0:
                z = z.div_(1.0 - p)
            # The output is made in its final shape and written through a 2-D view of it, never returned as
            # a view: autograd refuses an in-place op (a model's `h += ...`, ReLU(inplace=True)) on a view
            # made inside a custom function.
            if w0 is not None:  # (..., out): W0 x + b0, then + s B z on the same buffer
                out = torch.empty((*x.shape[:-1], w0.shape[0]), dtype=dtype, device=x.device)
                w0_t = w0.to(dtype).t()
                if bias is None:
                    torch.mm(x2, w0_t, out=rows_of(out))
                else:
                    torch.addmm(bias.to(dtype), x2, w0_t, out=rows_of(out))
                rows_of(out).addmm_(rows_of(z), b_c.t(), alpha=scale)
            elif y is not None and y.dtype == dtype:  # y + s B z
                out = torch.empty(y.shape, dtype=dtype, device=y.device)
                torch.addmm(rows_of(y), rows_of(z), b_c.t(), alpha=scale, out=rows_of(out))
            else:
                out = F.linear(z, b_c).mul_(scale)  # (..., out)
                out = out if y is None else y + out.to(y.dtype)
        ctx.scale, ctx.p, ctx.seed, ctx.sparse = scale, p, seed, at is not None
        ctx.dtypes = (x.dtype, a.dtype, b.dtype)
        # When A trains, x is needed anyway (and already kept by the network), so the dropped positions (or
        # the 1-byte mask) are kept too rather than drawn twice. With A frozen nothing input-sized is kept:
        # backward draws them again from the seed.
        keep_a = a.requires_grad
        positions = tuple(at) if at is not None and keep_a else (None, None, None)
        saved = (x if keep_a else None, mask if keep_a else None, a_c, b_c, z if b.requires_grad else None)
        ctx.save_for_backward(*saved, *positions, w0)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, mask, a, b, z, *positions, w0 = ctx.saved_tensors
        need_x, need_a, need_b, need_y = ctx.needs_input_grad[:4]
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        g = rows_of(grad.to(b.dtype))  # (N, out), in the forward's compute dtype
        gz = rank_first(b.t(), g).mul_(ctx.scale / (1.0 - ctx.p))  # dL/dz with the dropout rescale, (N, r)
        grad_x = grad_a = grad_b = None
        at = Dropped(*positions) if positions[0] is not None else None
        if ctx.sparse:  # the dropped positions' flat indices (drawn again from the seed where A is frozen)
            width = a.shape[-1]
            numel = g.shape[0] * width
            flat = at.flat(width) if at is not None else dropped_indices(numel, ctx.p, ctx.seed, g.device)
        if need_b:
            grad_b = gram_rank_first(g, z).mul_(ctx.scale).to(b_dtype)  # (out, r)
        if need_a:
            x2 = rows_of(x.to(a.dtype))
            if ctx.sparse:  # gz^T (x * keep) = gz^T x - gz^T (x * dropped)
                grad_a = gram_on_kept(gz, x2, at, flat)
            else:
                grad_a = rank_gram(gz.t(), apply_mask(x2, mask.view(x2.shape)) if mask is not None else x2)
            grad_a = grad_a.to(a_dtype)
        if need_x:  # keep * (gz A), onto g W0 where the base output was formed here
            grad_x = g @ w0.to(g.dtype) if w0 is not None else None  # (N, in)
            if grad_x is not None and (ctx.sparse or ctx.p == 0):  # + gz A in place
                grad_x.addmm_(gz, a)
                if ctx.sparse:  # minus it again at the dropped positions
                    at = at if at is not None else dropped_at(flat, (g.shape[0], a.shape[-1]))
                    grad_x.view(-1).index_add_(0, flat, product_at_dropped(gz, a, at), alpha=-1)
            else:
                lowrank_x = gz @ a  # (N, in)
                if ctx.sparse:  # keep * (gz A): the dropped positions written over
                    lowrank_x.view(-1).index_fill_(0, flat, 0)
                elif ctx.p > 0:
                    keep = mask if mask is not None else keep_mask(lowrank_x, ctx.p, ctx.seed)
                    lowrank_x = apply_mask(lowrank_x, keep.view(lowrank_x.shape))
                grad_x = lowrank_x if grad_x is None else grad_x.add_(lowrank_x)
            grad_x = grad_x.reshape(*grad.shape[:-1], a.shape[-1]).to(x_dtype)
        return grad_x, grad_a, grad_b, grad if need_y else None, None, None, None, None, None, None


def forms_base_output(base: AdaptedLayer, x: Tensor) -> bool:
    """Whether the kernel forms the base output for ``x`` inside its function (a matrix layer computing
    exactly its kind's op with a frozen float weight, no hook on it:
    :meth:`~lorakit.core.layer.AdaptedLayer.base_output_formable`), instead of calling the base layer."""
    return base.base_output_formable(x)


def runs(layer: AdaptedLayer, x: Tensor, form: LowRank) -> bool:
    """Float input, no torch.func transform (per-example gradients need plain autograd)."""
    return x.is_floating_point() and not transforms_active()


def reads_positions(layer: AdaptedLayer, x: Tensor, form: LowRank) -> bool:
    """Where the dropped positions replace the mask: eager, the products in ``x``'s own dtype (a bf16
    ``A x - A (x * dropped)`` would round differently from ``A (x * keep)``), and the mask drawn as gaps
    (the positions are the mask's)."""
    return (
        runs(layer, x, form)
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(x.device.type)
        and mask_kernel(x, form.p) is GAP_MASK
    )


def low_rank(layer: AdaptedLayer, x: Tensor, form: LowRank, positions: bool = False) -> Tensor:
    """The adapted layer's output ``W0 x + b0 + s B (A x~)``, base output formed in the function where
    :func:`forms_base_output`, else the base layer's."""
    a, b, scale, p = form
    w0 = bias = y = None
    # Compiled with dropout, the function is given the masked input: the base output is formed apart.
    if forms_base_output(layer, x) and not (p > 0 and torch.compiler.is_compiling()):
        w0, bias = layer.weight_2d(), layer.bias
    else:
        y = layer.base_layer(x)
    if torch.compiler.is_compiling():
        # The compiler traces the function too (its products in the fast order), given the masked input: the
        # mask is drawn by an operator it keeps whole (a seeded generator inside the graph would break it).
        return _LowRankFunction.apply(dropout(x, p), a, b, y, scale, 0.0, 0, w0, bias, False)
    seed = int(new_seed().item()) if p > 0 else 0
    return _LowRankFunction.apply(x, a, b, y, scale, p, seed, w0, bias, positions)


def low_rank_on_positions(layer: AdaptedLayer, x: Tensor, form: LowRank) -> Tensor:
    """:func:`low_rank` with the products from the dropped positions."""
    return low_rank(layer, x, form, positions=True)


ON_POSITIONS = register(
    Kernel(
        "lowrank_positions", LowRank, low_rank_on_positions, ("cpu",), (torch.float32, torch.float64),
        MATRIX_KINDS, drawn_as_gaps, reads_positions,
    )
)  # fmt: skip
LOW_RANK = register(Kernel("lowrank", LowRank, low_rank, kinds=MATRIX_KINDS, when=runs))
