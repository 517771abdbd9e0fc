"""The fused DoRA kernel: DoRA's forward (:class:`~lorakit.core.forms.WeightDecomposed`; Liu et al. 2024,
arXiv:2402.09353, Eq. 5) as one autograd function on matrix layers.

The output is formed in the low-rank product's output buffer with in-place passes, and backward keeps
``W0 x~`` (without dropout ``y`` itself, so nothing new), the low-rank ``z`` and the 1-byte dropout mask (or
the dropped positions), where plain autograd keeps ``W0 x~``, the low-rank output and a dropped-out copy of
``x`` (PEFT also keeps the base output). The ``positions`` kernel (a CPU, ``p <= 0.25``, fp32/fp64) takes
``W0 x~`` and ``A x~`` from the dropped inputs only (:mod:`lorakit.kernels.dora_positions`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lorakit.core.dropout import apply_mask, fresh_keep_mask, new_seed, transforms_active
from lorakit.core.forms import WeightDecomposed
from lorakit.core.kinds import MATRIX_KINDS
from lorakit.core.layer import AdaptedLayer
from lorakit.kernels.dora_positions import (
    input_grads_on_kept,
    input_grads_on_kept_op,
    products_on_kept,
    products_on_kept_op,
)
from lorakit.kernels.dropped import Dropped, dropped_at
from lorakit.kernels.gaps import GAP_MASK, drawn_as_gaps, fresh_dropped_indices
from lorakit.kernels.policy import mask_kernel
from lorakit.kernels.registry import Kernel, register
from lorakit.kernels.skinny import gram_rank_first, rank_first, rank_gram, rows_of


class DoRAFunction(torch.autograd.Function):
    """``out = y + (c - 1) W0 x~ + c s B A x~`` with ``c = m / n`` (``n`` the detached row norm), fused.

    ``x~ = x * keep / (1 - p)``. The base products read ``h = W0 (x * keep) + b0``, so ``W0 x~ = k (h - b0)``
    with ``k = 1 / (1 - p)``; without dropout ``h = y`` is reused. With ``e = k (c - 1)`` and ``z = A x~``:
    ``out = y + e (h - b0) + c s B z``, formed in fp32 in two passes (the ``- e b0`` rides on the low-rank
    product), so a small change of ``m`` is not lost under bf16.

    Backward, with ``g = dL/dout``: ``dL/dh = e g`` (``dL/dy = c g`` when ``h = y``), which reaches ``x`` as
    ``keep * (e g W0)``; from the dropped positions that product is folded into ``y``'s
    (:mod:`.dora_positions`). Where ``y`` is exactly ``W0 x + b0`` of a frozen weight in the compute dtype
    (``base_grad_here``), ``y``'s part of ``dL/dx``, ``(dL/dy) W0``, is formed here on ``dL/dx``'s own buffer:
    no scaled copy of ``dL/dy``, no second input gradient for autograd to add, and ``y`` gets none (the base
    layer's backward has nothing to do). The low-rank path gets ``c g`` (folded into ``B``:
    ``(c g) B = g (c B)``); ``dL/dm = sum_N g (W0 x~ + s B z) / n`` with
    ``sum_N g (B z) = rowsum(B * g^T z)``. Saved: ``h`` (``y`` itself without dropout: no new tensor), the
    small ``z``, and the dropout as given: a 1-byte mask
    (``keep``), the dropped positions (``dropped``, eager on a CPU) or a one-element ``seed`` the compiled
    operators draw the same positions from.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, y: Tensor, w0: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, m: Tensor,
        norm: Tensor, scale: float, p: float, keep: Tensor | None, dropped: tuple[Dropped, Tensor] | None,
        seed: Tensor | None, base_grad_here: bool,
    ) -> Tensor:  # fmt: skip
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        acc = torch.promote_types(dtype, torch.float32)  # the sum's dtype: fp32 for bf16 and fp16
        with torch.autocast(device, enabled=False):
            c = m.detach().to(acc) / norm  # (out,)
            e = (c - 1) / (1 - p)
            b0 = bias.detach().to(acc) if bias is not None else None
            a_c, b_c = a.to(dtype), b.to(dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
            y2 = y.reshape(-1, y.shape[-1])  # (N, out)
            mask = keep.reshape(x2.shape) if keep is not None else None
            sparse = dropped is not None or seed is not None  # the dropout as the dropped positions
            at = None  # the dropped positions, kept in eager mode instead of the mask
            if mask is None and not sparse:
                h, z = y2, rank_first(a_c, x2)
            elif sparse:  # W0 (x * keep) + b0 and A (x * keep) from the dropped inputs
                if seed is not None:  # compiled: the operator draws the positions (a data-dependent count)
                    h, z = products_on_kept_op(x2, y2, seed, p, w0, a_c)
                else:
                    at, flat = dropped
                    h, z = products_on_kept(x2, y2, at, flat, w0, a_c)
            else:
                xm = apply_mask(x2, mask)
                w0_c = w0.to(dtype).t()
                h = torch.addmm(b0.to(dtype), xm, w0_c) if b0 is not None else xm @ w0_c
                z = rank_first(a_c, xm)
                del xm
            if p > 0:
                z = z.div_(1 - p)  # (N, r), A x~
            # y + e (h - b0) + c s B z: y + e h in one pass (c y when h = y, as e = c - 1), then the low-rank
            # product added in place, with -e b0 riding on it as one more rank (a column of ones)
            # Made in y's shape and written through a 2-D view (fp32 under bf16): never returned as a view,
            # on which autograd would refuse a model's in-place op (`h += ...`).
            out = torch.empty(y.shape, dtype=torch.promote_types(y2.dtype, c.dtype), device=y.device)
            if p == 0:
                torch.mul(y2, c, out=rows_of(out))
            else:
                torch.addcmul(y2, h, e, out=rows_of(out))
            zt, cb = z.t().to(acc), (b_c.to(acc) * (c * scale)[:, None]).t()  # z^T (r, N), (c s B)^T (r, out)
            if b0 is not None:
                zt, cb = torch.cat([zt, zt.new_ones(1, zt.shape[1])]), torch.cat([cb, (-e * b0)[None]])
            rows_of(out).addmm_(zt.t(), cb)
            out = out.to(y.dtype)
        ctx.scale, ctx.p, ctx.sparse, ctx.dtypes = scale, p, sparse, (x.dtype, a.dtype, b.dtype, m.dtype)
        ctx.base_grad_here = base_grad_here and w0.dtype == dtype
        positions = at if at is not None else (None, None, None)
        w0_saved = w0 if p > 0 or ctx.base_grad_here else None
        saved = (x, mask, w0_saved, a_c, b_c, z, h, c, norm, b0, seed, *positions)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, mask, w0, a, b, z, h, c, norm, b0, seed, *positions = ctx.saved_tensors
        at = Dropped(*positions) if positions[0] is not None else None
        x_dtype, a_dtype, b_dtype, m_dtype = ctx.dtypes
        need_x, need_y, _, _, need_a, need_b, need_m = ctx.needs_input_grad[:7]
        scale, p = ctx.scale, ctx.p
        e = (c - 1) / (1 - p)
        g = grad.reshape(-1, grad.shape[-1]).to(b.dtype)  # (N, out), in the forward's compute dtype
        grad_x = grad_y = grad_a = grad_b = grad_m = None
        # Folded: y's product takes dL/dh = e g too (its product with W0 is the one x needs, on every input),
        # and dL/dx gives it back at the dropped positions, where h does not read x.
        fold = ctx.sparse and need_x and need_y
        coef = c if p == 0 else 1 + e if fold else None  # dL/dy = coef g (None: 1)
        here = ctx.base_grad_here and need_x and need_y  # (dL/dy) W0 formed here, on dL/dx
        if need_y and not here:
            # fp32 coefficient, one rounding of the product (out=): a bf16 c would move in steps of 2**-8
            grad_y = grad if coef is None else torch.mul(grad, coef, out=torch.empty_like(grad))
        if need_b or need_m:
            gzt = gram_rank_first(g, z).to(c.dtype)  # g^T z, (out, r)
            if need_b:
                grad_b = (gzt * c[:, None]).mul_(scale).to(b_dtype)
            if need_m:
                gh = (g * h).sum(0, dtype=c.dtype)  # sum_N g h
                if b0 is not None:
                    gh -= b0 * g.sum(0, dtype=c.dtype)
                gh /= 1 - p  # sum_N g W0 x~
                gh += scale * (b.to(c.dtype) * gzt).sum(1)  # sum_N g s B z
                grad_m = (gh / norm).to(m_dtype)
        if need_x or need_a:
            cb = (b.to(c.dtype) * (c * (scale / (1 - p)))[:, None]).to(b.dtype)  # c B, scaled
            gz = rank_first(cb.t(), g)  # dL/d(A (x * keep)), (N, r)
            x2 = x.reshape(-1, x.shape[-1]).to(a.dtype)
            w0_e = w0.to(c.dtype) * e[:, None] if p > 0 and need_x else None  # e g W0 = g (e W0)
            if ctx.sparse:  # h and z read x * keep: products with the dropped inputs
                args = (gz, a, g, w0_e, x2)
                if at is not None:
                    grad_x, grad_a = input_grads_on_kept(*args, at, fold, need_x, need_a)
                else:
                    grad_x, grad_a = input_grads_on_kept_op(*args, seed, p, fold, need_x, need_a)
            else:
                if need_a:
                    grad_a = rank_gram(gz.t(), apply_mask(x2, mask) if mask is not None else x2)
                if need_x:
                    grad_x = gz @ a  # the low-rank path's part, (N, in)
                    if p > 0:  # h reads x too: keep * (g e W0)
                        grad_x = apply_mask(grad_x.addmm_(g, w0_e.to(g.dtype)), mask)
            if here:  # y's part: (dL/dy) W0 = g (coef W0)
                grad_x = grad_x.addmm_(
                    g, w0 if coef is None else (w0.to(c.dtype) * coef[:, None]).to(g.dtype)
                )
            grad_a = grad_a.to(a_dtype) if need_a else None
            grad_x = grad_x.view(x.shape).to(x_dtype) if need_x else None
        return grad_x, grad_y, None, None, grad_a, grad_b, grad_m, None, None, None, None, None, None, None


def runs(layer: AdaptedLayer, x: Tensor, form: WeightDecomposed) -> bool:
    """Float input, no torch.func transform; the base weight and bias frozen (the function gives them no
    gradient); with dropout, a weight that is not dequantised (the function keeps ``W0`` for backward, which
    for a 4-bit base would be a full-precision copy)."""
    bias = layer.bias
    return (
        x.is_floating_point()
        and not transforms_active()
        and not layer.stored_weight().requires_grad
        and (bias is None or not bias.requires_grad)
        and not (form.p > 0 and layer.weight_is_dequantised())
    )


def reads_positions(layer: AdaptedLayer, x: Tensor, form: WeightDecomposed) -> bool:
    """Where ``W0 x~`` is taken from the dropped inputs as ``y - W0 (x * dropped)``: ``y`` must be exactly
    ``W0 x + b0`` in ``x``'s dtype (a plain base layer, no hook, no autocast:
    :meth:`~lorakit.core.layer.AdaptedLayer.base_output_formable`), and the mask drawn as gaps."""
    return runs(layer, x, form) and layer.base_output_formable(x) and mask_kernel(x, form.p) is GAP_MASK


def dora(layer: AdaptedLayer, x: Tensor, form: WeightDecomposed, positions: bool = False) -> Tensor:
    """The adapted layer's output through :class:`DoRAFunction`, the dropout as a mask or (``positions``)
    as the dropped positions, drawn in a compiled graph by its operators from a seed."""
    a, b, scale, p, m, norm = form
    y = layer.base_layer(x)
    keep = dropped = seed = None
    if p > 0 and positions:
        if torch.compiler.is_compiling():  # drawn by the operators, from the same seed as eager's
            seed = new_seed()
        else:
            flat = fresh_dropped_indices(x, p)
            dropped = (dropped_at(flat, rows_of(x).shape), flat)
    elif p > 0:
        keep = fresh_keep_mask(x, p)
    w0, here = layer.weight_2d(), layer.base_output_formable(x)
    return DoRAFunction.apply(x, y, w0, layer.bias, a, b, m, norm(), scale, p, keep, dropped, seed, here)


def dora_on_positions(layer: AdaptedLayer, x: Tensor, form: WeightDecomposed) -> Tensor:
    """:func:`dora` with ``W0 x~`` and ``A x~`` from the dropped positions."""
    return dora(layer, x, form, positions=True)


register(
    Kernel(
        "dora_positions", WeightDecomposed, dora_on_positions, ("cpu",), (torch.float32, torch.float64),
        MATRIX_KINDS, drawn_as_gaps, reads_positions,
    )
)  # fmt: skip
register(Kernel("dora", WeightDecomposed, dora, kinds=MATRIX_KINDS, when=runs))
