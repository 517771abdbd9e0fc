"""Where differential privacy gets its randomness: the noise and the privacy-relevant sampling.

The guarantee of DP-SGD and DP-FedAvg holds only if nobody who sees the run can regenerate the noise (and
the Poisson sample the accountant credits). A seed that is written to ``job.json`` / ``metrics.json`` or sent
to clients therefore must not seed them: by default every generator here is seeded with 64 bits from
``os.urandom`` that are never stored or logged, and the federated cohort is drawn by ``random.SystemRandom``
(the operating system's CSPRNG) itself.

The reproducible mode (``dp_insecure_seed``, ``--dp-insecure-seed``) derives them from the run's seed instead,
for tests and debugging only: anyone who knows the seed can subtract the noise, so the run is recorded as not
private. Data-independent draws that the accountant does not rely on (DP-DyLoRA's rank per round, the data
order of local training) stay seeded from the run's seed, on generators that share nothing with these.
"""

from __future__ import annotations

import os
import random
import warnings

import torch
from torch import Tensor

# Streams of the reproducible mode, so the noise and the sampling never share a generator.
NOISE_STREAM = 1
SAMPLING_STREAM = 2


def insecure_warning(what: str) -> str:
    return (
        f"{what} runs with --dp-insecure-seed: the noise and the sampling are derived from the seed that "
        "is written to the run's files (and sent to federated clients), so anyone who knows it can "
        "regenerate the noise and subtract it. The epsilon reported is NOT a guarantee; for tests only."
    )


def warn_insecure(what: str) -> None:
    warnings.warn(insecure_warning(what), UserWarning, stacklevel=3)


def derived_seed(seed: int, stream: int) -> int:
    """The reproducible mode's seed for ``stream`` (one of the ``*_STREAM`` constants)."""
    return (seed * 1_000_003 + stream * 7919) % 2**63


def private_generator(stream: int, insecure_seed: int | None = None) -> torch.Generator:
    """A torch generator for DP noise or sampling: seeded from ``os.urandom`` (never stored), or, only when
    ``insecure_seed`` is given (the reproducible, non-private mode), from that seed and ``stream``."""
    if insecure_seed is None:
        seed = int.from_bytes(os.urandom(8), "little") % 2**63
    else:
        seed = derived_seed(insecure_seed, stream)
    return torch.Generator().manual_seed(seed)


def private_random(stream: int, insecure_seed: int | None = None) -> random.Random:
    """A ``random.Random`` for privacy-relevant sampling (the federated cohort): the operating system's
    CSPRNG (``random.SystemRandom``), or a seeded generator in the reproducible, non-private mode."""
    if insecure_seed is None:
        return random.SystemRandom()
    return random.Random(derived_seed(insecure_seed, stream))


def gaussian_noise(shape: torch.Size | tuple[int, ...], std: float, generator: torch.Generator) -> Tensor:
    """``N(0, std^2)`` noise as the sum of four draws divided by two, which resists the floating-point
    attacks on the Gaussian mechanism (Holohan et al. 2021, arXiv:2107.10138, Sec. 5.1, ``n = 2``; the
    construction of Opacus' ``secure_mode``)."""
    total = torch.zeros(shape)
    for _ in range(4):
        total += torch.normal(0.0, std, tuple(shape), generator=generator)
    return total / 2
