"""Dropout on an adapter's input, ``x~ = x * keep / (1 - p)``, with masks drawn from seeds.

Each mask is drawn from a one-element seed taken from the global generator (:func:`new_seed`), so
``torch.manual_seed`` fixes every mask: a variant's plain forward and a kernel computing the same form draw
the same mask in the same call, eager or compiled, which is what lets tests compare them. A kernel may draw
the mask another way (``lorakit.kernels``: the positions of the dropped elements on a CPU); the plain draw
below is used wherever none is registered, and the mask is the same for every reader of one seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.core.seam import fast_keep_mask


def transforms_active() -> bool:
    """Whether torch.func transforms run (DP's per-example gradients): the mask must then be the transform's
    own draw (one per vmapped example), and hand-written autograd functions, which have no vmap rule, may not
    run."""
    return torch._C._are_functorch_transforms_active()


def new_seed() -> Tensor:
    """A mask seed (one-element int64) from the global generator."""
    return torch.randint(0, 2**62, (1,))


def draw_keep_mask(x: Tensor, p: float, seed: int) -> Tensor:
    """The plain draw of a keep-mask shaped like ``x`` (``bool``): each element compares 16 random bits with
    a threshold, four elements per 64-bit draw, on ``x``'s device. The drop probability is ``p`` rounded to a
    multiple of ``2**-16`` (an error below ``8e-6``)."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-(2**63), None, generator=gen)  # all 64 bits uniform
    bits = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform on [-2**15, 2**15)
    dropped = min(round(p * 2**16), 2**16 - 1)  # how many of the 2**16 values drop; p < 1 keeps at least one
    return bits >= dropped - 2**15


def keep_mask(x: Tensor, p: float, seed: int) -> Tensor:
    """The keep-mask for ``seed``: a kernel's draw where one covers the case, else the plain one."""
    mask = fast_keep_mask(x, p, seed)
    return draw_keep_mask(x, p, seed) if mask is None else mask


@torch.library.custom_op("lorakit::keep_mask", mutates_args=())
def _keep_mask_op(like: Tensor, p: float, seed: Tensor) -> Tensor:
    """:func:`keep_mask` as an operator the compiler keeps whole in its graph: a seeded generator or
    ``.item()`` inside a traced function would break the graph. ``seed`` is drawn in the graph; the mask
    depends only on it, so the compiler may move the call but never draws a different mask."""
    return keep_mask(like, p, int(seed.item()))


@_keep_mask_op.register_fake
def _(like: Tensor, p: float, seed: Tensor) -> Tensor:
    return torch.empty_like(like, dtype=torch.bool)


def fresh_keep_mask(x: Tensor, p: float) -> Tensor:
    """A keep-mask shaped like ``x`` from a fresh seed (:func:`new_seed`), eager or compiled."""
    seed = new_seed()
    if torch.compiler.is_compiling():
        return _keep_mask_op(x.detach(), p, seed)
    return keep_mask(x, p, int(seed.item()))


def apply_mask(x: Tensor, keep: Tensor) -> Tensor:
    """``x * keep`` for a boolean ``keep``, as ``nn.Dropout`` multiplies (a non-finite ``x`` stays NaN). The
    mask's bytes are read as ``uint8``, which multiplies in one pass (a ``bool`` operand is cast first);
    compiled code multiplies by the ``bool`` mask, which the compiler reads as a vector mask."""
    return x * keep if torch.compiler.is_compiling() else x * keep.view(torch.uint8)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout, ``x * keep / (1 - p)``, with a fresh mask (:func:`fresh_keep_mask`). Under torch.func
    transforms and for non-float inputs it is ``F.dropout``: one mask per vmapped example needs the
    transform's own randomness."""
    if not training or p == 0:
        return x
    if transforms_active() or not x.is_floating_point():
        return F.dropout(x, p, training=True)
    return apply_mask(x, fresh_keep_mask(x, p)).mul_(1.0 / (1.0 - p))
