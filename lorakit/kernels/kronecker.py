"""The Kronecker kernel: LoKr's ``W0 x + b0 + s kron(W1, W2) x~`` (:class:`~lorakit.core.forms.Kronecker`;
Yeh et al. 2024, arXiv:2309.14859) on matrix layers without forming ``kron(W1, W2)``.

``kron(W1, W2)[i b + j, p d + q] = W1[i, p] W2[j, q]``, so ``(kron(W1, W2) x)[i b + j] = (W1 X W2^T)[i, j]``
with ``X = x~`` viewed ``(c, d)``: two small products per input row instead of an ``(a b, c d)`` weight.
:class:`KroneckerProduct` saves only ``x`` (kept by the network anyway), the 1-byte dropout mask and the two
factors, and recomputes the ``(N, a, d)`` intermediate in backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lorakit.core.dropout import apply_mask, fresh_keep_mask, transforms_active
from lorakit.core.forms import Kronecker
from lorakit.core.kinds import MATRIX_KINDS
from lorakit.core.layer import AdaptedLayer
from lorakit.kernels.registry import Kernel, register


class KroneckerProduct(torch.autograd.Function):
    """``s W1 X W2^T`` for ``X = x~`` viewed ``(..., c, d)``, ``x~ = x * keep / (1 - p)``: ``(..., a, b)``.

    Plain autograd keeps ``W1 X`` (``N x a d``, the input's size when ``a = c``) and a dropped-out copy of
    ``x``. Backward with ``G = s dL/dout``: ``dX = W1^T G W2``, ``dW2 = sum_N G^T (W1 X)`` (recomputed, a
    ``1 / b`` fraction of the forward's work), ``dW1 = sum_N (G W2) X^T``.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, w1: Tensor, w2: Tensor, shape: tuple[int, int], scale: float, p: float,
        mask: Tensor | None,
    ) -> Tensor:  # fmt: skip
        xs = (apply_mask(x, mask) if mask is not None else x).unflatten(-1, shape)  # (..., c, d)
        out = (w1 @ xs @ w2.t()).mul_(scale / (1 - p))  # (..., a, b)
        ctx.save_for_backward(x, mask, w1, w2)
        ctx.shape, ctx.factor = shape, scale / (1 - p)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, mask, w1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        xs = (apply_mask(x, mask) if mask is not None else x).unflatten(-1, ctx.shape)
        xs = xs.reshape(-1, *ctx.shape)  # (N, c, d)
        g = (grad * ctx.factor).reshape(-1, *grad.shape[-2:])  # (N, a, b)
        gw2 = g @ w2  # (N, a, d)
        grad_x = grad_w1 = grad_w2 = None
        if need[0]:
            grad_x = (w1.t() @ gw2).flatten(-2)  # (N, c d)
            grad_x = apply_mask(grad_x, mask.reshape(grad_x.shape)) if mask is not None else grad_x
            grad_x = grad_x.view(x.shape)
        if need[1]:
            grad_w1 = (gw2 @ xs.transpose(1, 2)).sum(0)  # (a, c)
        if need[2]:
            u = w1 @ xs  # (N, a, d), recomputed
            grad_w2 = g.flatten(0, 1).t() @ u.flatten(0, 1)  # (b, d)
        return grad_x, grad_w1, grad_w2, None, None, None, None


def runs(layer: AdaptedLayer, x: Tensor, form: Kronecker) -> bool:
    """Float input, no torch.func transform (per-example gradients need plain autograd)."""
    return x.is_floating_point() and not transforms_active()


def kronecker(layer: AdaptedLayer, x: Tensor, form: Kronecker) -> Tensor:
    """The adapted layer's output: the base layer's, plus :class:`KroneckerProduct` in its dtype."""
    w1, w2, scale, p = form
    y = layer.base_layer(x)
    w1, w2 = w1.to(y.dtype), w2.to(y.dtype)
    keep = fresh_keep_mask(x, p) if p > 0 else None
    out = KroneckerProduct.apply(x.to(y.dtype), w1, w2, (w1.shape[1], w2.shape[1]), scale, p, keep)
    return y + out.flatten(-2)  # (..., a, b) -> (..., a b)


register(Kernel("kronecker", Kronecker, kronecker, kinds=MATRIX_KINDS, when=runs))
