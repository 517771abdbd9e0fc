"""A plain training loop that runs the variants' hooks at fixed points.

The loop knows no variant by name: whatever a variant needs during training (AdaLoRA's budget, Delta-LoRA's
update, DyLoRA's rank) comes through :class:`lorakit.Hook` call points, in this order per optimizer step::

    on_step_start -> [forward, loss + extra_loss, backward] x grad_accum -> on_after_backward
      -> clip -> on_before_optimizer_step -> optimizer.step -> on_after_step -> scheduler.step -> zero_grad
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import lorakit
from lorakit.core.variant import Hook
from lorakit.settings import check_settings, setting
from lorakit.train.checkpoint import (
    RunState,
    check_step,
    grad_norm,
    restore_checkpoint,
    run_settings,
    write_checkpoint,
)

if TYPE_CHECKING:
    from lorakit.distributed import Distributed

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """Optimisation settings (the defaults are the reference budget used for every README number)."""

    steps: int = setting(600, "optimizer steps")
    batch_size: int = setting(32, "examples per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    lr: float = setting(5e-4, "peak learning rate (AdamW)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_ratio: float = setting(0.1, "fraction of steps with linear warmup")
    schedule: str = setting("linear", "after warmup: linear | cosine | constant")
    clip: float = setting(1.0, "max gradient norm; 0 disables clipping")
    precision: str = setting(
        "fp32", "fp32, or bf16: autocast matmuls to bfloat16 (weights, grads, optimizer stay fp32)"
    )
    optimizer: str = setting(
        "adamw", "adamw, or a bitsandbytes optimizer: adamw8bit | paged_adamw | paged_adamw8bit"
    )
    eval_every: int = setting(0, "evaluate every N steps (0: only at the end)")
    checkpoint_every: int = setting(0, "write a resumable checkpoint every N steps (0: never)")
    seed: int = setting(0, "seeds initialisation, data order, dropout and a variant's sampling")
    progress: bool = setting(True, "show a progress bar with loss, learning rate and steps per second")

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps > 0,
            "batch_size": self.batch_size > 0,
            "grad_accum": self.grad_accum > 0,
            "lr": 0 < self.lr < math.inf,
            "weight_decay": self.weight_decay >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "schedule": self.schedule in SCHEDULES,
            "precision": self.precision in PRECISIONS,
            "clip": self.clip >= 0,
            "eval_every": self.eval_every >= 0,
            "checkpoint_every": self.checkpoint_every >= 0,
        }
        rules = f"schedule one of {SCHEDULES}, precision one of {PRECISIONS}; counts and rates positive"
        check_settings(self, checks, "training", rules)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-20:]
        return sum(tail) / len(tail) if tail else math.nan


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Warmup to 1 over ``warmup_ratio * steps``, then linear or cosine decay to 0 (or constant)."""
    warmup = int(cfg.warmup_ratio * cfg.steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return (
            max(0.0, 1 - progress) if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        )

    return factor


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = lorakit.param_groups(model, cfg.lr, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from lorakit.train.optimizers import bnb_optimizer

    return bnb_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay)


def train(
    model: nn.Module,
    batches: Iterator[dict[str, Tensor]],
    cfg: TrainConfig,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    hooks: list[Hook] | None = None,
    settings: dict[str, Any] | None = None,
    distributed: Distributed | None = None,
) -> TrainResult:
    """Train the adapted ``model`` for ``cfg.steps`` optimizer steps; returns losses, time and evaluations.

    ``batches`` yields model inputs including ``labels``. With ``output_dir`` and ``checkpoint_every``,
    resumable checkpoints are written atomically to ``output_dir/checkpoint``; ``resume=True`` continues
    from there (``batches`` must offer ``state_dict``/``load_state_dict`` to resume the data order exactly).
    Each checkpoint records ``cfg``, the adapter's config and ``settings`` (e.g. a data fingerprint); a resume
    with different values is refused (:mod:`lorakit.train.checkpoint`). A NaN or infinite loss or gradient
    stops training before the optimizer step (:class:`~lorakit.io.NonFiniteError`), as does a loss over 1000
    times the first step's (:class:`~lorakit.train.checkpoint.DivergedError`); the model and the last
    checkpoint stay as they were.
    Under ``torchrun``, ``distributed`` wraps the model (DDP / FSDP2) and only its rank 0 writes.
    """
    torch.manual_seed(cfg.seed)
    hooks = lorakit.make_hooks(model, cfg.steps) if hooks is None else hooks
    net = model if distributed is None else distributed.attach(model)
    writes = distributed is None or distributed.is_main
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    result = TrainResult(steps=0, seconds=0.0)
    run = RunState(model, optimizer, scheduler, hooks, batches, result)
    recorded = run_settings(cfg, model, settings)
    start = 0
    if resume:
        start = restore_checkpoint(run, Path(output_dir or "."), recorded)
    model.train()
    bar = progress_bar(cfg.steps, start, cfg.progress and writes, "train")
    began = time.perf_counter() - result.seconds
    for step in range(start, cfg.steps):
        for hook in hooks:
            hook.on_step_start(step)
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            loss = _loss(net, next(batches), hooks, step, cfg.precision) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
        loss_sum = loss_sum if distributed is None else distributed.mean(loss_sum)
        for hook in hooks:
            hook.on_after_backward(step)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip) if cfg.clip > 0 else grad_norm(params)
        first = result.losses[0] if result.losses else None
        check_step(step, loss_sum, norm, first, Path(output_dir) if output_dir is not None else None)
        for hook in hooks:
            hook.on_before_optimizer_step(step)
        optimizer.step()
        for hook in hooks:
            hook.on_after_step(step)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss_sum)
        result.steps = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        if (
            evaluate is not None
            and cfg.eval_every
            and (step + 1) % cfg.eval_every == 0
            and step + 1 < cfg.steps
        ):
            result.evals.append((step + 1, evaluate(model)))
            bar.write(
                f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.evals[-1][1].items())
            )
            model.train()
        result.seconds = time.perf_counter() - began
        if (
            writes
            and output_dir is not None
            and cfg.checkpoint_every
            and (step + 1) % cfg.checkpoint_every == 0
        ):
            write_checkpoint(run, Path(output_dir), recorded)
    bar.close()
    result.seconds = time.perf_counter() - began
    if evaluate is not None:
        result.evals.append((result.steps, evaluate(model)))
    return result


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


def _loss(model: nn.Module, batch: dict[str, Tensor], hooks: list[Hook], step: int, precision: str) -> Tensor:
    device = next(p for p in model.parameters()).device
    # bf16 autocast: matrix products run in bfloat16 (tensor cores on GPUs, AMX on recent x86 CPUs) while the
    # adapter parameters, their gradients and the optimizer state stay fp32.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(**{k: v.to(device) for k, v in batch.items()})
    loss = (out.loss if hasattr(out, "loss") else out).float()
    for hook in hooks:
        extra = hook.extra_loss(step)
        if extra is not None:
            loss = loss + extra
    return loss
