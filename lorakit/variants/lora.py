"""LoRA: low-rank adaptation. Hu et al., 2021, arXiv:2106.09685.

``y = W0 x + b0 + s * B (A dropout(x))`` with ``A (r, d_in)``, ``B (d_out, r)`` and ``s = alpha / r``
(rsLoRA, Kalajdzievski 2023, arXiv:2312.03732: ``s = alpha / sqrt(r)``), i.e. ``dW = s B A`` (Eq. 3).

``A`` starts Kaiming-uniform (as ``nn.Linear``) and ``B`` at zero, so ``dW = 0`` and the adapted model equals
the base at step 0. Embedding layers swap the roles (``A = 0``, ``B ~ N(0, 1)``) as in the authors' code.
The forward never forms ``B A``. It is the low-rank computation form (:class:`~lorakit.core.forms.LowRank`),
which a kernel may compute with a leaner backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorakit.core.config import VariantConfig
from lorakit.core.contract import PeftSpec, Shared
from lorakit.core.forms import LowRank
from lorakit.core.layer import AdaptedLayer
from lorakit.core.variant import Variant, precise


@dataclass
class LoRAConfig(VariantConfig):
    """LoRA. ``rslora``: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``."""

    rslora: bool = False


# PEFT's LoRA format: the factors under PEFT's names, the scale from r and lora_alpha (or rsLoRA's).
LORA_PEFT = PeftSpec("LORA", config_fields={"rslora": "use_rslora"}, flags={"use_dora": False})


class LoRA(Variant):
    """``dW = (alpha / r) B A``."""

    name = "lora"
    config_class = LoRAConfig
    summary = "Low-rank update W0 + (alpha/r) B A; B starts at zero"
    paper = "arXiv:2106.09685"
    peft = LORA_PEFT

    def __init__(self, config: LoRAConfig, base: AdaptedLayer, shared: Shared) -> None:
        super().__init__(config, base, shared)
        r = config.rank
        self.A = nn.Parameter(torch.empty(r, base.in_features, device=base.device))  # (r, in)
        self.B = nn.Parameter(torch.empty(base.out_features, r, device=base.device))  # (out, r)
        self.scale = config.alpha / (math.sqrt(r) if config.rslora else r)
        self.reset_parameters(base)

    def reset_parameters(self, base: AdaptedLayer) -> None:
        with torch.no_grad():
            if base.kind.takes_ids:
                self.A.zero_()
                nn.init.normal_(self.B)
            else:
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
                self.B.zero_()

    def delta_weight(self) -> Tensor:
        return self.scale * (precise(self.B) @ precise(self.A))

    def forward(self, x: Tensor, y: Tensor, base: AdaptedLayer) -> Tensor:
        # h = W0 x + s B A x~ (Eq. 3), W0 x + b0 being the base layer's output y
        return y + (self.scale * base.factored(self.drop(x), self.A, self.B)).to(y.dtype)

    def form(self, base: AdaptedLayer) -> LowRank:
        return LowRank(self.A, self.B, self.scale, self.dropout_rate())
