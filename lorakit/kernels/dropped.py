"""Products with a masked input ``x * keep`` from the few dropped inputs (CPU kernels).

At a small drop rate ``p`` (0.05 by default) a product with the masked input has an exact form that
touches only the dropped inputs: ``w (x * keep) = w x - w (x * dropped)``; for a gradient ``u`` reaching
the masked input, ``keep * u`` is ``u`` with its dropped positions written over. So neither an input-sized
masked copy nor the mask need be formed: the positions (8 bytes per dropped input, 0.4 per input at
``p = 0.05``) are kept instead of the 1-byte mask. They come straight from the mask's gap draw
(:func:`lorakit.kernels.gaps.dropped_indices`). Used by the low-rank kernel (:mod:`lorakit.kernels.lowrank`)
and DoRA's (:mod:`lorakit.kernels.dora_positions`).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.kernels.skinny import rank_first, rank_gram


class Dropped(NamedTuple):
    """The dropped inputs of an ``(N, in)`` mask, row by row: row and column of each, and where each row's
    run starts (``offsets``, ``(N,)``), the layout of an embedding bag with one bag per row."""

    rows: Tensor
    cols: Tensor
    offsets: Tensor

    def flat(self, width: int) -> Tensor:
        """Their indices into the flattened ``(N, width)`` input (int64)."""
        return self.rows.long() * width + self.cols


def dropped_at(flat: Tensor, shape: tuple[int, int]) -> Dropped:
    """The positions of the sorted flat indices ``flat`` into an ``(N, in)`` input, row by row (int32
    indices where they fit: half the saved bytes, and a cheaper division)."""
    n, d = shape
    index = torch.int32 if n * d < 2**31 else torch.int64
    at = flat.to(index)
    rows = at.div(d, rounding_mode="floor")
    offsets = torch.searchsorted(flat, torch.arange(n, device=flat.device).mul_(d))  # each row's first
    return Dropped(rows, at - rows * d, offsets.to(index))


def dropped_values(x: Tensor, flat: Tensor) -> Tensor:
    """``x (N, in)`` at the dropped positions (``flat``: their flat indices), ``(nnz,)``."""
    return x.reshape(-1).index_select(0, flat)  # one gather; x[flat] takes the general indexing path


def product_on_dropped(values: Tensor, w: Tensor, at: Dropped) -> Tensor:
    """``w (x * dropped)`` as rows, ``(N, out)``, for ``w (out, in)`` and the dropped ``values``."""
    return F.embedding_bag(at.cols, w.t().contiguous(), at.offsets, mode="sum", per_sample_weights=values)


def gram_on_dropped(gz: Tensor, values: Tensor, at: Dropped, width: int) -> Tensor:
    """``gz^T (x * dropped)``, ``(r, width)``, for ``gz (N, r)`` and the dropped ``values``. Indexed along the
    rows of ``gz^T (r, N)`` (contiguous for the rank-first products): one ``r``-vector per dropped input."""
    gz_t = gz.t()
    terms = gz_t.index_select(1, at.rows.long()).mul_(values)  # (r, nnz); int64 indices: the fast kernels
    return gz_t.new_zeros(gz_t.shape[0], width).index_add_(1, at.cols.long(), terms)


def gram_on_kept(gz: Tensor, x: Tensor, at: Dropped, flat: Tensor) -> Tensor:
    """``gz^T (x * keep) = gz^T x - gz^T (x * dropped)``, ``(r, in)``, for ``gz (N, r)`` and ``x (N, in)``."""
    return rank_gram(gz.t(), x).sub_(gram_on_dropped(gz, dropped_values(x, flat), at, x.shape[1]))


def rank_first_on_kept(m: Tensor, rows: Tensor, values: Tensor, at: Dropped) -> Tensor:
    """:func:`~lorakit.kernels.skinny.rank_first` of the masked rows,
    ``(rows * keep) @ m.T = rows @ m.T - (rows * dropped) @ m.T``, from the dropped ``values`` at ``at``."""
    return rank_first(m, rows).sub_(product_on_dropped(values, m, at))


def product_at_dropped(g: Tensor, w: Tensor, at: Dropped) -> Tensor:
    """``g w`` (``(N, in)``) at the dropped positions only, ``(nnz,)``: ``g (N, out)``, ``w (out, in)``. A
    sampled product on the positions' CSR pattern: one vectorised dot product per position, where the
    embedding bag's per-sample-weight gradient (which computes the same) is slower on a CPU."""
    nnz = at.cols.numel()
    rows_start = torch.cat([at.offsets, at.offsets.new_full((1,), nnz)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sparse CSR tensors are marked beta
        pattern = torch.sparse_csr_tensor(
            rows_start, at.cols, g.new_zeros(nnz), (g.shape[0], w.shape[1]), check_invariants=False
        )
    return torch.sparse.sampled_addmm(pattern, g, w, beta=0.0).values()
