"""The engine's default gradient source: the task loss plus the hooks' extra loss, backed up per micro-batch.

Gradient accumulation and precision live here: each of ``grad_accum`` micro-batches adds
``(loss + extra_loss) / grad_accum`` to ``p.grad``, under bf16 autocast when the precision asks for it. A
causal LM's token loss (:mod:`lorakit.engine.token_loss`) is instead summed over each micro-batch's labelled
tokens and divided by the labelled tokens of the whole step, in every micro-batch and process: the mean one
process with the whole batch would take.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lorakit.common.errors import LorakitError
from lorakit.core.contract import GradientSource
from lorakit.engine.config import TrainConfig
from lorakit.engine.placement import LOCAL, Placement
from lorakit.engine.token_loss import TokenLoss, keeps_mean_token_loss, predicted_tokens, takes_token_loss


class BatchError(LorakitError):
    """The training batches do not fit the model: they ran out, are not model inputs, or give no loss."""


@runtime_checkable
class ResumableBatches(Protocol):
    """Batches that can continue where a checkpoint left them (``lorakit.data.datasets.BatchSampler``): their
    generator and pending order. Other iterators resume with a fresh order."""

    def __next__(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
        self.token_loss = takes_token_loss(model)
        # a causal LM with its own loss: its per-micro-batch token mean, weighted back to the step's mean
        self.own_token_mean = keeps_mean_token_loss(model)
        placement.begin(model)
        self.forward = placement.wrap(TokenLoss.of(model) if self.token_loss else model)
        self.batches = batches
        self.shard = placement.shard(batches)
        self.grad_accum = cfg.grad_accum
        self.precision = cfg.precision
        self.tokens = 0  # input tokens seen by every process (padding excluded), for the throughput report

    def backward(self, step: int, extra_loss: Callable[[int], Tensor | None]) -> float:
        micro = [self.next_batch(step) for _ in range(self.grad_accum)]
        self.tokens += self.placement.total(sum(_input_tokens(batch) for batch in micro))
        # The step's loss is the mean over its labelled tokens in every micro-batch and process; gradients
        # are then averaged over the processes, so each process's sum is divided by labelled / processes.
        per_token = self.token_loss or self.own_token_mean
        labelled = self.placement.total(sum(_labelled(b) for b in micro)) if per_token else 0
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            with self.placement.micro_batch(last=i == self.grad_accum - 1):
                if per_token:
                    loss = self.loss(
                        batch, extra_loss, step, per=max(labelled, 1) / self.placement.processes()
                    )
                else:
                    loss = self.loss(batch, extra_loss, step) / self.grad_accum
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
                "lorakit.data.datasets.BatchSampler) or fewer steps"
            ) from None
        except TypeError:
            raise BatchError(
                f"batches must be an iterator of dicts of model inputs, got {type(self.batches).__name__}; "
                "wrap a list with iter(...), or pass a lorakit.data.datasets.BatchSampler"
            ) from None
        if not isinstance(batch, dict):
            raise BatchError(
                f"each batch must be a dict of model inputs (labels included), got {type(batch).__name__}"
            )
        return batch

    def loss(
        self,
        batch: dict[str, Tensor],
        extra_loss: Callable[[int], Tensor | None],
        step: int,
        per: float | None = None,
    ) -> Tensor:
        """The micro-batch's loss plus the hooks' extra loss (each micro-batch carries its share of the
        extra loss: ``1 / grad_accum`` of it, as the task loss's mean); with ``per``, the token loss is the
        micro-batch's summed token loss divided by ``per``."""
        device = next(p for p in self.model.parameters()).device
        # bf16 autocast: matrix products run in bfloat16 (tensor cores on GPUs, AMX on recent x86 CPUs) while
        # the adapter parameters, their gradients and the optimizer state stay fp32.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.run_model(batch, device, step)
        if per is None:  # the caller divides the sum by grad_accum
            loss, share = scalar_loss(out, batch, step), 1.0
        elif self.token_loss:
            loss, share = out[0] / per, 1.0 / self.grad_accum
        else:  # the model's mean over the micro-batch's predicted tokens, times their count: their sum
            loss, share = scalar_loss(out, batch, step) * (_labelled(batch) / per), 1.0 / self.grad_accum
        extra = extra_loss(step)
        return loss if extra is None else loss + extra * share

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
        # Resumable batches continue the data order exactly; a plain iterator can't.
        return self.batches.state_dict() if isinstance(self.batches, ResumableBatches) else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.batches, ResumableBatches):
            self.batches.load_state_dict(state)


def _input_tokens(batch: dict[str, Any]) -> int:
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    if isinstance(mask, Tensor):
        return int(mask.sum())
    return ids.numel() if isinstance(ids, Tensor) else 0


def _labelled(batch: dict[str, Any]) -> int:
    labels = batch.get("labels")
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        raise BatchError(
            "a causal language model's batches need per-token labels (batch, sequence), -100 where the loss "
            f"does not count; got {describe(batch)}"
        )
    return predicted_tokens(labels)


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
