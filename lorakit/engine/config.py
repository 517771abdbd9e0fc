"""Training settings and results, shared by every driver of the engine."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorakit.common.settings import check_fields, check_settings, setting

SCHEDULES = ("linear", "cosine", "constant")
# The seeds every seeded library takes (NumPy's, which a transformers.Trainer sets, stop at 2**32 - 1).
SEEDS = "[0, 4294967295]"
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """Optimisation settings (the defaults are the reference budget used for every README number)."""

    steps: int = setting(600, "optimizer steps", within="[1, inf)")
    batch_size: int = setting(32, "examples per micro-batch", within="[1, inf)")
    grad_accum: int = setting(1, "micro-batches per optimizer step", within="[1, inf)")
    lr: float = setting(5e-4, "peak learning rate (AdamW)", within="(0, inf)")
    weight_decay: float = setting(0.0, "AdamW weight decay", within="[0, inf)")
    warmup_ratio: float = setting(0.1, "fraction of steps with linear warmup", within="[0, 1)")
    schedule: str = setting("linear", "after warmup: linear | cosine | constant")
    clip: float = setting(1.0, "max gradient norm; 0 disables clipping", within="[0, inf)")
    precision: str = setting(
        "fp32", "fp32, or bf16: autocast matmuls to bfloat16 (weights, grads, optimizer stay fp32)"
    )
    optimizer: str = setting(
        "adamw", "adamw, or a bitsandbytes optimizer: adamw8bit | paged_adamw | paged_adamw8bit"
    )
    eval_every: int = setting(0, "evaluate every N steps (0: only at the end)", within="[0, inf)")
    checkpoint_every: int = setting(
        0, "write a resumable checkpoint every N steps (0: never)", within="[0, inf)"
    )
    seed: int = setting(0, "seeds initialisation, data order, dropout and a variant's sampling", within=SEEDS)
    progress: bool = setting(True, "show a progress bar with loss, learning rate and steps per second")

    def __post_init__(self) -> None:
        check_fields(self, "training")  # "3" -> 3; 2.5 steps, lr="x" or warmup_ratio=2 refused by name
        checks = {"schedule": self.schedule in SCHEDULES, "precision": self.precision in PRECISIONS}
        rules = {"schedule": f"one of {', '.join(SCHEDULES)}", "precision": f"one of {', '.join(PRECISIONS)}"}
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
