"""AdaLoRA's budget: the cubic schedule, importance scores and the global triplet mask, which its hook runs.

Zhang et al., 2023, arXiv:2303.10512, Eqs. (7)-(12); the variant and its hook are
:mod:`lorakit.variants.adalora`. The off-by-one conventions follow the authors' code and PEFT's
``RankAllocator``: steps count from 0, the budget starts to fall at step ``t_init + 1``, a fractional budget
is rounded down, and the mask is final from step ``T - t_final`` on. The hook does what PEFT leaves to the
user (``update_and_allocate``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def budget(step: int, b0: int, b_target: int, total: int, t_init: int, t_final: int) -> int:
    """Triplets kept at ``step`` over all matrices (Eq. 12).

    ``b0`` until ``t_init`` (inclusive); then ``bT + (b0 - bT) (1 - (t - t_i) / (T - t_i - t_f))^3``
    rounded down; ``bT`` after ``T - t_f``. Example: b0 24, bT 16, T 100, t_i 10, t_f 20 gives 24 (t <= 10),
    23 (t = 11), 18 (t = 30), 16 (t >= 50).
    """
    if step <= t_init:
        return b0
    if step > total - t_final:
        return b_target
    progress = 1.0 - (step - t_init) / (total - t_final - t_init)
    return int((b0 - b_target) * progress**3 + b_target)


def update_importance(ibar: Tensor, u: Tensor, w: Tensor, grad: Tensor | None, b1: float, b2: float) -> None:
    """One step of the smoothed sensitivity and its uncertainty, in place (Eqs. 8-9).

    ``I = |w * grad w|``, ``Ibar <- b1 Ibar + (1 - b1) I``, ``U <- b2 U + (1 - b2) |I - Ibar|`` (with the new
    ``Ibar``, as the authors' code). A missing gradient counts as zero.
    """
    sensitivity = (w * grad).abs() if grad is not None else torch.zeros_like(w)
    ibar.mul_(b1).add_(sensitivity, alpha=1 - b1)
    u.mul_(b2).add_((sensitivity - ibar).abs(), alpha=1 - b2)


def triplet_scores(s_e: Tensor, s_q: Tensor, s_p: Tensor) -> Tensor:
    """``S_i = s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` (Eq. 10) from entry scores ``s = Ibar * U``.

    ``s_e (r,)``, ``s_q (r, in)``, ``s_p (out, r)`` -> ``(r,)``.
    """
    return s_e + s_q.mean(dim=1) + s_p.mean(dim=0)


def global_mask(scores: list[Tensor], keep: int) -> list[Tensor]:
    """Boolean keep-masks, one per matrix, keeping the ``keep`` highest triplet scores over all matrices.

    Exactly ``sum(len) - keep`` triplets are pruned (ties broken by position), so the live count always equals
    the budget; PEFT's threshold ``<= k-th value`` can prune more when scores tie.
    """
    flat = torch.cat([s.float().to(scores[0].device) for s in scores])
    prune = max(flat.numel() - keep, 0)
    alive = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    alive[torch.argsort(flat, stable=True)[:prune]] = False
    return list(alive.split([s.numel() for s in scores]))
