"""Computation forms: the shapes of adapter math a fast path can compute without knowing the variant.

Every variant's forward is plain PyTorch in its own file: the reference, and what runs by default. A variant
whose forward is one of the forms below also says so (:meth:`lorakit.core.variant.Variant.form`, built from
its parameters at each call); a kernel registered for that form (``lorakit.kernels``) may then compute the
same output and the same gradients with less time or memory. A form holds only what the equation reads.

In every form ``x~ = x * keep / (1 - p)`` is the adapter's input dropout (:mod:`lorakit.core.dropout`, the
same mask in plain and fast paths for the same ``torch.manual_seed``), and ``W0 x + b0`` the base layer's
output on the undropped input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor


class LowRank(NamedTuple):
    """``W0 x + b0 + s B (A x~)``: LoRA (Hu et al. 2021, arXiv:2106.09685, Eq. 3) and every method whose
    change is a product of two factors (AdaLoRA's ``P diag(E) Q``, DyLoRA's truncation, Delta-LoRA's
    pairs)."""

    a: Tensor  # A (r, in)
    b: Tensor  # B (out, r)
    scale: float  # s
    p: float  # the dropout rate on the adapter's input in this call (0: none, or not training)


class WeightDecomposed(NamedTuple):
    """``W0 x + b0 + (c - 1) W0 x~ + c s B (A x~)`` with ``c = m / ||W0 + s B A||_row``: DoRA's
    ``m (W0 + s B A) / ||W0 + s B A||_row`` applied to ``x~`` beside the base output (Liu et al. 2024,
    arXiv:2402.09353, Eq. 5; the norm is a constant for autograd, Sec. 4.3)."""

    a: Tensor  # A (r, in)
    b: Tensor  # B (out, r)
    scale: float  # s
    p: float  # dropout rate in this call
    m: Tensor  # the magnitude (out,)
    norm: Callable[[], Tensor]  # ||W0 + s B A||_row, detached, fp32 (out,): asked only by what computes it


class Kronecker(NamedTuple):
    """``W0 x + b0 + s kron(W1, W2) x~``: LoKr (Yeh et al. 2024, arXiv:2309.14859), with ``W1 (a, c)`` and
    ``W2 (b, d)`` for an ``(a b, c d)`` weight."""

    w1: Tensor  # W1 (a, c)
    w2: Tensor  # W2 (b, d)
    scale: float  # s
    p: float  # dropout rate in this call


Form = LowRank | WeightDecomposed | Kronecker
