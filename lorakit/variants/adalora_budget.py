"""AdaLoRA's training rules: cubic budget, importance scores, global triplet mask, and the hook running them.

Zhang et al., 2023, arXiv:2303.10512, Eqs. (7)-(12); the variant itself is :mod:`lorakit.variants.adalora`.
The off-by-one conventions follow the authors' code and PEFT's ``RankAllocator``: steps count from 0, the
budget starts to fall at step ``t_init + 1``, a fractional budget is rounded down, and the mask is final from
step ``T - t_final`` on. The hook does what PEFT leaves to the user (``update_and_allocate``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lorakit.core.variant import Hook

if TYPE_CHECKING:
    from lorakit.core.layer import AdaptedLayer
    from lorakit.variants.adalora import AdaLoRA


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


class AdaLoRAHook(Hook):
    """Orthogonality penalty, importance EMAs, cubic budget and the global mask, at the loop's call points."""

    def __init__(self, model: nn.Module, layers: list[AdaptedLayer], total_steps: int) -> None:
        super().__init__(model, layers, total_steps)
        self.variants: list[AdaLoRA] = [layer.variant for layer in layers]
        cfg = self.cfg = self.variants[0].config
        self.T = cfg.total_steps if cfg.total_steps is not None else total_steps
        cfg.check_schedule(self.T)
        # PEFT fixes the mask at T - t_final; with t_final = 0 that step never runs, so use the last one.
        self.final_step = self.T - cfg.t_final if cfg.t_final > 0 else self.T - 1
        self.masks = [torch.ones_like(v.E, dtype=torch.bool) for v in self.variants]
        self.b0, self.b_target = sum(m.numel() for m in self.masks), cfg.target_r * len(self.variants)
        # Per matrix: [Ibar, U] for E, Q and P (Eqs. 8-9); dropped once the mask is final.
        self.ema = [[torch.zeros_like(w) for w in (v.E, v.Q, v.P) for _ in range(2)] for v in self.variants]
        self.fixed = False

    def extra_loss(self, step: int) -> Tensor | None:
        if self.cfg.orth_reg_weight == 0:
            return None
        terms = []
        for v in self.variants:
            _, q, p = v.triplets()
            eye = torch.eye(q.shape[0], device=q.device, dtype=q.dtype)
            terms += [torch.linalg.matrix_norm(q @ q.T - eye), torch.linalg.matrix_norm(p.T @ p - eye)]
        return self.cfg.orth_reg_weight * torch.stack([t.to(terms[0].device) for t in terms]).mean()

    def on_after_step(self, step: int) -> None:
        cfg = self.cfg
        with torch.no_grad():
            if self.fixed:  # re-apply the final mask every step: optimizer momentum cannot revive a triplet
                for v, m in zip(self.variants, self.masks, strict=True):
                    v.E.masked_fill_(~m, 0.0)
                return
            if step <= self.final_step:
                for v, ema in zip(self.variants, self.ema, strict=True):
                    for k, w in enumerate((v.E, v.Q, v.P)):
                        update_importance(ema[2 * k], ema[2 * k + 1], w, w.grad, cfg.beta1, cfg.beta2)
            if step >= self.final_step:
                self._mask(self.b_target)
                for v, m in zip(self.variants, self.masks, strict=True):
                    v.fix(m)
                self.fixed, self.ema = True, []
            elif step > cfg.t_init and step % cfg.delta_t == 0:
                self._mask(budget(step, self.b0, self.b_target, self.T, cfg.t_init, cfg.t_final))

    def _mask(self, keep: int) -> None:
        """Zero ``E`` of all but the ``keep`` best-scoring triplets over all matrices (Eq. 11)."""
        scores = [triplet_scores(e[0] * e[1], e[2] * e[3], e[4] * e[5]) for e in self.ema]
        self.masks = [m.to(v.E.device) for m, v in zip(global_mask(scores, keep), self.variants, strict=True)]
        for v, m in zip(self.variants, self.masks, strict=True):
            v.E.masked_fill_(~m, 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": list(self.masks), "ema": [list(e) for e in self.ema], "fixed": self.fixed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fixed = bool(state["fixed"])
        devices = [v.E.device for v in self.variants]
        self.masks = [m.to(d) for m, d in zip(state["masks"], devices, strict=True)]
        ema = [] if self.fixed else state["ema"]  # the scores are dropped once the mask is final
        self.ema = [[t.to(d) for t in e] for e, d in zip(ema, devices[: len(ema)], strict=True)]
        for v, m in zip(self.variants, self.masks, strict=True) if self.fixed else ():
            v.fix(m)
