"""The one training engine: every driver's optimizer steps run here, in one order.

Per optimizer step (see :mod:`lorakit.engine.hooks`)::

    on_step_start -> gradients (default: [forward, loss + extra_loss, backward] x grad_accum; DP-SGD: its
      seam) -> on_after_backward -> clip -> on_before_optimizer_step -> optimizer.step -> on_after_step
      -> scheduler.step -> zero_grad

Around the steps the engine owns the optimizer and schedule, evaluation, checkpoints and resume, and progress.
lorakit's loop, DP-SGD and a federated client's round run :meth:`Engine.run`; a ``transformers.Trainer``
calls the same :class:`~lorakit.engine.hooks.HookRunner` from its callback; a distributed run passes a
:class:`~lorakit.engine.placement.Placement`.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.adapters.api import check_driver, make_hooks
from lorakit.common.errors import SettingError
from lorakit.core.contract import Driver, GradientSource
from lorakit.core.variant import Hook
from lorakit.engine.checkpoint import (
    RunState,
    check_checkpoint_dir,
    check_step,
    grad_norm,
    restore_checkpoint,
    run_settings,
    write_checkpoint,
)
from lorakit.engine.config import TrainConfig, TrainResult, lr_lambda
from lorakit.engine.hooks import HookRunner, with_user_hooks
from lorakit.engine.optimizers import make_optimizer
from lorakit.engine.placement import LOCAL, Placement

Result = TypeVar("Result", bound=TrainResult)
Evaluate = Callable[[nn.Module], dict[str, float]]


class Engine:
    """The optimizer, schedule and hooks of one run of ``cfg.steps`` steps on the adapted ``model``.

    Built before anything trains: a variant that cannot run with all its rules in ``driver`` is refused here.
    ``hooks`` are the caller's own, run after the variant's hooks at every call point.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        *,
        driver: Driver,
        hooks: list[Hook] | None = None,
        placement: Placement = LOCAL,
    ) -> None:
        if not isinstance(cfg, TrainConfig):
            raise SettingError(f"cfg must be a lorakit TrainConfig, got {type(cfg).__name__}")
        check_driver(model, driver)
        self.model, self.cfg, self.placement = model, cfg, placement
        torch.manual_seed(cfg.seed)
        self.hooks = HookRunner(with_user_hooks(make_hooks(model, cfg.steps), hooks or []))
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.output_dir: Path | None = None  # where this run's checkpoints go (set by ``run``)
        self.first_loss: float | None = None  # yardstick of the divergence check

    def step(self, step: int, gradients: GradientSource) -> float:
        """One optimizer step in the fixed order; returns its training loss."""
        seed = self.placement.step_seed(self.cfg.seed, step)
        if seed is not None:
            torch.manual_seed(seed)
        self.hooks.step_start(step)
        # Reduced across processes before any hook reads a gradient (a distributed run syncs there).
        loss = self.placement.reduce_loss(gradients.backward(step, self.hooks.extra_loss))
        self.hooks.after_backward(step)
        if gradients.clips_globally:
            clip = self.cfg.clip
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip) if clip > 0 else grad_norm(self.params)
            if gradients.releases_loss:  # refuse a NaN/inf or diverged step before it reaches the weights
                check_step(step, loss, norm, self.first_loss, self.output_dir)
        self.hooks.before_optimizer(step)
        self.optimizer.step()
        if not gradients.releases_loss:
            # DP-SGD privatises (clips per example, adds noise) inside optimizer.step: check the gradient it
            # released and applied (post-processing, no privacy cost), before any checkpoint or save.
            check_step(step, None, grad_norm(self.params), None, self.output_dir)
        self.hooks.after_step(step)
        self.scheduler.step()
        gradients.zero_grad(self.optimizer)
        return loss

    def run(
        self,
        gradients: GradientSource,
        result: Result,
        *,
        evaluate: Evaluate | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        desc: str = "train",
        final_evaluation: bool = True,
        settings: dict[str, Any] | None = None,
    ) -> Result:
        """Steps until ``cfg.steps`` (or until ``gradients`` stops the run), evaluating every ``eval_every``
        steps and at the end (unless the driver does that itself), checkpointing every ``checkpoint_every``
        steps into ``output_dir``. Each checkpoint records ``cfg``, the adapter's config and ``settings``; a
        resume with other values is refused (:mod:`lorakit.engine.checkpoint`), and so is a run that would
        replace an earlier run's checkpoint in ``output_dir`` unless ``overwrite``. A NaN or infinite loss or
        gradient, or a loss over 1000 times the first step's, stops training before the optimizer step
        (:func:`lorakit.engine.checkpoint.check_step`)."""
        cfg = self.cfg
        self.output_dir = Path(output_dir) if output_dir is not None else None
        state = RunState(self.model, self.optimizer, self.scheduler, self.hooks.hooks, gradients, result)
        recorded = run_settings(cfg, self.model, settings)
        if output_dir is not None and cfg.checkpoint_every and self.placement.is_writer:
            check_checkpoint_dir(Path(output_dir), replaces=not resume and not overwrite)
        start = restore_checkpoint(state, Path(output_dir or "."), recorded) if resume else 0
        # Gradients left on the parameters (an earlier run in this process that failed mid-step) would be
        # added to the first step's.
        gradients.zero_grad(self.optimizer)
        self.model.train()
        bar = progress_bar(cfg.steps, start, cfg.progress and self.placement.is_writer, desc)
        began = time.perf_counter() - result.seconds
        tokens_before = result.tokens - gradients.tokens  # tokens of the run before a resume
        try:
            for step in range(start, cfg.steps):
                result.stopped = gradients.stop_before(step)
                if result.stopped:
                    warnings.warn(result.stopped, stacklevel=3)
                    break
                self.first_loss = result.losses[0] if result.losses else None
                loss = self.step(step, gradients)
                fields = {"lr": f"{self.scheduler.get_last_lr()[0]:.2e}", **gradients.after_step(step)}
                result.tokens = tokens_before + gradients.tokens
                if result.tokens:
                    fields["tok/s"] = f"{result.tokens / max(time.perf_counter() - began, 1e-9):.0f}"
                if gradients.releases_loss:
                    result.losses.append(loss)
                    fields = {"loss": f"{loss:.4f}", **fields}
                result.steps = step + 1
                bar.update(1)
                bar.set_postfix(**fields, refresh=False)
                if evaluate is not None and cfg.eval_every and result.steps % cfg.eval_every == 0:
                    if result.steps < cfg.steps:
                        result.evals.append((result.steps, evaluate(self.model)))
                        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.evals[-1][1].items())
                        if self.placement.is_writer:  # tqdm.write prints even where the bar is disabled
                            bar.write(f"step {result.steps}: {metrics}")
                        self.model.train()
                result.seconds = time.perf_counter() - began
                if self.writes_checkpoint(output_dir, result.steps):
                    write_checkpoint(state, Path(output_dir), recorded)
        finally:
            bar.close()
        result.seconds = time.perf_counter() - began
        if evaluate is not None and final_evaluation:
            result.evals.append((result.steps, evaluate(self.model)))
        return result

    def writes_checkpoint(self, output_dir: str | os.PathLike[str] | None, steps: int) -> bool:
        every = self.cfg.checkpoint_every
        return output_dir is not None and bool(every) and steps % every == 0 and self.placement.is_writer


def progress_bar(total: int, initial: int, enabled: bool, desc: str) -> tqdm:
    """A bar with loss, lr and steps per second; redrawn at most every 30 s when logging to a file."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc=desc,
        dynamic_ncols=interactive,
        mininterval=0.1 if interactive else 30.0,
    )
