"""lorakit's own training loop: a thin driver of the engine (:mod:`lorakit.engine`).

The loop knows no variant by name: whatever a variant needs during training (AdaLoRA's budget, Delta-LoRA's
update, DyLoRA's rank) comes through :class:`lorakit.Hook` call points, run by the engine in this order per
optimizer step::

    on_step_start -> [forward, loss + extra_loss, backward] x grad_accum -> on_after_backward
      -> clip -> on_before_optimizer_step -> optimizer.step -> on_after_step -> scheduler.step -> zero_grad

A variant with stages before the main run (LoRA-drop's selection) gets them here first, on the training
data of a :class:`lorakit.data.datasets.BatchSampler`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from lorakit.core.variant import Hook
from lorakit.engine.config import PRECISIONS, SCHEDULES, TrainConfig, TrainResult, lr_lambda
from lorakit.engine.gradients import LossBackward
from lorakit.engine.optimizers import make_optimizer
from lorakit.engine.placement import LOCAL, Placement
from lorakit.engine.run import Engine, progress_bar
from lorakit.train.stages import run_pending_stages

__all__ = [
    "PRECISIONS",
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "lr_lambda",
    "make_optimizer",
    "progress_bar",
    "train",
]


def train(
    model: nn.Module,
    batches: Iterator[dict[str, Tensor]],
    cfg: TrainConfig,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    hooks: list[Hook] | None = None,
    settings: dict[str, Any] | None = None,
    placement: Placement = LOCAL,
) -> TrainResult:
    """Train the adapted ``model`` for ``cfg.steps`` optimizer steps; returns losses, time and evaluations.

    ``batches`` yields model inputs including ``labels``. With ``output_dir`` and ``checkpoint_every``,
    resumable checkpoints are written atomically to ``output_dir/checkpoint``; ``resume=True`` continues
    from there (``batches`` must offer ``state_dict``/``load_state_dict`` to resume the data order exactly);
    a directory holding an earlier run's checkpoint is refused unless ``resume`` or ``overwrite``.
    Each checkpoint records ``cfg``, the adapter's config and ``settings`` (e.g. a data fingerprint); a
    resume with different values is refused. A NaN or infinite loss or gradient stops training before the
    optimizer step (:class:`~lorakit.adapters.io.NonFiniteError`), as does a loss over 1000 times the first
    step's (:class:`~lorakit.train.checkpoint.DivergedError`); the model and the last checkpoint stay as they
    were. The variant's pending stages run first; what they decided is ``result.decided``. Under ``torchrun``,
    ``placement`` (a :class:`lorakit.distributed.Distributed`) wraps the model (DDP / FSDP2) and only its
    rank 0 writes.
    """
    stages = functools.partial(stage_run, placement=placement.for_stages())
    decided = run_pending_stages(model, batches, cfg, placement.driver, stages, progress=placement.is_writer)
    engine = Engine(model, cfg, driver=placement.driver, hooks=hooks, placement=placement)
    gradients = LossBackward(model, batches, cfg, placement)
    result = TrainResult(steps=0, seconds=0.0, decided=decided)
    return engine.run(
        gradients,
        result,
        evaluate=evaluate,
        output_dir=output_dir,
        resume=resume,
        overwrite=overwrite,
        settings=settings,
    )


def stage_run(
    model: nn.Module, batches: Iterator[dict[str, Tensor]], cfg: TrainConfig, placement: Placement = LOCAL
) -> TrainResult:
    """A stage's own short training run (no stages of its own, no evaluation or checkpoints), in
    ``placement`` (:meth:`Placement.for_stages`)."""
    engine = Engine(model, cfg, driver=placement.driver, placement=placement)
    gradients = LossBackward(model, batches, cfg, placement)
    return engine.run(gradients, TrainResult(steps=0, seconds=0.0), desc="stage")
