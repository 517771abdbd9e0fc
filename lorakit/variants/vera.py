"""VeRA: vector-based random matrix adaptation. Kopiczko, Blankevoort, Asano, 2024, arXiv:2310.11454.

``y = W0 x + b0 + b * (B (d * (A x~)))``, i.e. ``dW = diag(b) B diag(d) A`` (Eq. 1), with no alpha/r scale.
``A (r, d_in_max)`` and ``B (d_out_max, r)`` are frozen random matrices drawn once per ``apply`` (Kaiming
uniform, bound ``sqrt(6 / fan_in)``, from a CPU generator seeded with ``projection_seed``: A first, then B,
as PEFT does, so the same seed and shapes give PEFT's projections bit for bit) and shared by every adapted
layer, which uses the top-left slices ``A[:, :d_in]``, ``B[:d_out, :]``. Only ``d (r)`` and ``b (d_out)``
train.

The projections are frozen ``nn.Parameter`` s (not buffers, which per-sample-gradient tools mishandle): one
tensor object registered in every layer, so the optimizer ignores it and the adapter file stores it once.

Step 0: ``b = 0``, so ``dW = 0`` and the adapted model equals the base exactly (``d`` starts at
``d_initial``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorakit.core.config import VariantConfig, require
from lorakit.core.contract import PeftSpec, Shared
from lorakit.core.layer import AdaptedLayer
from lorakit.core.variant import Variant, precise

ALPHA_UNUSED = 16.0  # the field every config has, at its default


@dataclass
class VeRAConfig(VariantConfig):
    """VeRA. ``rank``: rows of the shared ``A`` (paper: 256-1024); no ``alpha`` (no scale; a set one is
    refused).

    ``projection_seed`` seeds the projections; ``projection_shape`` is ``[d_out_max, d_in_max]`` (None: the
    largest target shape, filled in by ``apply`` so the saved adapter records it); ``save_projection``: store
    ``A`` and ``B`` in the adapter file (exact on any RNG) rather than redrawing them from the seed on load.
    """

    rank: int = 256
    alpha: float = ALPHA_UNUSED
    d_initial: float = 0.1
    projection_seed: int = 0
    projection_shape: list[int] | None = None
    save_projection: bool = True

    def max_rank(self, out_features: int, in_features: int) -> int | None:
        """None: ``A`` and ``B`` are shared and frozen, so a rank above a layer's size trains ``r`` numbers
        (``d``), not ``r (in + out)``; the paper uses ranks up to the model width."""
        return None

    def validate(self) -> None:
        super().validate()
        # Eq. 1 has no alpha / r scale (d and b scale the update, and train): an alpha would do nothing.
        require(self.alpha == ALPHA_UNUSED, "alpha", self.alpha, "left unset: VeRA has no alpha / r scale")
        require(isinstance(self.projection_seed, int), "projection_seed", self.projection_seed, "an integer")
        require(math.isfinite(self.d_initial), "d_initial", self.d_initial, "a finite number")
        shape = self.projection_shape
        ok = shape is None or (len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape))
        require(ok, "projection_shape", shape, "None or [d_out_max, d_in_max] (two positive integers)")
        if shape is not None:
            self.projection_shape = list(shape)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Uniform on ``[-sqrt(6 / fan_in), sqrt(6 / fan_in)]`` with ``fan_in = shape[1]``."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(
    config: VeRAConfig, shapes: dict[str, tuple[int, int]], device: torch.device
) -> tuple[nn.Parameter, nn.Parameter]:
    """The shared frozen ``A (r, d_in_max)`` and ``B (d_out_max, r)``, covering every target in ``shapes``."""
    need = [max(s[0] for s in shapes.values()), max(s[1] for s in shapes.values())]
    if config.projection_shape is None:
        config.projection_shape = need  # recorded in the config, hence in the saved adapter
    out_max, in_max = config.projection_shape
    require(out_max >= need[0] and in_max >= need[1], "projection_shape", config.projection_shape,
            f"at least {need} to cover every target layer")  # fmt: skip
    gen = torch.Generator(device="cpu").manual_seed(config.projection_seed)
    a = kaiming_uniform((config.rank, in_max), gen)  # drawn first
    b = kaiming_uniform((out_max, config.rank), gen)
    # Drawn on the CPU (same numbers on any machine), then moved; wrapped last so they stay Parameters.
    return nn.Parameter(a.to(device), requires_grad=False), nn.Parameter(b.to(device), requires_grad=False)


@dataclass
class VeRAShared(Shared):
    """The frozen projections ``(A, B)`` of one ``apply`` call, drawn by its first layer."""

    projections: tuple[nn.Parameter, nn.Parameter] | None = None


class VeRA(Variant):
    """``dW = diag(b) B[:d_out] diag(d) A[:, :d_in]`` with ``A``, ``B`` frozen and shared."""

    name = "vera"
    config_class = VeRAConfig
    summary = "Shared frozen random A, B; trains only scaling vectors d (r) and b (d_out)"
    paper = "arXiv:2310.11454"
    shared_class = VeRAShared
    peft = PeftSpec(
        "VERA",
        names={"b": "vera_lambda_b", "d": "vera_lambda_d"},
        config_fields={"projection_seed": "projection_prng_key", "d_initial": "d_initial"},
    )

    def __init__(self, config: VeRAConfig, base: AdaptedLayer, shared: VeRAShared) -> None:
        super().__init__(config, base, shared)
        if shared.projections is None:
            shared.projections = projections(config, shared.targets, base.device)
        self.A, self.B = shared.projections  # the same two Parameter objects in every layer
        self.d_in, self.d_out = base.in_features, base.out_features
        self.d = nn.Parameter(torch.full((config.rank,), float(config.d_initial), device=base.device))  # (r,)
        self.b = nn.Parameter(torch.zeros(self.d_out, device=base.device))  # (out,)

    def delta_weight(self) -> Tensor:
        a, b = precise(self.A[:, : self.d_in]), precise(self.B[: self.d_out])  # (r, in), (out, r)
        return (precise(self.b)[:, None] * b) @ (precise(self.d)[:, None] * a)

    def forward(self, x: Tensor, y: Tensor, base: AdaptedLayer) -> Tensor:
        kind, view = base.kind, base.kind.channel_view
        x = self.drop(x)
        x = x.to(y.dtype) if x.is_floating_point() else x  # embeddings take integer ids
        a, b = self.A[:, : self.d_in].to(y), self.B[: self.d_out].to(y)  # (r, in), (out, r) slices (views)
        z = kind.down(base.base_layer, x, a)  # A x~: (..., r)
        u = kind.up(z * view(self.d.to(y.dtype)), b)  # B (d * A x~): (..., out)
        return y + view(self.b.to(y.dtype)) * u

    def adapter_state(self) -> dict[str, Tensor]:
        state = super().adapter_state()
        if not self.config.save_projection:  # redrawn from projection_seed and projection_shape on load
            del state["A"], state["B"]
        return state

    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        if not self.config.save_projection:
            state = {**state, "A": self.A.detach(), "B": self.B.detach()}
        for key, value in self.state_dict().items():
            if key in state and state[key].shape != value.shape:
                raise ValueError(f"adapter tensor '{key}' has shape {tuple(state[key].shape)}, expected "
                                 f"{tuple(value.shape)}; it was saved for other target layers")  # fmt: skip
        super().load_adapter_state(state)
