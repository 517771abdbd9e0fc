"""AdaLoRA: SVD-form updates whose rank budget moves to important matrices. Zhang et al., 2023,
arXiv:2303.10512.

``dW = s * P diag(E) Q`` (Eq. 3) with ``Q (r, d_in)``, ``P (d_out, r)``, ``E (r,)`` and ``s = alpha / init_r``
(constant, not the live rank). The forward never forms ``dW``: ``y + s * ((x~ Q^T) * E) P^T``.

Training rules run in the hook (:class:`AdaLoRAHook`, on :mod:`lorakit.variants.adalora_budget`), so there is
nothing to call by hand: the penalty ``gamma * mean(||Q Q^T - I||_F, ||P^T P - I||_F)`` (mean over every P and
every Q, as the authors' code and PEFT) joins the loss; after each optimizer step the importance scores update
and ``E`` is masked globally to the cubic budget. From step ``T - t_final`` the mask is final and re-applied
every step; pruned triplets then leave the forward, the penalty and the saved file, which loads resized.

``E = 0`` at init (``P, Q ~ N(0, 0.02^2)``), so ``dW = 0`` and the adapted model equals the base at step 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.core.config import VariantConfig, require
from lorakit.core.contract import Shared
from lorakit.core.forms import LowRank
from lorakit.core.layer import AdaptedLayer
from lorakit.core.variant import Hook, Variant, precise
from lorakit.variants.adalora_budget import budget, global_mask, triplet_scores, update_importance


@dataclass
class AdaLoRAConfig(VariantConfig):
    """AdaLoRA. ``init_r``: starting rank per matrix (``rank`` mirrors it: leave ``rank`` unset).
    ``target_r``: average final rank (final budget ``target_r * n_matrices``). ``t_init``/``t_final``: steps
    before the budget falls / with the final mask. ``delta_t``: mask every ``delta_t`` steps.
    ``beta1``/``beta2``: EMA factors of sensitivity / uncertainty. ``orth_reg_weight``: gamma (authors'
    scripts 0.1; PEFT's default 0.5). ``total_steps``: T (None: the run's total steps given to the hook)."""

    rank: int = 0
    init_r: int = 12
    target_r: int = 8
    t_init: int = 0
    t_final: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    total_steps: int | None = None

    def validate(self) -> None:
        require(isinstance(self.init_r, int) and self.init_r > 0, "init_r", self.init_r, "a positive integer")
        self.rank = self.init_r if self.rank == 0 else self.rank
        require(self.rank == self.init_r, "rank", self.rank, f"unset or init_r = {self.init_r} (set init_r)")
        super().validate()
        ok = isinstance(self.target_r, int) and 1 <= self.target_r <= self.init_r
        require(ok, "target_r", self.target_r, f"an integer in [1, init_r = {self.init_r}]")
        for name in ("t_init", "t_final"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 0, name, value, "an integer >= 0")
        ok = isinstance(self.delta_t, int) and self.delta_t >= 1
        require(ok, "delta_t", self.delta_t, "a positive integer")
        require(0 < self.beta1 < 1, "beta1", self.beta1, "in (0, 1)")
        require(0 < self.beta2 < 1, "beta2", self.beta2, "in (0, 1)")
        require(
            0 <= self.orth_reg_weight < math.inf,
            "orth_reg_weight",
            self.orth_reg_weight,
            "a finite number >= 0",
        )
        if self.total_steps is not None:
            self.check_schedule(self.total_steps)

    def check_schedule(self, total: int) -> None:
        warm = self.t_init + self.t_final
        ok = isinstance(total, int) and warm < total
        require(ok, "total_steps", total, f"an integer > t_init + t_final = {warm} (steps to prune in)")


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


class AdaLoRA(Variant):
    """``dW = (alpha / init_r) P diag(E) Q``; E is masked by :class:`AdaLoRAHook`."""

    name = "adalora"
    config_class = AdaLoRAConfig
    summary = "SVD-form P diag(E) Q whose rank budget is pruned globally by importance during training"
    paper = "arXiv:2303.10512"
    hook = AdaLoRAHook
    # The budget prunes triplets by importance measured on one run's data: a client would prune by its own.
    unshared_state = "prunes its rank budget on one run's data (each client would prune by its own)"

    def __init__(self, config: AdaLoRAConfig, base: AdaptedLayer, shared: Shared) -> None:
        super().__init__(config, base, shared)
        r = config.init_r
        self.Q = nn.Parameter(torch.empty(r, base.in_features, device=base.device))  # (r, in) right vectors
        self.E = nn.Parameter(torch.zeros(r, device=base.device))  # (r,) singular values
        self.P = nn.Parameter(torch.empty(base.out_features, r, device=base.device))  # (out, r) left vectors
        nn.init.normal_(self.Q, std=0.02)
        nn.init.normal_(self.P, std=0.02)
        self.scale = config.alpha / config.init_r
        self.register_buffer("keep", None, persistent=False)  # (r_live,) indices once the mask is final

    @property
    def rank(self) -> int:
        """The live rank: ``init_r`` until the mask is final, then the triplets kept."""
        return int(self.triplets()[0].shape[0])

    @classmethod
    def saved_rank(cls, config: VariantConfig, shapes: dict[str, tuple[int, ...]]) -> int:
        return int(shapes["E"][0])  # only live triplets are saved

    def triplets(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(E, Q, P)`` of the triplets that exist: all until the mask is final, then the live ones."""
        if self.keep is None:
            return self.E, self.Q, self.P
        return self.E[self.keep], self.Q[self.keep], self.P[:, self.keep]

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(E Q, P)``: ``diag(E) Q (r, in)`` and ``P (out, r)`` of the live triplets (in
        :func:`~lorakit.core.variant.precise` precision)."""
        e, q, p = self.triplets()
        return precise(e)[:, None] * precise(q), precise(p)

    def delta_weight(self) -> Tensor:
        eq, p = self.factors()
        return self.scale * (p @ eq)

    def forward(self, x: Tensor, y: Tensor, base: AdaptedLayer) -> Tensor:
        e, q, p = self.triplets()
        if e.shape[0] == 0:  # global masking can prune every triplet of a matrix
            # E, Q, P stay in the graph with zero gradient, so every step's backward reaches the same tensors
            # (DistributedDataParallel waits for a gradient of every trainable tensor).
            return y + 0.0 * (e.sum() + q.sum() + p.sum())
        # W0 x + b0 + s P (E * (Q x~)), Eq. 3 applied to x~
        return y + (self.scale * base.factored(self.drop(x), *self.factors())).to(y.dtype)

    def form(self, base: AdaptedLayer) -> LowRank | None:
        eq, p = self.factors()
        return LowRank(eq, p, self.scale, self.dropout_rate()) if eq.shape[0] else None

    def fix(self, live: Tensor) -> None:
        """Make the mask final. A variant loaded resized (``live.sum()`` triplets, when resuming) is first
        spread back to ``len(live)`` with pruned triplets zero, so the optimizer's state fits again."""
        idx = live.nonzero().flatten()
        if self.E.shape[0] != live.numel():
            self._resize(live.numel(), {"E": self.E, "Q": self.Q, "P": self.P}, idx)
        self.keep = idx
        self.E.data.masked_fill_(~live, 0.0)

    def adapter_state(self) -> dict[str, Tensor]:
        e, q, p = self.triplets()
        return {"E": e.detach(), "Q": q.detach(), "P": p.detach()}

    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        """Load ``E, Q, P`` of any rank; the variant resizes to the saved (live) rank."""
        if {"E", "Q", "P"} - set(state):
            raise ValueError(f"adapter file lacks AdaLoRA tensors E, Q, P (has {sorted(state)})")
        self._resize(state["E"].shape[0], state, torch.arange(state["E"].shape[0], device=self.E.device))
        self.keep = None

    def _resize(self, r: int, source: dict[str, Tensor], idx: Tensor) -> None:
        # Replace .data in place: the Parameter objects (and an optimizer's references to them) stay.
        for name, dim in (("E", 0), ("Q", 0), ("P", 1)):
            param: nn.Parameter = getattr(self, name)
            shape = list(param.shape)
            shape[dim] = r
            full = torch.zeros(shape, dtype=param.dtype, device=param.device)
            param.data = full.index_copy_(dim, idx, source[name].detach().to(full))


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """Rank per adapted layer: ``init_r`` until the mask is final, then the live triplets each layer kept."""
    layers = [(n, m.variant) for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]
    return {n: v.rank for n, v in layers if isinstance(v, AdaLoRA)}
