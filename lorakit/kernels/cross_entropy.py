"""Cross-entropy through a linear head without the full-vocabulary logits (a fused linear cross-entropy).

The plain form ``F.cross_entropy(h @ W.T + b, t, reduction="sum")`` holds the logits of every token at once,
``N x V`` floats, and autograd keeps them (and their softmax) for backward: for a batch of 8 x 320 tokens and
a 49,152-token vocabulary that is 500 MB per copy, growing with the vocabulary (128k in recent LLMs). Here the
rows are taken a chunk at a time: the chunk's logits, their log-sum-exp and the loss, and, when gradients are
wanted, their gradients ``(softmax - onehot)`` multiplied out at once into ``dL/dh`` (and ``dL/dW``, ``dL/db``
for a head that trains), so nothing vocabulary-sized outlives its chunk. Backward only scales the stored
gradients, so the head's two products run once each, as in the plain form (Liger-Kernel's and unsloth's
fused linear cross-entropy compute the gradient in forward the same way).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_CHUNK_ELEMENTS = 2**24  # logits per chunk (64 MB in fp32), whatever the vocabulary size


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a ``vocab``-sized head."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab))


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """The head's product dtype: autocast's where it is on (as ``nn.Linear`` would run), else the weight's."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _chunked(
    h: Tensor, weight: Tensor, bias: Tensor | None, t: Tensor, need: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The summed loss and, as ``need`` asks (for ``h``, ``weight``, ``bias``), its gradients, a chunk of
    rows at a time."""
    need_h, need_w, need_b = need
    dtype = _compute_dtype(weight)
    loss_dtype = torch.promote_types(dtype, torch.float32)
    with torch.autocast(weight.device.type, enabled=False):
        w = weight.to(dtype)  # (V, d)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=loss_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=loss_dtype, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=loss_dtype, device=h.device)
        step = chunk_rows(weight.shape[0])
        for start in range(0, h.shape[0], step):
            rows = h[start : start + step].to(dtype)  # (c, d)
            target = t[start : start + step]
            logits = torch.addmm(b, rows, w.t()) if b is not None else rows @ w.t()
            logits = logits.to(loss_dtype)  # (c, V): the loss in fp32 at least, whatever the product's dtype
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if any(need):
                grad = logits.sub_(lse[:, None]).exp_()  # dL/dlogits = softmax - onehot, over the logits
                grad[torch.arange(len(target), device=grad.device), target] -= 1.0
                if need_b:
                    grad_b += grad.sum(0)
                if need_h:
                    grad_h[start : start + step] = (grad.to(dtype) @ w).to(h.dtype)
                if need_w:
                    grad_w.addmm_(grad.t(), rows.to(loss_dtype))
    return total, grad_h, grad_w, grad_b


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """``sum_i -log softmax(h_i W^T + b)[t_i]`` for rows ``h (N, d)`` and targets ``t (N,)``; the gradients
    are formed in forward, backward scales them."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, t: Tensor) -> Tensor:
        total, *grads = _chunked(h, weight, bias, t, tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(*grads)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        out_h = grad_h * grad.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * grad).to(w_dtype) if grad_w is not None else None
        out_b = (grad_b * grad).to(b_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None


def fused_linear_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, t: Tensor) -> Tensor:
    """The summed cross-entropy of ``h @ weight.T + bias`` against the class ids ``t`` (every row counts:
    select the labelled rows first), a scalar in fp32 (fp64 for fp64 inputs), with no ``N x V`` tensor
    kept."""
    tensors = (h, weight, bias)
    if not torch.is_grad_enabled() or not any(x is not None and x.requires_grad for x in tensors):
        return _chunked(h, weight, bias, t, (False, False, False))[0]  # evaluation: the loss alone
    return _FusedLinearCrossEntropy.apply(h, weight, bias, t)
