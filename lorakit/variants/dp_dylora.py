"""DP-DyLoRA: DyLoRA in federated learning with client-level DP. Xu et al., 2024, arXiv:2405.06368.

No public code; **reconstructed** as DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963) with one rank per
round. In round ``t`` the server draws ``b_t ~ Uniform{min_rank..R}`` from its own seeded generator (no data
involved), and every client of the round trains the rank-``b_t`` adapter of DyLoRA::

    y = W0 x + b0 + (alpha / b_t) * B[:, :b_t] (A[:b_t] x~)

with no per-step resampling, and returns only the rank-``b_t`` slice of its update ``Delta_i`` (``A[:b_t]``,
``B[:, :b_t]``, plus fully trained heads). The server clips each ``Delta_i`` to norm ``S``, adds
``N(0, sigma^2 S^2)`` to every coordinate of that slice and divides by the expected cohort size
(:mod:`lorakit.federated`). Per-client random ranks would give each client a different update space; one
data-independent rank per round keeps the sensitivity ``S`` and the noise on one fixed space.

This variant is DyLoRA whose hook trains at the rank :func:`lorakit.set_rank` chose (the
server's ``b_t``) instead of sampling one per step. Rows outside the slice are restored after each local
step, as in DyLoRA. Only a federated run has a server to draw ``b_t``: in any other driver the rank would stay
``R`` and the run would be plain LoRA, so every other driver refuses it. ``B = 0`` at init, so the model is
the base at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.core.config import VariantConfig
from lorakit.core.contract import Driver
from lorakit.variants.dylora import DyLoRA, DyLoRAConfig, DyLoRAHook


@dataclass
class DPDyLoRAConfig(DyLoRAConfig):
    """DP-DyLoRA: DyLoRA's fields; ``min_rank``..``rank`` is the range the server draws each round's rank
    from, and ``seed`` seeds the server's rank generator."""


class ServerRankHook(DyLoRAHook):
    """Train at the rank the round fixed with ``set_rank`` (never sample one); untrained rows stay put."""

    def on_step_start(self, step: int) -> None:
        for variant in self.variants:
            variant.sampled = variant.current_rank


class DPDyLoRA(DyLoRA):
    """DyLoRA with one server-chosen rank per federated round (``dW = (alpha / b_t) B[:, :b_t] A[:b_t]``)."""

    name = "dp_dylora"
    config_class = DPDyLoRAConfig
    summary = "Federated DyLoRA with client-level DP: one server-drawn rank per round, DP-FedAvg updates"
    paper = "arXiv:2405.06368"
    hook = ServerRankHook
    peft = None  # a federated adapter: exported through lorakit's own format (no class inherits a spec)

    @classmethod
    def refusal(cls, driver: Driver, config: VariantConfig) -> str | None:
        """Federated runs only: elsewhere no server draws ``b_t`` and the run would be plain LoRA."""
        if driver is Driver.FEDERATED:
            return None
        return (
            f"variant '{cls.name}' trains only in federated runs (`lorakit federate`), where the server "
            f"draws each round's rank; in {driver.value} it would train plain LoRA. Use `lorakit federate "
            "--variant dp_dylora`, or --variant dylora for a rank sampled per step"
        )

    def round_ranks(self) -> tuple[int, int]:
        """The server draws each round's ``b_t`` from ``min_rank..R``."""
        return self.config.min_rank, self.config.rank

    def rank_slices(self, b: int) -> dict[str, tuple[slice, ...]]:
        """Where the rank-``b`` adapter lives in each trainable tensor: ``A[:b]`` ``(b, in)`` and
        ``B[:, :b]`` ``(out, b)``; a round's update space is these slices (and any trained head)."""
        return {"A": (slice(0, b),), "B": (slice(None), slice(0, b))}
