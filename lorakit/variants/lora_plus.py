"""LoRA+: LoRA whose up-projection learns faster. Hayou, Ghosh, Yu, 2024, arXiv:2402.12354.

The model is exactly LoRA, ``y = W0 x + b0 + s * B (A dropout(x))``; only the optimizer groups change:
``lr_B = ratio * lr_A`` (for wide layers the efficient update needs ``eta_B / eta_A = Theta(width)``).
Grouping as in the authors' code (and PEFT's ``create_loraplus_optimizer``): ``A`` and every other 2-D
trainable at ``lr``, ``B`` at ``lr * ratio``, every adapter tensor of an embedding layer at a separate fixed
``embedding_lr``. One-dimensional trainables go to ``lr * ratio`` when ``one_d_at_ratio`` is True (the
authors' ``param.ndim == 1`` rule), else to ``lr``: in practice these are the biases and norm weights of fully
trained modules (``train_modules``, e.g. a new classifier head, whose 2-D weight stays at ``lr``), and the 1-D
tensors of subclasses. Weight decay is used exactly as given, in every group (the authors' code sets it to 0
for biases and norms, PEFT to 0 everywhere unless told otherwise). A scheduler scales all groups by the same
factor, so the ratio stays fixed.

Step 0: ``B = 0`` (``A = 0`` for embeddings), so ``dW = 0`` and the model equals the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from lorakit.core.config import require
from lorakit.core.contract import Shared
from lorakit.core.layer import AdaptedLayer
from lorakit.variants.lora import LORA_PEFT, LoRA, LoRAConfig


@dataclass
class LoRAPlusConfig(LoRAConfig):
    """LoRA+.

    ``ratio``: ``lr_B / lr_A`` (paper default 16; the authors' scripts use 10-80).
    ``embedding_lr``: fixed learning rate of adapters on embedding layers (authors' default 1e-6).
    ``one_d_at_ratio``: put 1-D trainable parameters (the biases and norms of ``train_modules``) at
    ``lr * ratio`` (authors' code) instead of ``lr``.
    """

    ratio: float = 16.0
    embedding_lr: float = 1e-6
    one_d_at_ratio: bool = True

    def validate(self) -> None:
        super().validate()
        require(
            0 < self.ratio < math.inf,
            "ratio",
            self.ratio,
            "a positive finite number (lr_B / lr_A, usually 10-80)",
        )
        require(
            0 <= self.embedding_lr < math.inf,
            "embedding_lr",
            self.embedding_lr,
            "a finite learning rate >= 0",
        )
        require(isinstance(self.one_d_at_ratio, bool), "one_d_at_ratio", self.one_d_at_ratio, "True or False")


class LoRAPlus(LoRA):
    """LoRA with ``lr_B = ratio * lr_A``."""

    name = "lora_plus"
    config_class = LoRAPlusConfig
    summary = "LoRA with B trained at ratio x the learning rate of A"
    paper = "arXiv:2402.12354"
    peft = LORA_PEFT  # the same forward as LoRA; the learning rates are no part of the adapter file

    def __init__(self, config: LoRAPlusConfig, base: AdaptedLayer, shared: Shared) -> None:
        super().__init__(config, base, shared)
        self.on_embedding = base.kind.takes_ids

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        cfg: LoRAPlusConfig = self.config
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.on_embedding:
            return _groups([(trainable, cfg.embedding_lr)], weight_decay)
        # Roles by attribute: B is the up-projection; 1-D tensors follow the documented option.
        fast = [p for p in trainable if p is self.B or _one_d_fast(p, cfg)]
        slow = [p for p in trainable if all(p is not q for q in fast)]
        return _groups([(slow, lr), (fast, lr * cfg.ratio)], weight_decay)

    @classmethod
    def trained_module_groups(
        cls, config: LoRAPlusConfig, params: list[nn.Parameter], lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        # The authors' rule on the whole model: a fully trained head's bias at lr * ratio, its weight at lr.
        fast = [p for p in params if _one_d_fast(p, config)]
        slow = [p for p in params if not _one_d_fast(p, config)]
        return _groups([(slow, lr), (fast, lr * config.ratio)], weight_decay)


def _one_d_fast(p: nn.Parameter, cfg: LoRAPlusConfig) -> bool:
    """Whether ``p`` is a 1-D tensor that the ``one_d_at_ratio`` option puts at ``lr * ratio``."""
    return p.dim() == 1 and cfg.one_d_at_ratio


def _groups(rated: list[tuple[list[nn.Parameter], float]], weight_decay: float) -> list[dict[str, Any]]:
    return [{"params": ps, "lr": rate, "weight_decay": weight_decay} for ps, rate in rated if ps]
