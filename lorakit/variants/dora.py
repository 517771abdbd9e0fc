"""DoRA: weight-decomposed low-rank adaptation. Liu et al., 2024, arXiv:2402.09353.

``V = W0 + s B A`` (LoRA, ``s = alpha / r``) and ``W' = m * V / ||V||_row`` (Eq. 5): a trainable magnitude
``m (d_out,)`` times the unit direction of each output row. Rows are rows of the ``(out, in)`` view, so the
norm is over all but the output dim for every kind (over the vocabulary for embeddings, as PEFT does). The
norm is detached (Sec. 4.3): A and B get gradients only through the numerator.

Forward without forming ``W'``: with ``c = m / ||V||_row``, ``W' x~ = c * (W0 x~ + s B A x~)``, so
``y' = y + (c - 1) * (W0 x~) + c * s B A x~``. Without dropout ``W0 x = y - b0`` is reused; with dropout
``W0 x~`` costs one extra base op on the dropped-out input (on a CPU, products with the few dropped inputs
only: :mod:`lorakit.variants.dora_sparse`). The row norm never forms a ``d_out x d_in`` product:
``||V_i||^2 = ||W0_i||^2 + 2 s <W0_i, (BA)_i> + s^2 ||(BA)_i||^2`` with ``(out, r)`` temporaries only.

Step 0: ``B = 0`` (``A = 0`` for embeddings) and ``m = ||W0||_row``, so ``c = 1`` and ``W' = W0`` exactly.

Matrix layers (Linear, GPT-2 Conv1D) run the whole adapter as one autograd function, :class:`DoRAFunction`:
the output is formed in the low-rank product's output buffer with in-place passes, and backward keeps
``W0 x~`` (without dropout ``y`` itself, so nothing new), the low-rank ``z`` and the 1-byte dropout mask (or
the dropped positions), where plain autograd keeps ``W0 x~``, the low-rank output and a dropped-out copy of
``x`` (PEFT also keeps the base output). The dropout mask is drawn as LoRA's (:mod:`lorakit.core.lowrank`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.core.contract import PeftSpec, Shared
from lorakit.core.dropped import Dropped, dropped_at, dropped_positions
from lorakit.core.layer import AdaptedLayer
from lorakit.core.lowrank import (
    _apply_mask,
    _new_seed,
    fresh_dropped_indices,
    fused_backward_allowed,
    keep_mask,
    low_rank,
)
from lorakit.core.skinny import gram_rank_first, rank_first, rank_gram
from lorakit.variants.dora_sparse import (
    input_grads_on_kept,
    input_grads_on_kept_op,
    products_on_kept,
    products_on_kept_op,
    sparse_complement_pays,
)
from lorakit.variants.lora import LoRA, LoRAConfig

_ROWS = 4096  # rows of W0 upcast to fp32 at a time (bounds the temporary for bf16 or dequantised bases)


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA: the LoRA fields (rank, alpha, dropout, rslora); the magnitude needs no settings."""

    def validate(self) -> None:
        super().validate()


def _key(*tensors: Tensor) -> tuple | None:
    # Identifies tensor contents: in-place updates (optimizer steps, loads, merges) bump ``_version``.
    # None under torch.func transforms (wrapped tensors have no storage) and while torch.compile traces
    # (storage addresses are not traceable): nothing is cached there.
    if torch.compiler.is_compiling():
        return None
    try:
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    except RuntimeError:
        return None


def w0_sq_norms(w0: Tensor) -> Tensor:
    """``||W0_i||^2`` per row in fp32, ``(out,)``."""
    return torch.cat([rows.float().square().sum(1) for rows in w0.split(_ROWS)])


@torch.no_grad()
def row_norm(w0: Tensor, w0_sq: Tensor, a: Tensor, b: Tensor, s: float) -> Tensor:
    """``||W0 + s B A||_row`` in fp32, never forming ``B A``: ``w0 (out, in)``, ``a (r, in)``, ``b (out, r)``.

    Called under no_grad: the norm is a constant for autograd (paper Sec. 4.3)."""
    a, b = a.float(), b.float()
    w0a = torch.cat([rows.float() @ a.t() for rows in w0.split(_ROWS)])  # (out, r) = W0 A^T
    rowdot = (w0a * b).sum(1)  # <W0_i, (BA)_i> = (B A W0^T)_ii
    ba_sq = ((b @ (a @ a.t())) * b).sum(1)  # ||(BA)_i||^2 = (B A A^T B^T)_ii
    norm = (w0_sq + 2 * s * rowdot + s * s * ba_sq).clamp_min(0).sqrt()
    # An all-zero row has no direction: divide by 1 instead of 0 (its output stays exactly zero, no NaN).
    return norm.masked_fill(norm == 0, 1.0)


def _draws_positions(x: Tensor, y: Tensor, w0: Tensor, p: float) -> bool:
    """Whether the dropout of :class:`DoRAFunction` is drawn as the dropped positions (no mask is formed):
    without autocast, where the function takes the sparse forms."""
    return not torch.is_autocast_enabled(x.device.type) and sparse_complement_pays(x, y, w0, p)


class DoRAFunction(torch.autograd.Function):
    """``out = y + (c - 1) W0 x~ + c s B A x~`` with ``c = m / n`` (``n`` the detached row norm), fused.

    ``x~ = x * keep / (1 - p)``. The base products read ``h = W0 (x * keep) + b0``, so ``W0 x~ = k (h - b0)``
    with ``k = 1 / (1 - p)``; without dropout ``h = y`` is reused. With ``e = k (c - 1)`` and ``z = A x~``:
    ``out = y + e (h - b0) + c s B z``, formed in fp32 in two passes (the ``- e b0`` rides on the low-rank
    product), so a small change of ``m`` is not lost under bf16.

    Backward, with ``g = dL/dout``: ``dL/dh = e g`` (``dL/dy = c g`` when ``h = y``), which reaches ``x`` as
    ``keep * (e g W0)``; on a CPU that product is folded into ``y``'s (:mod:`.dora_sparse`). When ``w0`` is
    the stored weight itself (``w0_stored``, not a dequantised copy) in the compute dtype, ``y``'s part of
    ``dL/dx``, ``(dL/dy) W0``, is formed here on ``dL/dx``'s own buffer: no scaled copy of ``dL/dy``, no
    second input gradient for autograd to add, and ``y`` gets none (the base layer's backward has nothing to
    do). The low-rank path gets ``c g`` (folded into ``B``: ``(c g) B = g (c B)``);
    ``dL/dm = sum_N g (W0 x~ + s B z) / n`` with ``sum_N g (B z) = rowsum(B * g^T z)``. Saved: ``h`` (``y``
    itself without dropout: no new tensor), the small ``z``, and the dropout as given: a 1-byte mask
    (``keep``), the dropped positions (``dropped``, eager on a CPU) or a one-element ``seed`` the compiled
    operators draw the same positions from.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, y: Tensor, w0: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, m: Tensor,
        norm: Tensor, scale: float, p: float, keep: Tensor | None, dropped: tuple[Dropped, Tensor] | None,
        seed: Tensor | None, w0_stored: bool,
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
            eager_mask = mask is not None and not torch.compiler.is_compiling()
            sparse = (
                dropped is not None
                or seed is not None
                or (eager_mask and sparse_complement_pays(x2, y2, w0, p))
            )
            at = None  # the dropped positions, kept in eager mode instead of the mask
            if mask is None and dropped is None and seed is None:
                h, z = y2, rank_first(a_c, x2)
            elif sparse:  # W0 (x * keep) + b0 and A (x * keep) from the dropped inputs
                if seed is not None:  # compiled: the operator draws the positions (a data-dependent count)
                    h, z = products_on_kept_op(x2, y2, seed, p, w0, a_c)
                else:
                    at, flat = dropped if dropped is not None else dropped_positions(mask)
                    h, z = products_on_kept(x2, y2, at, flat, w0, a_c)
                    mask = None  # backward reads the positions
            else:
                xm = _apply_mask(x2, mask)
                w0_c = w0.to(dtype).t()
                h = torch.addmm(b0.to(dtype), xm, w0_c) if b0 is not None else xm @ w0_c
                z = rank_first(a_c, xm)
                del xm
            if p > 0:
                z = z.div_(1 - p)  # (N, r), A x~
            # y + e (h - b0) + c s B z: y + e h in one pass (c y when h = y, as e = c - 1), then the low-rank
            # product added in place, with -e b0 riding on it as one more rank (a column of ones)
            out = torch.mul(y2, c) if p == 0 else torch.addcmul(y2, h, e)  # promoted to fp32 under bf16
            zt, cb = z.t().to(acc), (b_c.to(acc) * (c * scale)[:, None]).t()  # z^T (r, N), (c s B)^T (r, out)
            if b0 is not None:
                zt, cb = torch.cat([zt, zt.new_ones(1, zt.shape[1])]), torch.cat([cb, (-e * b0)[None]])
            out = out.addmm_(zt.t(), cb).to(y2.dtype)
        ctx.scale, ctx.p, ctx.sparse, ctx.dtypes = scale, p, sparse, (x.dtype, a.dtype, b.dtype, m.dtype)
        ctx.base_grad_here = w0_stored and w0.dtype == dtype
        positions = at if at is not None else (None, None, None)
        w0_saved = w0 if p > 0 or ctx.base_grad_here else None
        saved = (x, mask, w0_saved, a_c, b_c, z, h, c, norm, b0, seed, *positions)
        ctx.save_for_backward(*saved)
        return out.view(y.shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, mask, w0, a, b, z, h, c, norm, b0, seed, *positions = ctx.saved_tensors
        at = Dropped(*positions) if positions[0] is not None else None
        x_dtype, a_dtype, b_dtype, m_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        scale, p = ctx.scale, ctx.p
        e = (c - 1) / (1 - p)
        g = grad.reshape(-1, grad.shape[-1]).to(b.dtype)  # (N, out), in the forward's compute dtype
        grad_x = grad_y = grad_a = grad_b = grad_m = None
        # Folded: y's product takes dL/dh = e g too (its product with W0 is the one x needs, on every input),
        # and dL/dx gives it back at the dropped positions, where h does not read x.
        fold = ctx.sparse and need[0] and need[1]
        coef = c if p == 0 else 1 + e if fold else None  # dL/dy = coef g (None: 1)
        here = ctx.base_grad_here and need[0] and need[1]  # (dL/dy) W0 formed here, on dL/dx
        if need[1] and not here:
            # fp32 coefficient, one rounding of the product (out=): a bf16 c would move in steps of 2**-8
            grad_y = grad if coef is None else torch.mul(grad, coef, out=torch.empty_like(grad))
        if need[5] or need[6]:
            gzt = gram_rank_first(g, z).to(c.dtype)  # g^T z, (out, r)
            if need[5]:
                grad_b = (gzt * c[:, None]).mul_(scale).to(b_dtype)
            if need[6]:
                gh = (g * h).sum(0, dtype=c.dtype)  # sum_N g h
                if b0 is not None:
                    gh -= b0 * g.sum(0, dtype=c.dtype)
                gh /= 1 - p  # sum_N g W0 x~
                gh += scale * (b.to(c.dtype) * gzt).sum(1)  # sum_N g s B z
                grad_m = (gh / norm).to(m_dtype)
        if need[0] or need[4]:
            cb = (b.to(c.dtype) * (c * (scale / (1 - p)))[:, None]).to(b.dtype)  # c B, scaled
            gz = rank_first(cb.t(), g)  # dL/d(A (x * keep)), (N, r)
            x2 = x.reshape(-1, x.shape[-1]).to(a.dtype)
            w0_e = w0.to(c.dtype) * e[:, None] if p > 0 and need[0] else None  # e g W0 = g (e W0)
            if ctx.sparse:  # h and z read x * keep: products with the dropped inputs
                args = (gz, a, g, w0_e, x2)
                if at is not None:
                    grad_x, grad_a = input_grads_on_kept(*args, at, fold, need[0], need[4])
                else:
                    grad_x, grad_a = input_grads_on_kept_op(*args, seed, p, fold, need[0], need[4])
            else:
                if need[4]:
                    grad_a = rank_gram(gz.t(), _apply_mask(x2, mask) if mask is not None else x2)
                if need[0]:
                    grad_x = gz @ a  # the low-rank path's part, (N, in)
                    if p > 0:  # h reads x too: keep * (g e W0)
                        grad_x = _apply_mask(grad_x.addmm_(g, w0_e.to(g.dtype)), mask)
            if here:  # y's part: (dL/dy) W0 = g (coef W0)
                grad_x = grad_x.addmm_(
                    g, w0 if coef is None else (w0.to(c.dtype) * coef[:, None]).to(g.dtype)
                )
            grad_a = grad_a.to(a_dtype) if need[4] else None
            grad_x = grad_x.view(x.shape).to(x_dtype) if need[0] else None
        return grad_x, grad_y, None, None, grad_a, grad_b, grad_m, None, None, None, None, None, None, None


class DoRA(LoRA):
    """``W' = m * (W0 + s B A) / ||W0 + s B A||_row`` (norm detached)."""

    name = "dora"
    config_class = DoRAConfig
    summary = "LoRA direction plus a trainable per-row magnitude m; W' = m V / ||V||_row"
    paper = "arXiv:2402.09353"
    peft = PeftSpec(
        "LORA",
        names={"m": "lora_magnitude_vector"},
        config_fields={"rslora": "use_rslora"},
        flags={"use_dora": True},
    )

    def __init__(self, config: DoRAConfig, base: AdaptedLayer, shared: Shared) -> None:
        super().__init__(config, base, shared)
        # Caches are plain attributes, not buffers: they derive from the base weight and A, B, so they are
        # rebuilt after a load or a dtype/device move and never enter the adapter file.
        self._w0_sq: tuple[tuple, Tensor] | None = None  # ||W0||^2_row, keyed on the base weight
        self._eval_norm: tuple[tuple, Tensor] | None = None  # ||V||_row in eval mode, keyed on W0, A, B
        self._merge_state: tuple[Tensor, Tensor, Tensor] | None = None  # (norm, rows with m = 0, their W0)
        # m = ||W0||_row, bit-equal to the forward's norm at step 0 (B A = 0 there), so c = 1 exactly.
        self.m = nn.Parameter(self.w0_sq(base.weight_2d(), base).sqrt())  # (out,)

    def w0_sq(self, w0: Tensor, base: AdaptedLayer) -> Tensor:
        key = _key(base.stored_weight())
        if key is None:
            return w0_sq_norms(w0)
        if self._w0_sq is None or self._w0_sq[0] != key:
            self._w0_sq = (key, w0_sq_norms(w0))
        return self._w0_sq[1]

    def weight_norm(self, base: AdaptedLayer) -> Tensor:
        """``||W0 + s B A||_row`` (fp32, detached, ``(out,)``); cached in eval mode until W0, A, B change."""
        key = None if self.training else _key(base.stored_weight(), self.A, self.B)  # training: A, B move
        if key is not None and self._eval_norm is not None and self._eval_norm[0] == key:
            return self._eval_norm[1]
        w0 = base.weight_2d()
        norm = row_norm(w0, self.w0_sq(w0, base), self.A, self.B, self.scale)
        self._eval_norm = None if key is None else (key, norm)
        return norm

    def needs_base_output(self, x: Tensor, base: AdaptedLayer) -> bool:
        return True  # the magnitude scales W0 x~ + b0, which the forward forms from y

    def forward(self, x: Tensor, y: Tensor, base: AdaptedLayer) -> Tensor:
        bias = base.bias
        p = self.config.dropout if self.training and self.dropout is not None else 0.0
        if (
            base.kind.features_last
            and x.is_floating_point()
            and fused_backward_allowed()
            # The function has no gradient for a base weight or bias that trains too.
            and not base.stored_weight().requires_grad
            and (bias is None or not bias.requires_grad)
            # With dropout it keeps W0 for backward: a 4-bit base's would be a full-precision copy.
            and not (p > 0 and base.weight_is_dequantised())
        ):
            w0 = base.weight_2d()
            keep = dropped = seed = None
            if p > 0 and _draws_positions(x, y, w0, p):  # the dropped positions, without a mask
                if torch.compiler.is_compiling():  # drawn by the operators, from the same seed as eager's
                    seed = _new_seed()
                else:
                    flat = fresh_dropped_indices(x, p)
                    dropped = (dropped_at(flat, x.reshape(-1, x.shape[-1]).shape), flat)
            elif p > 0:
                keep = keep_mask(x, p)
            norm = self.weight_norm(base)
            stored = base.has_frozen_dense_weight()
            return DoRAFunction.apply(
                x, y, w0, bias, self.A, self.B, self.m, norm, self.scale, p, keep, dropped, seed, stored
            )
        view = base.kind.channel_view
        # c = m / ||V|| stays fp32: near 1 a bf16 c moves in steps of 2**-8, so a small change of m would be
        # lost (c - 1 exactly 0). The sum is formed in fp32 (by promotion) and cast once to the output dtype.
        c = view(self.m.float() / self.weight_norm(base))  # broadcast on channels
        if self.training and self.dropout is not None:
            x = self.drop(x)
            if base.weight_is_dequantised():  # the 4-bit layer's own op keeps its codes, not W0, for backward
                w0x = base.base_layer(x)
                w0x = w0x if base.bias is None else w0x - view(base.bias.to(w0x.dtype))
            else:
                w0x = base.kind.op(base.base_layer, x, base.weight_2d())  # W0 x~: one extra base op
        else:
            w0x = y if base.bias is None else y - view(base.bias.to(y.dtype))  # W0 x, reused from y
        lora = low_rank(base, x, self.A, self.B, self.scale, 0.0, self.training)
        return (y + (c - 1) * w0x + c * lora).to(y.dtype)

    def merged_weight(self, w0: Tensor, base: AdaptedLayer) -> Tensor:
        v = w0 + self.delta_weight().to(w0.dtype)  # (out, in): merging forms the weight anyway
        norm = v.float().norm(dim=1)
        norm = norm.masked_fill(norm == 0, 1.0)
        dead = self.m.detach() == 0  # rows that W' zeroes: W0 cannot be recovered from them, so keep it
        self._merge_state = (norm, dead, w0[dead].clone())
        return (self.m.detach().float() / norm).to(w0.dtype)[:, None] * v

    def unmerged_weight(self, w: Tensor, base: AdaptedLayer) -> Tensor:
        if self._merge_state is None:
            raise RuntimeError("DoRA unmerge needs the norm cached by merge; merge before unmerging")
        norm, dead, rows = self._merge_state
        m = self.m.detach().float().masked_fill(dead, 1.0)
        v = (norm / m).to(w.dtype)[:, None] * w  # W = m V / n  ->  V = W n / m
        w0 = v - self.delta_weight().to(w.dtype)  # W0 = V - s B A
        w0[dead] = rows.to(w.dtype)
        self._merge_state = None
        return w0
