"""Products with one side as thin as the adapter's rank (``r`` = 8 or so), in the order and blocking a CPU
runs fast. Used by the low-rank and DoRA kernels and the dropped-input products.

- Order: on a CPU a ``(N, d) @ (d, r)`` product runs several times slower than the same product computed as
  ``((r, d) @ (d, N))^T`` (for the shapes of BERT and Llama layers), and an ``(out, N) @ (N, r)`` product
  likewise against ``((r, N) @ (N, out))^T``: BLAS runs best with the rank as the output's rows. The result
  is the same product (a transposed view), so the order is kept on every device.
- Blocking (CPU, several threads): BLAS runs these rank-row products on one thread whatever the thread count.
  Split along ``N`` into one block per thread, a batched product runs the blocks in parallel; the
  ``N``-summing products add the blocks' partial results. Measured in ``docs/performance.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rows_of(t: Tensor) -> Tensor:
    """``t`` as a matrix of rows ``(N, features)``."""
    return t.reshape(-1, t.shape[-1])


def _blocks(n: int, *operands: Tensor) -> int:
    """Into how many blocks of rows an ``N = n`` product is split: one per intra-op thread on a CPU, where
    ``n`` divides evenly into blocks of at least 64 rows and the row-major operands are contiguous; else 1.
    Compiled graphs keep the plain product (the compiler picks its own kernels)."""
    if torch.compiler.is_compiling():  # (asked first: the thread count is not traceable)
        return 1
    threads = torch.get_num_threads()
    if threads == 1 or n % threads or n < 64 * threads:
        return 1
    on_cpu = all(t.device.type == "cpu" and t.is_contiguous() for t in operands)
    return threads if on_cpu else 1


def rank_first(m: Tensor, rows: Tensor) -> Tensor:
    """``rows @ m.T`` (``(N, r)`` for ``m`` of shape ``(r, d)`` and ``rows (N, d)``) computed as
    ``(m @ rows.T).T``, in row blocks on several threads. The result is a transposed view of an ``(r, N)``
    tensor; the next product reads it as is."""
    n, d = rows.shape
    blocks = _blocks(n, rows)
    if blocks == 1:
        return (m @ rows.t()).t()
    per_block = torch.bmm(m.expand(blocks, *m.shape), rows.view(blocks, n // blocks, d).transpose(1, 2))
    return per_block.transpose(0, 1).reshape(m.shape[0], n).t()  # (t, r, N/t) -> (r, N) -> (N, r)


def rank_gram(u_t: Tensor, v: Tensor) -> Tensor:
    """``u_t @ v`` for ``u_t (r, N)`` and ``v (N, c)``: ``(r, c)``, the sum over ``N`` taken in row blocks on
    several threads (the blocks' partial products added)."""
    r, n = u_t.shape
    blocks = _blocks(n, v)
    if blocks == 1:
        return u_t @ v
    u_blocks = u_t.reshape(r, blocks, n // blocks).transpose(0, 1)  # (t, r, N/t)
    return torch.bmm(u_blocks, v.view(blocks, n // blocks, -1)).sum(0)


def gram_rank_first(g: Tensor, z: Tensor) -> Tensor:
    """``g^T @ z`` (``(out, r)`` for ``g (N, out)``, ``z (..., r)``) computed as ``(z^T @ g)^T``: the same
    fast order as :func:`rank_first`, for ``dL/dB``-shaped products."""
    return rank_gram(rows_of(z).t(), g).t()
