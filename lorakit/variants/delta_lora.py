"""Delta-LoRA: LoRA that also moves W by the change of ``B A``. Zi et al., 2023, arXiv:2309.02411.

Paper rule (Alg. 1), after each optimizer step ``t > K``: ``W <- W + lam * s * (B_{t+1} A_{t+1} - B_t A_t)``;
``W`` has no gradient, no optimizer state and no weight decay. The updates telescope to
``W_T = W0 + lam s (B_T A_T - B_{K+1} A_{K+1})``, so the adapted weight is, exactly,

    ``W_eff = W0 + s B A + lam * s * (sg(B A) - B_K A_K)``   (sg = stop-gradient)

where the buffers ``A_K, B_K`` hold ``A_{K+1}, B_{K+1}``: the factors right after optimizer step ``K``,
captured by the hook in ``on_after_step(K)`` (once per optimizer step, whatever the gradient accumulation).
Before that the extra term is off. The base weight is never written (frozen, quantised or sharded bases
work), nothing is lost to bf16 rounding of lr-sized deltas, and the saved adapter ``A, B, A_K, B_K`` plus
``lam`` reproduces the trained model from the original base. The forward never forms ``B A``: the extra term
is a pass through detached factors, which gives gradient to ``x`` but not to ``A, B``; as a low-rank form it
is one product of rank ``3r``, ``s [B, lam sg(B), -lam B_K] [A; sg(A); A_K] x``.

No adapter dropout: the paper removes it so that the gradient of ``B A`` is the gradient of ``W``,
which its update of ``W`` relies on.
Step 0: ``B = 0`` (``A = 0`` for embeddings) and the extra term is off (or zero), so the model is the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lorakit.core.config import require
from lorakit.core.contract import Shared
from lorakit.core.forms import LowRank
from lorakit.core.layer import AdaptedLayer
from lorakit.core.variant import Hook, precise
from lorakit.variants.lora import LORA_PEFT, LoRA, LoRAConfig


@dataclass
class DeltaLoRAConfig(LoRAConfig):
    """Delta-LoRA. No adapter dropout (default 0; anything else is rejected).

    ``lam``: weight-update factor lambda (paper: 2 for generation, 0.5 for GLUE).
    ``start_step``: K; ``W`` follows ``B A`` after every optimizer step ``t > K`` (-1: from the first step).
    """

    dropout: float = 0.0
    lam: float = 2.0
    start_step: int = 500

    def validate(self) -> None:
        super().validate()
        require(
            self.dropout == 0, "dropout", self.dropout, "0 (no adapter dropout in Delta-LoRA); set dropout=0"
        )
        require(
            0 <= self.lam < math.inf, "lam", self.lam, "a finite number >= 0 (paper: 2 generation, 0.5 GLUE)"
        )
        ok = isinstance(self.start_step, int) and self.start_step >= -1
        require(ok, "start_step", self.start_step, "an integer >= -1 (the step K after which W moves)")


def _after_load(module: DeltaLoRA, incompatible_keys: Any) -> None:
    module._sync_active()


class DeltaLoRAHook(Hook):
    """Captures ``A_{K+1}, B_{K+1}`` after optimizer step K; later steps need no work (the sg form)."""

    def on_after_step(self, step: int) -> None:
        for layer in self.layers:
            variant: DeltaLoRA = layer.variant
            # ">=" also starts a run resumed past K from an adapter saved before its capture.
            if step >= variant.config.start_step and not variant.active_now:
                variant.capture()


class DeltaLoRA(LoRA):
    """``W_eff = W0 + s B A + lam s (sg(B A) - B_K A_K)``, the extra term on from step K."""

    name = "delta_lora"
    config_class = DeltaLoRAConfig
    summary = "LoRA that also moves W by lam x the change of s B A (stored as two low-rank pairs)"
    paper = "arXiv:2309.02411"
    hook = DeltaLoRAHook
    peft = LORA_PEFT  # s B A as a LoRA while W has not moved; peft_problem refuses it once it has
    # W's move lives in buffers (A_K, B_K, active), outside the trained factors.
    unshared_state = "moves the base weight by state outside its trained factors"

    def __init__(self, config: DeltaLoRAConfig, base: AdaptedLayer, shared: Shared) -> None:
        super().__init__(config, base, shared)
        self.register_buffer("A_K", torch.zeros_like(self.A))  # (r, in), A_{K+1}
        self.register_buffer("B_K", torch.zeros_like(self.B))  # (out, r), B_{K+1}
        self.register_buffer("active", torch.zeros((), dtype=torch.bool, device=self.A.device))
        self.active_now = False  # Python mirror of `active`: no device sync in forward
        self.register_load_state_dict_post_hook(_after_load)  # nn.Module.load_state_dict (resuming)
        if config.start_step == -1:
            self.capture()  # t > -1: every step moves W, from B_0 A_0 (= 0)

    @torch.no_grad()
    def capture(self) -> None:
        """Store the current factors as ``A_K, B_K`` and switch the extra term on."""
        self.A_K.copy_(self.A)
        self.B_K.copy_(self.B)
        self.active.fill_(True)
        self.active_now = True

    def _sync_active(self) -> None:
        self.active_now = bool(self.active)

    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        super().load_adapter_state(state)
        self._sync_active()

    def peft_problem(self, base: AdaptedLayer) -> str | None:
        # PEFT reads the file as a plain LoRA, s B A: once W has moved, that drops the moved part.
        moved = self.active_now and not (torch.equal(self.A, self.A_K) and torch.equal(self.B, self.B_K))
        if not moved:
            return None
        return (
            "Delta-LoRA has moved W by lam * s * (B A - B_K A_K), which PEFT's LoRA format cannot hold (it "
            "would load s B A only)"
        )

    def delta_weight(self) -> Tensor:
        ba = precise(self.B) @ precise(self.A)
        dw = self.scale * ba
        if self.active_now:
            dw = dw + self.config.lam * self.scale * (ba - precise(self.B_K) @ precise(self.A_K)).detach()
        return dw

    def forward(self, x: Tensor, y: Tensor, base: AdaptedLayer) -> Tensor:
        s, lam, a, b = self.scale, self.config.lam, self.A, self.B
        out = y + (s * base.factored(x, a, b)).to(y.dtype)  # W0 x + s B A x
        if not self.active_now:
            return out
        # + lam s (sg(B A) - B_K A_K) x: gradient reaches x, not A or B
        moved = base.factored(x, a.detach(), b.detach()) - base.factored(x, self.A_K, self.B_K)
        return out + (lam * s * moved).to(y.dtype)

    def form(self, base: AdaptedLayer) -> LowRank:
        if not self.active_now:
            return LowRank(self.A, self.B, self.scale, 0.0)
        # s [B, lam sg(B), -lam B_K] [A; sg(A); A_K] = s B A + lam s (sg(B A) - B_K A_K), one rank-3r product
        lam, a, b = self.config.lam, self.A, self.B
        a3 = torch.cat([a, a.detach(), self.A_K])  # (3r, in)
        b3 = torch.cat([b, lam * b.detach(), -lam * self.B_K], dim=1)  # (out, 3r)
        return LowRank(a3, b3, self.scale, 0.0)
