"""Products with one side as thin as the adapter's rank (``r`` = 8 or so), in the order a CPU runs fast.
Used by the low-rank and DoRA kernels and the dropped-input products.

On a CPU a ``(N, d) @ (d, r)`` product runs several times slower than the same product computed as
``((r, d) @ (d, N))^T`` (for the shapes of BERT and Llama layers), and an ``(out, N) @ (N, r)`` product
likewise against ``((r, N) @ (N, out))^T``: BLAS runs best with the rank as the output's rows. The result is
the same product (a transposed view), so the order is kept on every device.
"""

from __future__ import annotations

from torch import Tensor


def rows_of(t: Tensor) -> Tensor:
    """``t`` as a matrix of rows ``(N, features)``."""
    return t.reshape(-1, t.shape[-1])


def rank_first(m: Tensor, rows: Tensor) -> Tensor:
    """``rows @ m.T`` (``(N, r)`` for ``m`` of shape ``(r, d)`` and ``rows (N, d)``) computed as
    ``(m @ rows.T).T``. The result is a transposed view of an ``(r, N)`` tensor; the next product reads it as
    is."""
    return (m @ rows.t()).t()


def rank_gram(u_t: Tensor, v: Tensor) -> Tensor:
    """``u_t @ v`` for ``u_t (r, N)`` and ``v (N, c)``: ``(r, c)``, the sum over ``N``."""
    return u_t @ v


def gram_rank_first(g: Tensor, z: Tensor) -> Tensor:
    """``g^T @ z`` (``(out, r)`` for ``g (N, out)``, ``z (..., r)``) computed as ``(z^T @ g)^T``: the same
    fast order as :func:`rank_first`, for ``dL/dB``-shaped products."""
    return rank_gram(rows_of(z).t(), g).t()
