"""DoRA's products with the dropout-masked input, computed from the few dropped inputs (CPU kernel).

With input dropout, DoRA (arXiv:2402.09353, Eq. 5 with ``x~ = dropout(x)``) needs ``W0 x~`` besides the base
output ``y = W0 x + b0``: twice the base layer's matrix products of a LoRA step. Each product with the masked
input has an exact form that touches only the dropped inputs, a fraction ``p`` (0.05 by default), with
``keep`` the mask and ``dropped`` its complement:

- forward: ``W0 (x * keep) + b0 = y - W0 (x * dropped)``, and ``A (x * keep) = A x - A (x * dropped)``: an
  embedding-bag sum of the weight's columns weighted by the dropped inputs, one bag per row;
- backward: for the gradient ``u`` reaching ``W0 (x * keep)``, ``keep * (u W0) = u W0 - dropped * (u W0)``.
  ``u W0`` is folded into the base layer's input gradient (``dL/dy`` takes ``+ u``), so only ``u W0`` at the
  dropped positions is left: one dot product of length ``d_out`` per dropped input, a sampled product
  (``torch.sparse.sampled_addmm`` on the positions' CSR pattern). ``dL/dA`` takes its dropped part back the
  same way (an index-add of one ``r``-vector per dropped input).

No input-sized masked copy is formed, and in eager mode only the positions (8 bytes per dropped input, 0.4
bytes per input at ``p = 0.05``) are saved instead of the 1-byte mask; compiled graphs call the operators at
the end of this module, which keep a one-element seed instead. On a CPU the dense products cost several times
the bag sums; a GPU's dense product is cheaper than gathering, so elsewhere DoRA's kernel keeps the dense
products.
"""

from __future__ import annotations

import torch
from torch import Tensor

import lorakit.kernels.dropped as dropped
from lorakit.kernels.dropped import rank_first_on_kept
from lorakit.kernels.gaps import dropped_indices


def products_on_kept(
    x: Tensor, y: Tensor, at: dropped.Dropped, flat: Tensor, w0: Tensor, a: Tensor
) -> tuple[Tensor, Tensor]:
    """``W0 (x * keep) + b0`` and ``A (x * keep)`` (``(N, out)``, ``(N, r)``) for ``x (N, in)`` and
    ``y = W0 x + b0``, from the dropped inputs: two new tensors, both contiguous."""
    values = dropped.dropped_values(x, flat)
    h = dropped.product_on_dropped(values, w0, at)
    return torch.sub(y, h, out=h), rank_first_on_kept(a, x, values, at)


def input_grads_on_kept(
    gz: Tensor, a: Tensor, g: Tensor, w0_e: Tensor | None, x: Tensor, at: dropped.Dropped, fold: bool,
    need_x: bool, need_a: bool,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """``dL/dx`` and ``dL/dA`` of ``s B A (x * keep) + (W0 (x * keep)) e`` for ``gz = dL/d(A (x * keep))``
    and ``g = dL/dout``, ``w0_e = e W0`` (None: no ``h`` term). ``fold``: ``y``'s backward already carries
    ``g w0_e`` on every input, so only its dropped positions are taken back."""
    grad_x = grad_a = None
    flat = at.flat(x.shape[1])
    if need_a:  # gz^T (x * keep) = gz^T x - gz^T (x * dropped)
        grad_a = dropped.gram_on_kept(gz, x, at, flat)
    if need_x:
        grad_x = gz @ a  # (N, in)
        if w0_e is not None and fold:
            grad_x.view(-1).index_copy_(0, flat, dropped.product_at_dropped(g, w0_e, at).neg_())
        else:
            if w0_e is not None:
                grad_x = grad_x.addmm_(g, w0_e)
            grad_x.view(-1).index_fill_(0, flat, 0)
    return grad_x, grad_a


# Under torch.compile the dropped count is data-dependent, so the compiled graph calls these operators, which
# draw the positions themselves from the one-element seed the compiled function keeps (the same draw as eager
# mode's, :func:`~lorakit.kernels.gaps.dropped_indices`), whole.


def _positions_from(seed: Tensor, p: float, x: Tensor) -> tuple[dropped.Dropped, Tensor]:
    flat = dropped_indices(x.numel(), p, int(seed.item()), x.device)
    return dropped.dropped_at(flat, x.shape), flat


@torch.library.custom_op("lorakit::dora_products_on_kept", mutates_args=())
def products_on_kept_op(
    x: Tensor, y: Tensor, seed: Tensor, p: float, w0: Tensor, a: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`products_on_kept` with the dropped positions drawn from ``seed``."""
    return products_on_kept(x, y, *_positions_from(seed, p, x), w0, a)


@products_on_kept_op.register_fake
def _(x: Tensor, y: Tensor, seed: Tensor, p: float, w0: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(y), x.new_empty(x.shape[0], a.shape[0])


@torch.library.custom_op("lorakit::dora_input_grads_on_kept", mutates_args=())
def input_grads_on_kept_op(
    gz: Tensor, a: Tensor, g: Tensor, w0_e: Tensor | None, x: Tensor, seed: Tensor, p: float, fold: bool,
    need_x: bool, need_a: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`input_grads_on_kept` with the dropped positions drawn from ``seed`` again; a gradient not asked
    for is an empty tensor."""
    at, _ = _positions_from(seed, p, x)
    grad_x, grad_a = input_grads_on_kept(gz, a, g, w0_e, x, at, fold, need_x, need_a)
    return (grad_x if need_x else x.new_empty(0)), (grad_a if need_a else x.new_empty(0))


@input_grads_on_kept_op.register_fake
def _(
    gz: Tensor, a: Tensor, g: Tensor, w0_e: Tensor | None, x: Tensor, seed: Tensor, p: float, fold: bool,
    need_x: bool, need_a: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    grad_x = x.new_empty(x.shape) if need_x else x.new_empty(0)
    return grad_x, (x.new_empty(a.shape) if need_a else x.new_empty(0))
