"""DoRA: weight-decomposed low-rank adaptation. Liu et al., 2024, arXiv:2402.09353.

``V = W0 + s B A`` (LoRA, ``s = alpha / r``) and ``W' = m * V / ||V||_row`` (Eq. 5): a trainable magnitude
``m (d_out,)`` times the unit direction of each output row. Rows are rows of the ``(out, in)`` view, so the
norm is over all but the output dim for every kind (over the vocabulary for embeddings, as PEFT does). The
norm is detached (Sec. 4.3): A and B get gradients only through the numerator.

Forward without forming ``W'``: with ``c = m / ||V||_row``, ``W' x~ = c * (W0 x~ + s B A x~)``. With input
dropout ``x~`` the base output ``y = W0 x + b0`` stays as it is (as in the paper's code and PEFT) and the
adapter adds ``W' x~ - W0 x~``::

    y' = y + (c - 1) * W0 x~ + c * s B A x~

Without dropout ``W0 x = y - b0`` is reused; with dropout ``W0 x~`` is one more base op on the dropped-out
input. The row norm never forms a ``d_out x d_in`` product:
``||V_i||^2 = ||W0_i||^2 + 2 s <W0_i, (BA)_i> + s^2 ||(BA)_i||^2`` with ``(out, r)`` temporaries only.

Step 0: ``B = 0`` (``A = 0`` for embeddings) and ``m = ||W0||_row``, so ``c = 1`` and ``W' = W0`` exactly.
The forward is the weight-decomposed computation form (:class:`~lorakit.core.forms.WeightDecomposed`), which
a kernel may compute in one fused function.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorakit.core.contract import PeftSpec, Shared
from lorakit.core.forms import WeightDecomposed
from lorakit.core.layer import AdaptedLayer
from lorakit.core.variant import precise_dtype
from lorakit.variants.lora import LoRA, LoRAConfig

_ROWS = 4096  # rows of W0 upcast to fp32 at a time (bounds the temporary for bf16 or dequantised bases)


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA: the LoRA fields (rank, alpha, dropout, rslora); the magnitude needs no settings."""

    def validate(self) -> None:
        super().validate()


def _key(*tensors: Tensor) -> tuple | None:
    # Identifies tensor contents: in-place updates (optimizer steps, loads, merges) bump ``_version``.
    # None under torch.func transforms (wrapped tensors have no storage) and while torch.compile traces
    # (storage addresses are not traceable): nothing is cached there.
    if torch.compiler.is_compiling():
        return None
    try:
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    except RuntimeError:
        return None


def w0_sq_norms(w0: Tensor) -> Tensor:
    """``||W0_i||^2`` per row in fp32 (fp64 for an fp64 weight), ``(out,)``."""
    acc = precise_dtype(w0.dtype)
    return torch.cat([rows.to(acc).square().sum(1) for rows in w0.split(_ROWS)])


@torch.no_grad()
def row_norm(w0: Tensor, w0_sq: Tensor, a: Tensor, b: Tensor, s: float) -> Tensor:
    """``||W0 + s B A||_row`` in fp32 (fp64 for an fp64 weight), never forming ``B A``: ``w0 (out, in)``,
    ``a (r, in)``, ``b (out, r)``.

    Called under no_grad: the norm is a constant for autograd (paper Sec. 4.3)."""
    acc = precise_dtype(w0.dtype)
    a, b = a.to(acc), b.to(acc)
    w0a = torch.cat([rows.to(acc) @ a.t() for rows in w0.split(_ROWS)])  # (out, r) = W0 A^T
    rowdot = (w0a * b).sum(1)  # <W0_i, (BA)_i> = (B A W0^T)_ii
    ba_sq = ((b @ (a @ a.t())) * b).sum(1)  # ||(BA)_i||^2 = (B A A^T B^T)_ii
    norm = (w0_sq + 2 * s * rowdot + s * s * ba_sq).clamp_min(0).sqrt()
    # An all-zero row has no direction: divide by 1 instead of 0 (its output stays exactly zero, no NaN).
    return norm.masked_fill(norm == 0, 1.0)


class DoRA(LoRA):
    """``W' = m * (W0 + s B A) / ||W0 + s B A||_row`` (norm detached)."""

    name = "dora"
    config_class = DoRAConfig
    summary = "LoRA direction plus a trainable per-row magnitude m; W' = m V / ||V||_row"
    paper = "arXiv:2402.09353"
    peft = PeftSpec(
        "LORA",
        names={"m": "lora_magnitude_vector"},
        config_fields={"rslora": "use_rslora"},
        flags={"use_dora": True},
    )

    def __init__(self, config: DoRAConfig, base: AdaptedLayer, shared: Shared) -> None:
        super().__init__(config, base, shared)
        # Caches are plain attributes, not buffers: they derive from the base weight and A, B, so they are
        # rebuilt after a load or a dtype/device move and never enter the adapter file.
        self._w0_sq: tuple[tuple, Tensor] | None = None  # ||W0||^2_row, keyed on the base weight
        # ||V||_row in eval mode: (its key on W0, A, B; the norm; the A and B it was computed from)
        self._eval_norm: tuple[tuple, Tensor, Tensor, Tensor] | None = None
        self._merge_state: tuple[Tensor, Tensor, Tensor] | None = None  # (norm, rows with m = 0, their W0)
        # m = ||W0||_row, bit-equal to the forward's norm at step 0 (B A = 0 there), so c = 1 exactly.
        self.m = nn.Parameter(self.w0_sq(base.weight_2d(), base).sqrt())  # (out,)

    def w0_sq(self, w0: Tensor, base: AdaptedLayer) -> Tensor:
        key = _key(base.stored_weight())
        if key is None:
            return w0_sq_norms(w0)
        if self._w0_sq is None or self._w0_sq[0] != key:
            self._w0_sq = (key, w0_sq_norms(w0))
        return self._w0_sq[1]

    def weight_norm(self, base: AdaptedLayer) -> Tensor:
        """``||W0 + s B A||_row`` (fp32 or fp64, detached, ``(out,)``); cached in eval mode until W0, A, B
        change. ``A`` and ``B`` are compared by value too (they are small): an edit through ``.data`` bumps no
        version."""
        key = None if self.training else _key(base.stored_weight(), self.A, self.B)  # training: A, B move
        if key is not None and self._eval_norm is not None:
            cached_key, norm, a, b = self._eval_norm
            if cached_key == key and torch.equal(a, self.A) and torch.equal(b, self.B):
                return norm
        w0 = base.weight_2d()
        norm = row_norm(w0, self.w0_sq(w0, base), self.A, self.B, self.scale)
        if key is not None:
            self._eval_norm = (key, norm, self.A.detach().clone(), self.B.detach().clone())
        return norm

    def train(self, mode: bool = True) -> DoRA:
        self._eval_norm = self._w0_sq = None  # switching modes starts from the weights as they are
        return super().train(mode)

    def needs_base_output(self, x: Tensor, base: AdaptedLayer) -> bool:
        return True  # the magnitude scales W0 x~ + b0, which the forward forms from y

    def forward(self, x: Tensor, y: Tensor, base: AdaptedLayer) -> Tensor:
        view = base.kind.channel_view  # a per-row (out,) vector against this kind's output
        # c = m / ||V|| stays fp32: near 1 a bf16 c moves in steps of 2**-8, so a small change of m would be
        # lost (c - 1 exactly 0). The sum is formed in fp32 (by promotion) and cast once to the output dtype.
        c = view(self.m.to(precise_dtype(self.m.dtype)) / self.weight_norm(base))
        b0 = 0.0 if base.bias is None else view(base.bias.to(y.dtype))
        if self.dropout_rate() > 0:
            x = self.drop(x)
            if base.weight_is_dequantised():  # the 4-bit layer's own op keeps its codes, not W0, for backward
                w0x = base.base_layer(x) - b0
            else:
                w0x = base.kind.op(base.base_layer, x, base.weight_2d())  # W0 x~
        else:
            w0x = y - b0  # W0 x, reused from y
        lora = self.scale * base.factored(x, self.A, self.B)  # s B A x~
        return (y + (c - 1) * w0x + c * lora).to(y.dtype)

    def form(self, base: AdaptedLayer) -> WeightDecomposed:
        norm = functools.partial(self.weight_norm, base)  # computed only by what reads the form
        return WeightDecomposed(self.A, self.B, self.scale, self.dropout_rate(), self.m, norm)

    def merged_weight(self, w0: Tensor, base: AdaptedLayer) -> Tensor:
        v = w0 + self.delta_weight().to(w0.dtype)  # (out, in): merging forms the weight anyway
        norm = v.norm(dim=1)  # in the merge's dtype (fp32, or fp64 for an fp64 base)
        norm = norm.masked_fill(norm == 0, 1.0)
        dead = self.m.detach() == 0  # rows that W' zeroes: W0 cannot be recovered from them, so keep it
        self._merge_state = (norm, dead, w0[dead].clone())
        return (self.m.detach().to(w0.dtype) / norm)[:, None] * v

    def unmerged_weight(self, w: Tensor, base: AdaptedLayer) -> Tensor:
        if self._merge_state is None:
            raise RuntimeError("DoRA unmerge needs the norm cached by merge; merge before unmerging")
        norm, dead, rows = self._merge_state
        m = self.m.detach().to(w.dtype).masked_fill(dead, 1.0)
        v = (norm / m)[:, None] * w  # W = m V / n  ->  V = W n / m
        w0 = v - self.delta_weight().to(w.dtype)  # W0 = V - s B A
        w0[dead] = rows.to(w.dtype)
        self._merge_state = None
        return w0
