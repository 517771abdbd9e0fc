"""LoKr: Kronecker-product adaptation. Yeh et al. (LyCORIS) 2024, arXiv:2309.14859; KronA, Edalati 2022.

``dW = s * kron(W1, W2)`` with ``W1 (a, c)``, ``W2 (b, d)``, ``d_out = a b`` and ``d_in = c d`` from
:func:`factorization`; ``W2 = W2a W2b`` (``(b, r) (r, d)``) when ``r < max(b, d) / 2``, else full, and with
``decompose_both`` ``W1 = W1a W1b`` when ``r < max(a, c) / 2``. ``s = alpha / r`` always (PEFT; LyCORIS sets
``s = 1`` when neither factor is decomposed). Convolutions factor the channels and keep the kernel in ``W2``
(``(b, d k)``, as LyCORIS and PEFT), so ``kron(W1, W2)`` is the flattened ``(out, in * k)`` kernel.

Init as PEFT: ``W1`` (or ``W1a``) is zero and the other factors Kaiming-uniform, so ``dW = 0`` at step 0.
The forward is ``y + op(x~, dW)`` (the default); it is the Kronecker computation form
(:class:`~lorakit.core.forms.Kronecker`), which a kernel may compute on matrix layers without forming ``dW``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorakit.core.config import VariantConfig, require
from lorakit.core.contract import PeftSpec, Shared
from lorakit.core.forms import Kronecker
from lorakit.core.kinds import ALL_KINDS, EMBEDDING
from lorakit.core.layer import AdaptedLayer
from lorakit.core.variant import Variant, precise


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """``dim = m * n`` with ``m <= n`` (LyCORIS's order; PEFT keeps ``(factor, dim / factor)`` unsorted):
    the pair ``{factor, dim / factor}`` when ``factor`` divides ``dim``, else the
    largest divisor ``m`` (not above ``factor`` when one is given) reached by growing ``m`` while ``m + n``
    decreases, i.e. while ``m <= sqrt(dim)``: 768 -> (24, 32), 11008 -> (86, 128), 127 -> (1, 127)."""
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    limit = math.isqrt(dim) if factor <= 0 else min(factor, math.isqrt(dim))
    m = max(k for k in range(1, limit + 1) if dim % k == 0)
    return m, dim // m


def _param(device: torch.device, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device))


@dataclass
class LoKrConfig(VariantConfig):
    """LoKr. ``factor``: split dims as ``(factor, dim / factor)`` (-1: nearest to square). ``decompose_both``:
    also make ``W1`` low rank when ``rank < max(a, c) / 2``."""

    factor: int = -1
    decompose_both: bool = False

    def validate(self) -> None:
        super().validate()
        ok = isinstance(self.factor, int) and (self.factor == -1 or self.factor > 0)
        require(ok, "factor", self.factor, "-1 (near-square split) or a positive integer")
        require(isinstance(self.decompose_both, bool), "decompose_both", self.decompose_both, "True or False")

    def max_rank(self, out_features: int, in_features: int) -> int | None:
        """None: the rank only decides whether a Kronecker factor is stored as two low-rank factors (below
        half its size) or whole, as in LyCORIS and PEFT, so a rank above a layer's size keeps them whole."""
        return None


class LoKr(Variant):
    """``dW = (alpha / r) kron(W1, W2)``."""

    name = "lokr"
    config_class = LoKrConfig
    summary = "Kronecker product of a small and a (low-rank) large factor; W1 starts at zero"
    paper = "arXiv:2309.14859"
    peft = PeftSpec(
        "LOKR",
        names={"W1": "lokr_w1", "W1a": "lokr_w1_a", "W1b": "lokr_w1_b"}
        | {"W2": "lokr_w2", "W2a": "lokr_w2_a", "W2b": "lokr_w2_b"},
        config_fields={"decompose_both": "decompose_both", "factor": "decompose_factor"},
    )
    # Not embeddings (as PEFT and LyCORIS): the delta would be formed at (dim, vocab) size every forward.
    kinds = ALL_KINDS - {EMBEDDING}

    def __init__(self, config: LoKrConfig, base: AdaptedLayer, shared: Shared) -> None:
        super().__init__(config, base, shared)
        r, dev, d_out, d_in = config.rank, base.device, base.out_features, base.in_features
        # Kernel elements per input channel: the conv view is (out, in_ch * k); 1 for Linear and Conv1D.
        k = 1 if base.kind.features_last else base.base_layer.weight[0, 0].numel()
        a, b = factorization(d_out, config.factor)
        c, d = factorization(d_in // k, config.factor)
        for dim, m in ((d_out, a), (d_in // k, c)):
            if m == 1 and dim > 1:
                warnings.warn(
                    f"LoKr on a ({d_out} x {d_in}) layer: dimension {dim} only factors as (1, {dim}) "
                    f"with factor={config.factor}, so the Kronecker product saves nothing along it",
                    stacklevel=2,
                )
        self.shape = (a, b, c, d * k)
        self.scale = config.alpha / r
        for name in ("W1", "W1a", "W1b", "W2", "W2a", "W2b"):
            self.register_parameter(name, None)  # absent factors stay None (and out of the state dict)
        if config.decompose_both and r < max(a, c) / 2:
            self.W1a, self.W1b = _param(dev, a, r), _param(dev, r, c)  # (a, r), (r, c)
        else:
            self.W1 = _param(dev, a, c)
        if r < max(b, d) / 2:  # the channel factor d decides, as in LyCORIS and PEFT for convolutions too
            self.W2a, self.W2b = _param(dev, b, r), _param(dev, r, d * k)  # (b, r), (r, d k)
        else:
            self.W2 = _param(dev, b, d * k)
        self.reset_parameters()

    def peft_problem(self, base: AdaptedLayer) -> str | None:
        """Where PEFT's LoKr computes this layer differently, whichever library wrote the tensors.

        With an explicit factor PEFT keeps ``(factor, dim / factor)`` where lorakit puts the smaller number
        first: the factors have other shapes. On a ``Conv1d`` whose ``W2`` is stored whole (``(b, d, k)`` in
        PEFT's file), PEFT's ``make_kron`` adds ``W1``'s trailing dimensions only for a 4-D ``W2``, so
        ``kron`` of the 2-D ``W1 (a, c)`` and the 3-D ``W2`` puts the same numbers at other places unless
        the product is trivial on both sides (``a`` or ``b`` is 1, and ``c`` or ``d`` is 1). Checked against
        PEFT 0.21 both ways on Conv1d layers of 1-12 channels, kernels 1 and 3, ranks 1-8, with and without
        ``decompose_both``."""
        factor = self.config.factor
        kernel = base.kind.kernel_shape(base.base_layer)
        in_channels = base.in_features // math.prod(kernel)
        for dim in (base.out_features, in_channels) if factor > 0 else ():
            if dim % factor == 0 and factor > dim // factor:
                return (
                    f"with decompose_factor {factor} PEFT splits {dim} as ({factor}, {dim // factor}) and "
                    f"lorakit as ({dim // factor}, {factor}), so their Kronecker factors have other shapes "
                    f"(factor {dim // factor} or -1 splits it as PEFT does)"
                )
        a, b, c, dk = self.shape
        d = dk // math.prod(kernel)
        if len(kernel) != 1 or self.W2 is None or ((a == 1 or b == 1) and (c == 1 or d == 1)):
            return None
        low_rank = f" (a rank below {max(b, d) / 2:g} keeps W2 as two factors, which PEFT reads the same)"
        return (
            f"LoKr on a Conv1d with W2 stored whole as ({b}, {d}, {kernel[0]}): PEFT's make_kron forms the "
            f"Kronecker product of the 2-D W1 ({a}, {c}) with a 3-D W2 without giving W1 a kernel dimension, "
            "so it builds another weight from the same tensors" + (low_rank if max(b, d) > 2 else "")
        )

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for p in (self.W1b, self.W2, self.W2a, self.W2b):
                if p is not None:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            (self.W1 if self.W1 is not None else self.W1a).zero_()

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(W1, W2)``: ``(a, c)`` and ``(b, d k)``, multiplied out where they are low rank (in
        :func:`~lorakit.core.variant.precise` precision)."""
        w1 = precise(self.W1) if self.W1 is not None else precise(self.W1a) @ precise(self.W1b)
        w2 = precise(self.W2) if self.W2 is not None else precise(self.W2a) @ precise(self.W2b)
        return w1, w2

    def delta_weight(self) -> Tensor:
        w1, w2 = self.factors()
        return self.scale * torch.kron(w1, w2)  # (a b, c d k)

    def form(self, base: AdaptedLayer) -> Kronecker:
        w1, w2 = self.factors()
        return Kronecker(w1, w2, self.scale, self.dropout_rate())
