"""Training settings and results, shared by every driver of the engine."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorakit.settings import check_settings, check_types, setting

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
        check_types(self, "training")  # "3" -> 3; 2.5 steps or lr="x" refused by name
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
    tokens: int = 0  # input tokens trained on (padding excluded), for the throughput
    stopped: str | None = None  # why training ended before ``cfg.steps``
    decided: dict[str, Any] = field(default_factory=dict)  # what the variant's stages decided (the report)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

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
