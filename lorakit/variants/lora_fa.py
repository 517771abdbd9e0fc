"""LoRA-FA: LoRA with A frozen at a random init; only B trains. Zhang et al., 2023, arXiv:2308.03303.

``y = W0 x + b0 + s * B (A dropout(x))``, ``dW = s B A``, with ``A (r, d_in)`` Kaiming-uniform and frozen and
``B (d_out, r)`` trained: ``d_out * r`` trainable parameters per layer, and ``dW`` stays in row(A).

Memory: ``dL/dB = s g^T z`` needs only ``z = A x~`` (``N x r``); ``dL/dA`` would need the input
(``N x d_in``).
The forward is LoRA's; with ``A`` frozen, the low-rank kernel (``lorakit.kernels.lowrank``) keeps no
input-sized tensor for the adapter on Linear and GPT-2 Conv1D layers, with dropout too (the mask is drawn
again from its seed in backward).

Optional v2 correction (``precondition=True``, as PEFT's ``create_lorafa_optimizer``): just before the
optimizer step, after gradient clipping, ``g_B <- (1/s^2) g_B (A A^T)^+``. With ``g_B = s G A^T`` (``G`` the
gradient of the full weight) this makes ``s dB A = G A^T (A A^T)^+ A``, the projection of ``G`` onto row(A):
the closest step to full fine-tuning's that ``dW`` can take. PEFT applies it inside the optimizer's ``step``,
so a global clip sees the raw ``g_B``; the order matters because the correction changes the gradient's norm,
from which the clip computes its one factor for all tensors.

Step 0: ``B = 0``, so ``dW = 0`` and the model equals the base. ``A`` is random on every kind, embedding
layers included (LoRA zeroes ``A`` there; a frozen zero ``A`` would never learn anything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.config import require
from lorakit.core.contract import Shared
from lorakit.core.layer import AdaptedLayer
from lorakit.core.variant import Hook
from lorakit.variants.lora import LORA_PEFT, LoRA, LoRAConfig


@dataclass
class LoRAFAConfig(LoRAConfig):
    """LoRA-FA. ``precondition``: apply the v2 gradient correction ``(1/s^2) g_B (A A^T)^+`` to ``B``."""

    precondition: bool = False

    def validate(self) -> None:
        super().validate()
        require(isinstance(self.precondition, bool), "precondition", self.precondition, "True or False")


def precondition_grad(g_B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """``(1/s^2) g_B (A A^T)^+`` in fp32, returned in ``g_B``'s dtype. ``g_B (out, r)``, ``A (r, in)``."""
    a = A.detach().float()
    gram_pinv = torch.linalg.pinv(a @ a.t())  # (r, r); pinv copes with a rank-deficient A
    return (g_B.float() @ gram_pinv).div_(scale**2).to(g_B.dtype)


class LoRAFAHook(Hook):
    """Applies the optional v2 correction to every ``B`` gradient once per optimizer step, after clipping."""

    def on_before_optimizer_step(self, step: int) -> None:
        with torch.no_grad():
            for layer in self.layers:
                variant = layer.variant
                if variant.config.precondition and variant.B.grad is not None:
                    variant.B.grad.copy_(precondition_grad(variant.B.grad, variant.A, variant.scale))


class LoRAFA(LoRA):
    """``dW = (alpha / r) B A`` with ``A`` frozen at its random init."""

    name = "lora_fa"
    config_class = LoRAFAConfig
    summary = "LoRA with A frozen at a random init; only B trains (less activation memory)"
    paper = "arXiv:2308.03303"
    hook = LoRAFAHook
    peft = LORA_PEFT  # the same forward as LoRA; PEFT's LoRA-FA is LoRA with a frozen A in its optimizer

    def __init__(self, config: LoRAFAConfig, base: AdaptedLayer, shared: Shared) -> None:
        super().__init__(config, base, shared)
        # Still a Parameter (saved, loaded, seen by per-sample-gradient tools), just never trained.
        self.A.requires_grad_(False)

    def reset_parameters(self, base: AdaptedLayer) -> None:
        # Same init on every kind: the embedding swap of LoRA would leave a frozen A at zero.
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # (r, in)
            self.B.zero_()  # (out, r)
