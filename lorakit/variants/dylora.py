"""DyLoRA: one adapter trained for every rank 1..R at once. Valipour et al., 2023, arXiv:2210.07558.

Each optimizer step samples one ``b ~ Uniform{min_rank..R}`` for all layers (shared by the step's
micro-batches) and the forward uses the truncated factors, scaled by the sampled ``b``::

    y = W0 x + b0 + (alpha / b) * B[:, :b] (A[:b] x~)

Only the truncated adapter is updated: the hook (:class:`DyLoRAHook`) restores rows ``>= b`` after the
optimizer step, so AdamW momentum and weight decay cannot move them; mode ``"frozen"`` trains rank ``b`` alone
(rows ``< b`` get no gradient and are restored too). Outside training the rank is ``R`` unless
:meth:`DyLoRA.choose_rank` (``lorakit.set_rank``) chose another; merging and PEFT export use that rank,
``lorakit.save`` keeps every rank and records the chosen one (``lorakit.load`` restores it), and
``lorakit.evaluate_all_ranks`` scores every rank of one trained adapter.

``B = 0`` at init (``A = 0`` for embeddings), so every truncation is zero and the model is the base at step 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorakit.core import ranks
from lorakit.core.config import VariantConfig, require
from lorakit.core.contract import PeftSpec, Shared
from lorakit.core.forms import LowRank
from lorakit.core.layer import AdaptedLayer
from lorakit.core.variant import Hook, Variant, precise
from lorakit.variants.lora import LoRA

MODES = ("nonfrozen", "frozen")


@dataclass
class DyLoRAConfig(VariantConfig):
    """DyLoRA. ``rank`` is the largest rank R; ``min_rank``: the smallest rank sampled in training.
    ``mode``: "nonfrozen" (ranks 1..b train; better in the paper's ablation) or "frozen" (only rank b).
    ``seed``: seeds the rank sampled at each optimizer step (runs are reproducible and resumable)."""

    min_rank: int = 1
    mode: str = "nonfrozen"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        ok = isinstance(self.min_rank, int) and 1 <= self.min_rank <= self.rank
        require(ok, "min_rank", self.min_rank, f"an integer in [1, rank = {self.rank}]")
        require(self.mode in MODES, "mode", self.mode, f"one of {MODES}")
        require(isinstance(self.seed, int), "seed", self.seed, "an integer")


class DyLoRAHook(Hook):
    """Samples the step's rank for every layer and undoes the optimizer's update of untrained rows.

    The rank of step ``t`` is drawn from a generator seeded by ``(seed, t)``, so it is reproducible and needs
    no state in checkpoints. Rows the step does not train (``>= b``; in frozen mode all but ``b - 1``) are
    copied before ``optimizer.step`` and written back after it: AdamW's momentum and weight decay would
    otherwise move them although their gradient is zero (their moment estimates still decay; the weights stay
    bit-identical).
    """

    def __init__(self, model: nn.Module, layers: list[AdaptedLayer], total_steps: int) -> None:
        super().__init__(model, layers, total_steps)
        self.variants: list[DyLoRA] = [layer.variant for layer in layers]
        self.config: DyLoRAConfig = self.variants[0].config
        self.saved: list[tuple[Tensor, Tensor]] = []

    def rank_at(self, step: int) -> int:
        """The step's rank, from ``(seed, step)`` alone: no generator state to checkpoint."""
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        return int(torch.randint(self.config.min_rank, self.config.rank + 1, (1,), generator=gen))

    def on_step_start(self, step: int) -> None:
        b = self.rank_at(step)
        for variant in self.variants:
            variant.sampled = b

    def on_after_backward(self, step: int) -> None:
        self.saved = []
        if self.config.mode == "nonfrozen" and self.variants[0].sampled in (None, self.config.rank):
            return  # every row trains this step
        self.saved = [(v.A.detach().clone(), v.B.detach().clone()) for v in self.variants]

    @torch.no_grad()
    def on_after_step(self, step: int) -> None:
        if not self.saved:
            return
        for variant, (a, b) in zip(self.variants, self.saved, strict=True):
            still = ~variant.trained_rows()  # (R,) rows this step must not change
            variant.A[still] = a[still]
            variant.B[:, still] = b[:, still]
        self.saved = []


class DyLoRA(Variant):
    """``dW = (alpha / b) B[:, :b] A[:b]`` for the sampled (training) or chosen (inference) rank ``b``."""

    name = "dylora"
    config_class = DyLoRAConfig
    summary = "LoRA trained at every rank 1..R at once (rank sampled per step); pick any rank after training"
    paper = "arXiv:2210.07558"
    hook = DyLoRAHook
    peft = PeftSpec("LORA", flags={"use_dora": False})  # written as a plain LoRA at the chosen rank

    def __init__(self, config: DyLoRAConfig, base: AdaptedLayer, shared: Shared) -> None:
        super().__init__(config, base, shared)
        r = config.rank
        self.A = nn.Parameter(torch.empty(r, base.in_features, device=base.device))  # (R, in)
        self.B = nn.Parameter(torch.empty(base.out_features, r, device=base.device))  # (out, R)
        LoRA.reset_parameters(self, base)  # type: ignore[arg-type]  # same init as LoRA
        self.sampled: int | None = None  # the training rank, set by the hook each optimizer step
        self.chosen: int | None = None  # the inference rank, set by set_rank (None: R)
        self.merged_rank: int | None = None  # rank folded into the base weight by merge

    @property
    def current_rank(self) -> int:
        """The inference rank: the one :meth:`choose_rank` chose, else ``R``."""
        return self.chosen if self.chosen is not None else self.config.rank

    @property
    def rank(self) -> int:
        return self.current_rank

    def rank_choices(self) -> range:
        return range(1, self.config.rank + 1)

    def choose_rank(self, b: int | None) -> None:
        self.chosen = b

    def active_rank(self) -> int:
        """The rank the forward uses now: the sampled one in training (once sampled), else the chosen one."""
        return self.sampled if self.training and self.sampled is not None else self.current_rank

    def trained_rows(self) -> Tensor:
        """``(R,)`` bool: ranks the present step updates (``:b``; only ``b - 1`` in frozen mode)."""
        b, rows = self.active_rank(), torch.arange(self.config.rank, device=self.A.device)
        return rows == b - 1 if self.config.mode == "frozen" else rows < b

    def factors(self, b: int) -> tuple[Tensor, Tensor, float]:
        """``A[:b] (b, in)``, ``B[:, :b] (out, b)`` and ``alpha / b``; frozen mode detaches ranks ``< b``."""
        a, up = self.A[:b], self.B[:, :b]
        if self.config.mode == "frozen" and self.training and b > 1:
            a = torch.cat([a[: b - 1].detach(), a[b - 1 :]])
            up = torch.cat([up[:, : b - 1].detach(), up[:, b - 1 :]], dim=1)
        return a, up, self.config.alpha / b

    def delta_weight(self, b: int | None = None) -> Tensor:
        a, up, scale = self.factors(self.current_rank if b is None else b)
        return scale * (precise(up) @ precise(a))

    def forward(self, x: Tensor, y: Tensor, base: AdaptedLayer) -> Tensor:
        a, up, scale = self.factors(self.active_rank())  # W0 x + b0 + (alpha / b) B[:, :b] A[:b] x~
        return y + (scale * base.factored(self.drop(x), a, up)).to(y.dtype)

    def form(self, base: AdaptedLayer) -> LowRank:
        a, up, scale = self.factors(self.active_rank())
        return LowRank(a, up, scale, self.dropout_rate())

    def merged_weight(self, w0: Tensor, base: AdaptedLayer) -> Tensor:
        self.merged_rank = self.current_rank
        return w0 + self.delta_weight(self.merged_rank).to(w0.dtype)

    def unmerged_weight(self, w: Tensor, base: AdaptedLayer) -> Tensor:
        return w - self.delta_weight(self.merged_rank).to(w.dtype)


def _require_dylora(model: nn.Module) -> None:
    if not any(isinstance(m, AdaptedLayer) and isinstance(m.variant, DyLoRA) for m in model.modules()):
        raise ValueError("the model has no DyLoRA adapter; ranks can only be chosen for variant 'dylora'")


def set_rank(model: nn.Module, b: int | None) -> None:
    """Use rank ``b`` (1..R) in every DyLoRA layer outside training; ``None`` restores ``R``."""
    _require_dylora(model)
    ranks.set_rank(model, b)


def evaluate_all_ranks(
    model: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]]
) -> dict[int, dict[str, float]]:
    """``evaluate(model)`` at every rank 1..R of one trained adapter; the chosen rank is restored after."""
    _require_dylora(model)
    return ranks.evaluate_all_ranks(model, evaluate)
