"""A plain training loop that runs the variants' hooks at fixed points.

The loop knows no variant by name: whatever a variant needs during training (AdaLoRA's budget, Delta-LoRA's
update, DyLoRA's rank) comes through :class:`lorakit.Hook` call points, in this order per optimizer step::

    on_step_start -> [forward, loss + extra_loss, backward] x grad_accum -> on_after_backward
      -> clip -> on_before_optimizer_step -> optimizer.step -> on_after_step -> scheduler.step -> zero_grad
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import lorakit
from lorakit.core.variant import Hook
from lorakit.io import _fill, load_tensors
from lorakit.settings import check_settings

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16")
CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    """Optimisation settings (the defaults are the reference budget used for every README number)."""

    steps: int = 600  # optimizer steps
    batch_size: int = 32  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1  # fraction of steps with linear warmup
    schedule: str = "linear"  # after warmup: linear | cosine | constant
    clip: float = 1.0  # max gradient norm; 0 disables clipping
    precision: str = (
        "fp32"  # fp32, or bf16: autocast matmuls to bfloat16 (weights, grads, optimizer stay fp32)
    )
    optimizer: str = "adamw"  # adamw, or a bitsandbytes optimizer: adamw8bit | paged_adamw | paged_adamw8bit
    eval_every: int = 0  # evaluate every N steps (0: only at the end)
    checkpoint_every: int = 0  # write a resumable checkpoint every N steps (0: never)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps > 0,
            "batch_size": self.batch_size > 0,
            "grad_accum": self.grad_accum > 0,
            "lr": self.lr > 0,
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
) -> TrainResult:
    """Train the adapted ``model`` for ``cfg.steps`` optimizer steps; returns losses, time and evaluations.

    ``batches`` yields model inputs including ``labels``. With ``output_dir`` and ``checkpoint_every``,
    resumable checkpoints are written atomically to ``output_dir/checkpoint``; ``resume=True`` continues
    from there (``batches`` must offer ``state_dict``/``load_state_dict`` to resume the data order exactly).
    """
    torch.manual_seed(cfg.seed)
    hooks = lorakit.make_hooks(model, cfg.steps) if hooks is None else hooks
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    result = TrainResult(steps=0, seconds=0.0)
    run = _Run(model, optimizer, scheduler, hooks, batches, result)
    start = 0
    if resume:
        start = _restore(run, Path(output_dir or "."))
    model.train()
    bar = progress_bar(cfg.steps, start, cfg.progress, "train")
    began = time.perf_counter() - result.seconds
    for step in range(start, cfg.steps):
        for hook in hooks:
            hook.on_step_start(step)
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            loss = _loss(model, next(batches), hooks, step, cfg.precision) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
        for hook in hooks:
            hook.on_after_backward(step)
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
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
        if output_dir is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _checkpoint(run, Path(output_dir))
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


# --- checkpoints -----------------------------------------------------------------------------------------
@dataclass
class _Run:
    """Everything a checkpoint saves and a resume restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    hooks: list[Hook]
    batches: Any
    result: TrainResult


def _checkpoint(run: _Run, output_dir: Path) -> None:
    """Write ``output_dir/checkpoint`` atomically: build it beside, then swap it in with renames."""
    final = output_dir / CHECKPOINT_DIR
    tmp, old = output_dir / f".{CHECKPOINT_DIR}.tmp", output_dir / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    lorakit.save(run.model, tmp)
    state = {
        "step": run.result.steps,
        "seconds": run.result.seconds,
        "losses": torch.tensor(run.result.losses),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "hooks": [h.state_dict() for h in run.hooks],
        "rng": torch.get_rng_state(),
        "batches": run.batches.state_dict() if hasattr(run.batches, "state_dict") else None,
    }
    torch.save(state, tmp / "trainer.pt")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _restore(run: _Run, output_dir: Path) -> int:
    ckpt = output_dir / CHECKPOINT_DIR
    if not (ckpt / "trainer.pt").is_file():
        raise FileNotFoundError(f"no checkpoint to resume in {output_dir}; train without --resume first")
    _fill(run.model, load_tensors(ckpt))
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    for hook, hook_state in zip(run.hooks, state["hooks"], strict=True):
        hook.load_state_dict(hook_state)
    torch.set_rng_state(state["rng"])
    if state["batches"] is not None and hasattr(run.batches, "load_state_dict"):
        run.batches.load_state_dict(state["batches"])
    run.result.losses = state["losses"].tolist()
    run.result.seconds = state["seconds"]
    run.result.steps = state["step"]
    return state["step"]
