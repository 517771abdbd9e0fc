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
from lorakit.errors import LorakitError


class BatchError(LorakitError):
    """The training batches do not fit the model: they ran out, are not model inputs, or give no loss."""


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
        self.placement = placement
        self.forward = placement.wrap(model)
        self.batches = batches
        self.shard = placement.shard(batches)
        self.grad_accum = cfg.grad_accum
        self.precision = cfg.precision

    def backward(self, step: int, extra_loss: Callable[[int], Tensor | None]) -> float:
        loss_sum = 0.0
        for i in range(self.grad_accum):
            with self.placement.micro_batch(last=i == self.grad_accum - 1):
                loss = self.loss(self.next_batch(step), extra_loss, step) / self.grad_accum
                loss.backward()
            loss_sum += loss.item()
        return loss_sum

    def next_batch(self, step: int) -> dict[str, Tensor]:
        """The next micro-batch; a clear error when the batches end before the run does or are no iterator."""
        try:
            batch = next(self.shard)
        except StopIteration:
            raise BatchError(
                f"the training batches ran out at step {step + 1}: a run of {step + 1}+ steps needs "
                f"grad_accum = {self.grad_accum} batches per step; pass an endless iterator (e.g. "
                "lorakit.train.data.BatchSampler) or fewer steps"
            ) from None
        except TypeError:
            raise BatchError(
                f"batches must be an iterator of dicts of model inputs, got {type(self.batches).__name__}; "
                "wrap a list with iter(...), or pass a lorakit.train.data.BatchSampler"
            ) from None
        if not isinstance(batch, dict):
            raise BatchError(
                f"each batch must be a dict of model inputs (labels included), got {type(batch).__name__}"
            )
        return batch

    def loss(self, batch: dict[str, Tensor], extra_loss: Callable[[int], Tensor | None], step: int) -> Tensor:
        device = next(p for p in self.model.parameters()).device
        # bf16 autocast: matrix products run in bfloat16 (tensor cores on GPUs, AMX on recent x86 CPUs) while
        # the adapter parameters, their gradients and the optimizer state stay fp32.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.run_model(batch, device, step)
        loss = scalar_loss(out, batch, step)
        extra = extra_loss(step)
        return loss if extra is None else loss + extra

    def run_model(self, batch: dict[str, Tensor], device: torch.device, step: int) -> Any:
        """The model's output on ``batch``; an input the model rejects (a missing or unknown key, labels of
        the wrong shape, dtype or range) is a :class:`BatchError` naming the batch, not a torch traceback."""
        try:
            inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            return self.forward(**inputs)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as err:
            if isinstance(err, LorakitError) or self.placement.lost_peer(err):
                raise
            raise BatchError(
                f"the model cannot run on the training batch of step {step + 1} ({describe(batch)}): "
                f"{type(err).__name__}: {' '.join(str(err).split())[:300]}. Check that each batch holds the "
                "model's inputs and labels of the shape, dtype and range its loss expects"
            ) from err

    def state_dict(self) -> dict[str, Any] | None:
        # A BatchSampler's generator and pending order resume the data order exactly; a plain iterator can't.
        return self.batches.state_dict() if hasattr(self.batches, "state_dict") else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(state)


def scalar_loss(out: Any, batch: dict[str, Tensor], step: int) -> Tensor:
    """The training loss in ``out`` (a model output with ``.loss``, or a tensor) as one float32 number."""
    loss = out.loss if hasattr(out, "loss") else out
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise BatchError(
            f"the model gave {got} as the loss of the batch of step {step + 1} ({describe(batch)}); it must "
            "return one number: include labels in every batch (a transformers model then returns .loss), "
            "or return the loss itself"
        )
    return loss.float().reshape(())


def describe(batch: dict[str, Any]) -> str:
    """``input_ids (8, 64) int64, labels (8,) int64``: a batch's keys with their shapes and dtypes."""
    parts = []
    for key, value in batch.items():
        if isinstance(value, Tensor):
            parts.append(f"{key} {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}")
        else:
            parts.append(f"{key} {type(value).__name__}")
    return ", ".join(parts) or "no keys"
