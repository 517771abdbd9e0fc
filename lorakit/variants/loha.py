"""LoHa: low-rank Hadamard-product adaptation. Hyeon-Woo et al. (FedPara), 2022, arXiv:2108.06098; LyCORIS.

``dW = s * (B1 A1) * (B2 A2)`` (elementwise) with ``B_i (d_out, r)``, ``A_i (r, d_in)`` and ``s = alpha / r``:
rank up to ``r^2`` from ``2 r (d_in + d_out)`` parameters. The forward is ``y + op(x~, dW)`` for every layer
kind (convolutions use the flattened ``(out, in * k)`` kernel view), so ``dW`` is formed once per forward.

Init (PEFT, FedPara's He init): ``B1, A1, B2`` Kaiming-uniform and ``A2 = 0``; ``init="lycoris"`` uses
LyCORIS' ``B1 ~ N(0, 0.1^2)``, ``A1, A2 ~ N(0, 1)``, ``B2 = 0``. Either way ``B2 A2 = 0``, so ``dW = 0`` and
the model is unchanged at step 0 (only the zero factor gets a gradient then). Merging adds ``dW`` once:
LyCORIS' ``get_diff_weight`` multiplies the already scaled weight by ``s`` again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lorakit.core.config import VariantConfig, require
from lorakit.core.contract import PeftSpec, Shared
from lorakit.core.kinds import ALL_KINDS, EMBEDDING
from lorakit.core.layer import AdaptedLayer
from lorakit.core.variant import Variant, precise


class HadamardProduct(torch.autograd.Function):
    """``s (B1 A1) * (B2 A2)`` saving only the four factors; backward recomputes the two ``(out, in)``
    products instead of keeping them alive (plain autograd saves both for the elementwise product)."""

    @staticmethod
    def forward(ctx: Any, b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(b1, a1, b2, a2)
        ctx.scale = scale
        return (b1 @ a1).mul_(b2 @ a2).mul_(scale)  # (out, in)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        b1, a1, b2, a2 = ctx.saved_tensors
        g = grad * ctx.scale  # (out, in)
        g1 = g * (b2 @ a2)  # dL/d(B1 A1)
        g2 = g.mul_(b1 @ a1)  # dL/d(B2 A2), reusing g's memory
        need = ctx.needs_input_grad
        return (
            g1 @ a1.t() if need[0] else None,  # (out, r)
            b1.t() @ g1 if need[1] else None,  # (r, in)
            g2 @ a2.t() if need[2] else None,
            b2.t() @ g2 if need[3] else None,
            None,
        )


@dataclass
class LoHaConfig(VariantConfig):
    """LoHa. ``init``: ``"peft"`` (``A2 = 0``, others Kaiming-uniform) or ``"lycoris"`` (``B2 = 0``, others
    normal)."""

    init: str = "peft"

    def validate(self) -> None:
        super().validate()
        require(self.init in ("peft", "lycoris"), "init", self.init, "'peft' or 'lycoris'")


class LoHa(Variant):
    """``dW = (alpha / r) (B1 A1) * (B2 A2)``."""

    name = "loha"
    config_class = LoHaConfig
    summary = "Hadamard product of two low-rank updates, rank up to r^2; one factor starts at zero"
    paper = "arXiv:2108.06098"
    peft = PeftSpec("LOHA", {"B1": "hada_w1_a", "A1": "hada_w1_b", "B2": "hada_w2_a", "A2": "hada_w2_b"})
    # Not embeddings: LoHa would form a (dim, vocab) delta every forward; PEFT and LyCORIS skip them too.
    kinds = ALL_KINDS - {EMBEDDING}

    def __init__(self, config: LoHaConfig, base: AdaptedLayer, shared: Shared) -> None:
        super().__init__(config, base, shared)
        r, d_out, d_in, dev = config.rank, base.out_features, base.in_features, base.device
        self.B1 = nn.Parameter(torch.empty(d_out, r, device=dev))  # (out, r)
        self.A1 = nn.Parameter(torch.empty(r, d_in, device=dev))  # (r, in)
        self.B2 = nn.Parameter(torch.empty(d_out, r, device=dev))  # (out, r)
        self.A2 = nn.Parameter(torch.empty(r, d_in, device=dev))  # (r, in)
        self.scale = config.alpha / r
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.config.init == "lycoris":
                nn.init.normal_(self.B1, std=0.1)
                nn.init.normal_(self.A1)
                nn.init.normal_(self.A2)
                self.B2.zero_()
            else:
                for p in (self.B1, self.A1, self.B2):
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                self.A2.zero_()

    def delta_weight(self) -> Tensor:
        b1, a1, b2, a2 = (precise(t) for t in (self.B1, self.A1, self.B2, self.A2))
        return HadamardProduct.apply(b1, a1, b2, a2, self.scale)

    def needs_base_output(self, x: Tensor, base: AdaptedLayer) -> bool:
        # One product with W0 + dW instead of W0 x and dW x: the forward and the input gradient each save one
        # (N x in x out) product, and dL/d(dW) = g^T x is the one weight product left (PEFT and LyCORIS run
        # all five). With input dropout the two terms see different inputs, so it needs dropout off.
        return not ((self.dropout is None or not self.training) and base.weight_folds_exactly(x))

    def forward(self, x: Tensor, y: Tensor | None, base: AdaptedLayer) -> Tensor:
        if y is None:  # the folded form (needs_base_output)
            return base.kind.op(base.base_layer, x, base.weight_2d() + self.delta_weight(), base.bias)
        return super().forward(x, y, base)
