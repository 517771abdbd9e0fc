"""The low-rank path ``s * B (A dropout(x))`` with a backward that saves as little as possible.

Plain autograd saves the dropped-out input (a copy of ``x``, ``N x d_in``) for every adapted layer, plus its
mask; three adapters reading the same hidden state (query, key, value) save three copies. That is why a
naively written LoRA step can need *more* activation memory than full fine-tuning. This function instead saves
the original ``x`` (the very tensor the rest of the network already keeps, so no new memory), the small
``z = A x~`` (``N x r``) and the dropout mask as booleans (a quarter of an fp32 copy). On a CPU at the usual
drop rates not even the mask is formed: the products with ``x * keep`` are taken from the dropped inputs
(:mod:`lorakit.core.dropped`) and their positions are kept (0.4 bytes per input at ``p = 0.05``).

If ``A`` is frozen (LoRA-FA, arXiv:2308.03303) nothing of size ``N x d_in`` is saved at all: ``dL/dB`` needs
only ``z`` and ``dL/dx`` only ``A``, ``B`` and the mask, which backward regenerates from a seed.

On a plain frozen matrix layer (:func:`forms_base_output`) the function also forms the base output
``W0 x + b0`` and the base input gradient itself, so the layer is one node of the graph and neither output is
copied. The rank-thin products are written in the order and row blocks a CPU runs fast
(:mod:`lorakit.core.skinny`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.core.dropped import (
    Dropped,
    dropped_at,
    dropped_values,
    gram_on_kept,
    product_at_dropped,
    product_on_dropped,
)
from lorakit.core.skinny import gram_rank_first, rank_first, rank_gram, rows_of

if TYPE_CHECKING:
    from lorakit.core.layer import AdaptedLayer


_GAPS_UP_TO = 0.25  # on a CPU, drop rates up to this are drawn as the gaps between dropped elements


def draws_gaps(device: torch.device, p: float) -> bool:
    """Whether masks for ``p`` on ``device`` are drawn as :func:`dropped_indices` (a CPU, ``p <= 0.25``)."""
    return device.type == "cpu" and 0 < p <= _GAPS_UP_TO


def _gap_count(remaining: int, p: float) -> int:
    """How many gaps to draw for ``remaining`` elements: past the end in all but about one draw in ``10**9``
    (six standard deviations above the mean count); the rare shortfall draws again."""
    mean = remaining * p
    return int(mean + 6 * math.sqrt(mean) + 16)


def dropped_indices(numel: int, p: float, seed: int, device: torch.device) -> Tensor:
    """The flat indices (sorted, int64) of the elements that dropout at rate ``p`` drops among ``numel``,
    reproducible from ``seed``.

    In a sequence of independent Bernoulli(p) drops the gaps between consecutive drops are geometric:
    ``1 + floor(log(1 - u) / log(1 - p))`` for a uniform ``u``. So one random number per *dropped* element
    is drawn (5% of the elements at p = 0.05) instead of one per element. ``u`` is fp32 (the log of an fp64
    draw costs seven times more); each gap's distribution is exact up to ``u``'s resolution, ``2**-24``.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    per_log = 1.0 / math.log1p(-p)
    runs, last = [], -1  # last: the last index drawn so far
    while last < numel:
        u = torch.empty(_gap_count(numel - 1 - last, p), dtype=torch.float32, device=device)
        u.uniform_(generator=gen)
        gaps = u.neg_().log1p_().mul_(per_log).floor_().to(torch.int64).add_(1)
        gaps[:1].add_(last)
        runs.append(gaps.cumsum_(0))
        last = int(runs[-1][-1])
    flat = torch.cat(runs) if len(runs) > 1 else runs[0]
    return flat[: int(torch.searchsorted(flat, numel))]


def _keep_mask(x: Tensor, p: float, seed: int) -> Tensor:
    """Dropout's boolean keep-mask (1 byte per element), reproducible from ``seed``.

    On a CPU at the usual rates (``p <= 0.25``) it is drawn as the positions of the dropped elements
    (:func:`dropped_indices`): three times faster than the comparison below, and ``bernoulli_`` (one
    generator call per element) is slower still. Otherwise each element compares 16 random bits with a
    threshold, four elements per 64-bit draw; the drop probability is then ``p`` rounded to a multiple of
    ``2**-16`` (an error below ``8e-6``).
    """
    if draws_gaps(x.device, p):
        keep = torch.ones(x.shape, dtype=torch.bool, device=x.device)
        keep.view(-1).index_fill_(0, dropped_indices(x.numel(), p, seed, x.device), False)
        return keep
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-(2**63), None, generator=gen)  # all 64 bits uniform
    bits = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform on [-2**15, 2**15)
    dropped = min(round(p * 2**16), 2**16 - 1)  # how many of the 2**16 values drop; p < 1 keeps at least one
    return bits >= dropped - 2**15


@torch.library.custom_op("lorakit::keep_mask", mutates_args=())
def _keep_mask_op(like: Tensor, p: float, seed: Tensor) -> Tensor:
    """:func:`_keep_mask` as an operator the compiler keeps whole in its graph: drawing inside a traced
    function would break the graph (a seeded generator, ``.item()``), and the compiler's own dropout draws
    one random number per element, several times slower on a CPU. ``seed`` is a one-element int64 tensor
    drawn in the graph; the mask depends only on it, so the compiler may reorder the call, never repeat a
    different draw."""
    return _keep_mask(like, p, int(seed.item()))


@_keep_mask_op.register_fake
def _(like: Tensor, p: float, seed: Tensor) -> Tensor:
    return torch.empty_like(like, dtype=torch.bool)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout on an adapter's input: ``x * keep / (1 - p)`` with :func:`_keep_mask`'s mask, eager
    or compiled (the same draw in both, a quarter of ``bernoulli_``'s random numbers). Under torch.func
    transforms (DP's per-example gradients) and for non-float inputs it is ``F.dropout``: one mask per
    vmapped example needs the transform's own randomness."""
    if not training or p == 0:
        return x
    if not fused_backward_allowed() or not x.is_floating_point():
        return F.dropout(x, p, training=True)
    return _apply_mask(x, keep_mask(x, p)).mul_(1.0 / (1.0 - p))


def _new_seed() -> Tensor:
    """A mask seed (one-element int64) from the global generator, so `torch.manual_seed` fixes every mask."""
    return torch.randint(0, 2**62, (1,))


def keep_mask(x: Tensor, p: float) -> Tensor:
    """A fresh dropout keep-mask shaped like ``x`` (``bool``), seeded from the global generator, eager or
    compiled (with the same global seed both draw the same mask)."""
    seed = _new_seed()
    if torch.compiler.is_compiling():
        return _keep_mask_op(x.detach(), p, seed)
    return _keep_mask(x, p, int(seed.item()))


def fresh_dropped_indices(x: Tensor, p: float) -> Tensor:
    """The flat indices that :func:`keep_mask` would mark False with the same global seed (eager, where
    :func:`draws_gaps`), without forming the mask."""
    return dropped_indices(x.numel(), p, int(_new_seed().item()), x.device)


def _apply_mask(x: Tensor, keep: Tensor) -> Tensor:
    """``x * keep`` for a boolean ``keep``, as ``nn.Dropout`` multiplies (a non-finite ``x`` stays NaN).

    The mask's bytes are read as ``uint8``: that product runs in one pass, about twice as fast on a CPU as
    ``where`` or a product with the ``bool`` tensor (which casts it first). Compiled code multiplies by the
    ``bool`` mask itself: the compiler reads it as a vector mask; the byte view costs it a scalar loop."""
    return x * keep if torch.compiler.is_compiling() else x * keep.view(torch.uint8)


def rank_first_on_kept(m: Tensor, rows: Tensor, values: Tensor, at: Dropped) -> Tensor:
    """:func:`rank_first` of the masked rows, ``(rows * keep) @ m.T = rows @ m.T - (rows * dropped) @ m.T``,
    from the dropped ``values`` at ``at`` (:mod:`lorakit.core.dropped`)."""
    return rank_first(m, rows).sub_(product_on_dropped(values, m, at))


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
        w0: Tensor | None = None, bias: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        device = x.device.type
        # Under autocast the products run in the autocast dtype, as they would for nn.Linear; backward (which
        # autocast does not cover) uses the same dtype explicitly.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            a_c, b_c, x_c = a.to(dtype), b.to(dtype), x.to(dtype)
            x2, mask, at = rows_of(x_c), None, None
            if p > 0 and takes_positions(x, dtype, p):
                flat = dropped_indices(x.numel(), p, seed, x.device)
                at = dropped_at(flat, x2.shape)
                z = rank_first_on_kept(a_c, x2, dropped_values(x2, flat), at)
            else:
                mask = _keep_mask(x, p, seed) if p > 0 else None
                z = rank_first(a_c, rows_of(_apply_mask(x_c, mask)) if mask is not None else x2)
            z = z.reshape(*x.shape[:-1], a.shape[0])  # (..., r)
            if p > 0:
                z = z.div_(1.0 - p)
            if w0 is not None:  # (..., out): W0 x + b0, then + s B z on the same buffer
                base = F.linear(x2, w0.to(dtype), None if bias is None else bias.to(dtype))
                out = base.addmm_(rows_of(z), b_c.t(), alpha=scale).view(*x.shape[:-1], w0.shape[0])
            elif y is not None and y.dtype == dtype:
                out = torch.addmm(rows_of(y), rows_of(z), b_c.t(), alpha=scale).view(y.shape)  # y + s B z
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
                grad_a = rank_gram(gz.t(), _apply_mask(x2, mask.view(x2.shape)) if mask is not None else x2)
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
                    keep = mask if mask is not None else _keep_mask(lowrank_x, ctx.p, ctx.seed)
                    lowrank_x = _apply_mask(lowrank_x, keep.view(lowrank_x.shape))
                grad_x = lowrank_x if grad_x is None else grad_x.add_(lowrank_x)
            grad_x = grad_x.reshape(*grad.shape[:-1], a.shape[-1]).to(x_dtype)
        return grad_x, grad_a, grad_b, grad if need_y else None, None, None, None, None, None


def takes_positions(x: Tensor, dtype: torch.dtype, p: float) -> bool:
    """Whether the products with the masked input are taken from the dropped positions
    (:mod:`lorakit.core.dropped`): where the mask is drawn as gaps, in fp32 or fp64 without a cast (a bf16
    ``A x - A (x * dropped)`` would round differently from ``A (x * keep)``)."""
    return draws_gaps(x.device, p) and x.dtype == dtype and dtype in (torch.float32, torch.float64)


def fused_backward_allowed() -> bool:
    """Whether a hand-written autograd function may run here; otherwise plain autograd is used.

    Not under torch.func transforms (per-sample gradients for DP): the functions have no vmap rule, and one
    dropout mask would be shared across the vmapped examples. ``torch.compile`` traces them: they take their
    dropout mask as a tensor (:func:`keep_mask`), drawn by an operator the graph keeps whole.
    """
    return not torch._C._are_functorch_transforms_active()


def forms_base_output(base: AdaptedLayer, x: Tensor) -> bool:
    """Whether :func:`low_rank` with ``with_base`` forms the base output for ``x`` inside its function (a
    matrix layer computing exactly its kind's op with a frozen float weight, see
    :meth:`~lorakit.core.layer.AdaptedLayer.base_output_formable`): a variant built on it then needs no base
    output from the layer."""
    return (
        base.kind.features_last
        and x.is_floating_point()
        and fused_backward_allowed()
        and base.base_output_formable(x)
    )


def low_rank(
    base: AdaptedLayer, x: Tensor, a: Tensor, b: Tensor, scale: float, p: float, training: bool,
    y: Tensor | None = None, with_base: bool = False,
) -> Tensor:  # fmt: skip
    """``scale * up(down(dropout(x), A), B)`` for any layer kind, shaped like the base output; with
    ``with_base``, the base output plus that, in the base output's dtype: ``y`` where given, else formed
    here (a variant's forward given ``y=None`` as its :meth:`~lorakit.core.variant.Variant.needs_base_output`
    asked, after :func:`forms_base_output`).

    ``a``: ``(r, in)``, ``b``: ``(out, r)``. Matrix layers (Linear, GPT-2 Conv1D) use the memory-lean
    function above; convolutions and embeddings go through their kind's ``down``/``up`` with plain autograd.
    """
    p = p if training else 0.0
    w0 = bias = None
    if with_base and y is None:
        # Compiled with dropout, the function is given the masked input: the base output is formed apart.
        if forms_base_output(base, x) and not (p > 0 and torch.compiler.is_compiling()):
            w0, bias = base.weight_2d(), base.bias
        else:
            y = base.base_layer(x)
    if base.kind.features_last and x.is_floating_point() and fused_backward_allowed():
        if torch.compiler.is_compiling():
            # The compiler traces the function too (its products in the fast order), with the mask drawn by
            # an operator it keeps whole (a seeded generator inside the graph would break it).
            return _LowRankFunction.apply(dropout(x, p), a, b, y, scale, 0.0, 0, w0, bias)
        seed = int(_new_seed().item()) if p > 0 else 0
        return _LowRankFunction.apply(x, a, b, y, scale, p, seed, w0, bias)
    x = dropout(x, p)
    dtype = x.dtype if x.is_floating_point() else a.dtype
    z = base.kind.down(base.base_layer, x, a.to(dtype))
    out = base.kind.up(z, b.to(dtype)) * scale
    return out if y is None else y + out.to(y.dtype)
