"""Server-side rules of DP-DyLoRA, in plain torch: the round's update space, cohort and rank sampling, and the
DP-FedAvg aggregate (McMahan et al. 2018, arXiv:1710.06963, Algorithm 1 with the fixed-size estimator).

Per round ``t``, with updates ``Delta_i`` of the clients that replied, clipping bound ``S``, noise multiplier
``sigma`` and expected cohort size ``C = qN``::

    Delta = ( sum_i Delta_i * min(1, S / ||Delta_i||) + N(0, sigma^2 S^2 I) ) / C
    theta <- theta + server_lr * Delta

The norm and the noise cover every coordinate of the round's update space (the rank-``b_t`` slices and any
trained head). Dividing by the expected ``C``, not the number of replies, keeps the sensitivity ``S / C``
whatever the sample. With ``S = 0`` the aggregate is plain FedAvg: the example-weighted mean of updates.

The noise generator and the cohort's generator come from :mod:`lorakit.privacy.randomness` (``os.urandom``
unless the run is in the reproducible, non-private mode); the rank's generator is seeded and shares nothing
with them. Nothing per client (update norms, how many were clipped) is kept: only the noised sum leaves.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import lorakit
from lorakit.core.ranks import round_ranks, set_rank
from lorakit.federated.config import FedConfig
from lorakit.privacy.randomness import gaussian_noise

Space = dict[str, tuple[nn.Parameter, tuple]]  # name -> (trainable tensor, index of the round's part)


def update_space(model: nn.Module, rank: int | None) -> Space:
    """The tensors a round exchanges: every trainable parameter, cut to the rank-``rank`` slice the variant
    declares in ``rank_slices`` (DP-DyLoRA); whole tensors otherwise or when ``rank`` is None."""
    space: Space = {n: (p, (...,)) for n, p in model.named_parameters() if p.requires_grad}
    if rank is None:
        return space
    for layer_name, layer in lorakit.adapted_layers(model):
        for local, index in layer.variant.rank_slices(rank).items():
            name = f"{layer_name}.variant.{local}"
            if name in space:
                space[name] = (space[name][0], index)
    return space


def use_rank(model: nn.Module, rank: int | None) -> None:
    """Fix the round's rank of a model whose server draws one per round (``None``: the largest); a no-op for
    variants without round ranks."""
    if round_ranks(model) is not None:
        set_rank(model, rank)


def read_space(space: Space) -> dict[str, Tensor]:
    """A detached copy of the round's part of each tensor."""
    return {n: p.detach()[index].clone().contiguous() for n, (p, index) in space.items()}


@torch.no_grad()
def write_space(space: Space, values: dict[str, Tensor]) -> None:
    for name, (p, index) in space.items():
        p[index] = values[name].to(p.dtype)


def draw_rank(generator: random.Random, low: int, high: int) -> int:
    """``b_t ~ Uniform{low..high}`` from the server's own generator: independent of any client's data."""
    return generator.randint(low, high)


def sample_cohort(nodes: list[int], cfg: FedConfig, generator: random.Random) -> list[int]:
    """Poisson: every node joins independently with ``q = C/N``; fixed: exactly ``C`` nodes."""
    if cfg.sampling == "fixed":
        return sorted(generator.sample(nodes, cfg.cohort))
    return [n for n in nodes if generator.random() < cfg.sample_rate]


@dataclass
class Reply:
    """One client's answer: its update over the round's space and how many examples it trained on."""

    client: int
    update: dict[str, Tensor]
    examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Aggregate:
    update: dict[str, Tensor]
    used: int
    dropped: list[tuple[int, str]]  # (client, reason)


class DPFedAvg:
    """Clip, sum, noise and scale client updates (see the module docstring)."""

    def __init__(self, cfg: FedConfig, noise_multiplier: float, generator: torch.Generator) -> None:
        self.clip_norm = cfg.clip_norm
        self.noise_multiplier = noise_multiplier
        self.expected_cohort = cfg.cohort
        self.generator = generator

    def aggregate(self, replies: list[Reply], shapes: dict[str, torch.Size]) -> Aggregate:
        kept, dropped = [], []
        for reply in replies:
            reason = _problem(reply.update, shapes)
            if reason:
                dropped.append((reply.client, reason))
            else:
                kept.append(reply)
        total = {n: torch.zeros(s) for n, s in shapes.items()}
        result = Aggregate(total, len(kept), dropped)
        if not self.clip_norm:  # plain FedAvg: example-weighted mean
            weight = sum(r.examples for r in kept)
            for r in kept:
                for n in total:
                    total[n] += r.update[n].float() * (r.examples / weight)
            return result
        for r in kept:
            norm = _norm(r.update)
            factor = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
            for n in total:
                total[n] += r.update[n].float() * factor
        std = self.noise_multiplier * self.clip_norm
        for n in total:
            if std > 0:
                total[n] += gaussian_noise(total[n].shape, std, self.generator)
            total[n] /= self.expected_cohort
        return result


def _norm(update: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in update.values()))


def _problem(update: dict[str, Tensor], shapes: dict[str, torch.Size]) -> str | None:
    """Why an update cannot be used (None if it can)."""
    if set(update) != set(shapes):
        return f"its tensors do not match the round's update space ({len(update)} vs {len(shapes)} tensors)"
    for name, shape in shapes.items():
        if tuple(update[name].shape) != tuple(shape):
            return f"tensor {name} has shape {tuple(update[name].shape)}, expected {tuple(shape)}"
        if not torch.isfinite(update[name]).all():
            return f"tensor {name} holds NaN or infinite values"
    return None
