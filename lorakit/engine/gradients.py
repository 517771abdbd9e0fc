"""The engine's default gradient source: the task loss plus the hooks' extra loss, backed up per micro-batch.

Gradient accumulation and precision live here: each of ``grad_accum`` micro-batches adds
``(loss + extra_loss) / grad_accum`` to ``p.grad``, under bf16 autocast when the precision asks for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.core.contract import GradientSource
from lorakit.engine.config import TrainConfig
from lorakit.engine.placement import LOCAL, Placement


class LossBackward(GradientSource):
    """``loss.backward()`` over ``cfg.grad_accum`` micro-batches from ``batches``."""

    def __init__(
        self,
        model: nn.Module,
        batches: Iterator[dict[str, Tensor]],
        cfg: TrainConfig,
        placement: Placement = LOCAL,
    ) -> None:
        self.model = model
        self.forward = placement.wrap(model)
        self.batches = batches
        self.shard = placement.shard(batches)
        self.grad_accum = cfg.grad_accum
        self.precision = cfg.precision

    def backward(self, step: int, extra_loss: Callable[[int], Tensor | None]) -> float:
        loss_sum = 0.0
        for _ in range(self.grad_accum):
            loss = self.loss(next(self.shard), extra_loss, step) / self.grad_accum
            loss.backward()
            loss_sum += loss.item()
        return loss_sum

    def loss(self, batch: dict[str, Tensor], extra_loss: Callable[[int], Tensor | None], step: int) -> Tensor:
        device = next(p for p in self.model.parameters()).device
        # bf16 autocast: matrix products run in bfloat16 (tensor cores on GPUs, AMX on recent x86 CPUs) while
        # the adapter parameters, their gradients and the optimizer state stay fp32.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.forward(**{k: v.to(device) for k, v in batch.items()})
        loss = (out.loss if hasattr(out, "loss") else out).float()
        extra = extra_loss(step)
        return loss if extra is None else loss + extra

    def state_dict(self) -> dict[str, Any] | None:
        # A BatchSampler's generator and pending order resume the data order exactly; a plain iterator can't.
        return self.batches.state_dict() if hasattr(self.batches, "state_dict") else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(state)
