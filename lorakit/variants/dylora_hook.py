"""DyLoRA's training rules: one rank per optimizer step for all layers, and updates only of the trained ranks.

The rank of step ``t`` is drawn from a generator seeded by ``(seed, t)``, so it is reproducible and needs no
state in checkpoints. Rows the step does not train (``>= b``; in frozen mode all but ``b - 1``) are copied
before ``optimizer.step`` and written back after it: AdamW's momentum and weight decay would otherwise move
them although their gradient is zero (their moment estimates still decay; the weights stay bit-identical).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lorakit.core.layer import AdaptedLayer
from lorakit.core.variant import Hook

if TYPE_CHECKING:
    from lorakit.variants.dylora import DyLoRA, DyLoRAConfig


class DyLoRAHook(Hook):
    """Samples the step's rank for every layer and undoes the optimizer's update of untrained rows."""

    def __init__(self, model: nn.Module, layers: list[AdaptedLayer], total_steps: int) -> None:
        super().__init__(model, layers, total_steps)
        self.variants: list[DyLoRA] = [layer.variant for layer in layers]
        self.config: DyLoRAConfig = self.variants[0].config
        self.saved: list[tuple[Tensor, Tensor]] = []

    def rank_at(self, step: int) -> int:
        """The step's rank, from ``(seed, step)`` alone: no generator state to checkpoint."""
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        return int(torch.randint(self.config.min_rank, self.config.rank + 1, (1,), generator=gen))

    def on_step_start(self, step: int) -> None:
        b = self.rank_at(step)
        for variant in self.variants:
            variant.sampled = b

    def on_after_backward(self, step: int) -> None:
        self.saved = []
        if self.config.mode == "nonfrozen" and self.variants[0].sampled in (None, self.config.rank):
            return  # every row trains this step
        self.saved = [(v.A.detach().clone(), v.B.detach().clone()) for v in self.variants]

    @torch.no_grad()
    def on_after_step(self, step: int) -> None:
        if not self.saved:
            return
        for variant, (a, b) in zip(self.variants, self.saved, strict=True):
            still = ~variant.trained_rows()  # (R,) rows this step must not change
            variant.A[still] = a[still]
            variant.B[:, still] = b[:, still]
        self.saved = []
