"""The kernel registry: every fast path lorakit has, each with the cases it covers.

A kernel computes one thing: a computation form of :mod:`lorakit.core.forms` (the whole output of an
adapted layer whose variant declares that form), or a named computation of another kind (``"keep_mask"``:
dropout's mask; a model-level loss may register under its own name). It covers the devices, compute dtypes,
layer kinds and dropout rates it lists, and any further condition in ``when``. The policy
(:mod:`lorakit.kernels.policy`) takes the first registered kernel that covers a case; the tests compare
every registered kernel with the plain form on every case it claims (``tests/test_kernels.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.core.kinds import KindSet

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DEVICES = ("cpu", "cuda")


def any_rate(p: float) -> bool:
    """Every dropout rate, none included."""
    return True


@dataclass(frozen=True)
class Kernel:
    """One fast path and the cases it covers.

    ``run``: for a form, ``run(layer, x, form) -> output`` (the adapted layer's whole output, base output
    included); for a named computation, that computation's own signature. ``dtypes``: the compute dtype
    (autocast's where it is on, else the input's). ``kinds``: the layer kinds (forms only). ``dropout``: the
    rates it covers. ``when``: any further condition, given the same case as ``run`` (None: none).
    """

    name: str
    computes: type | str
    run: Callable[..., Any]
    devices: tuple[str, ...] = DEVICES
    dtypes: tuple[torch.dtype, ...] = FLOATS
    kinds: KindSet | None = None
    dropout: Callable[[float], bool] = any_rate
    when: Callable[..., bool] | None = None


KERNELS: dict[str, Kernel] = {}


def register(kernel: Kernel) -> Kernel:
    """Add ``kernel`` after those registered before it (an earlier one covering a case is taken first)."""
    if kernel.name in KERNELS:
        raise ValueError(f"a kernel named '{kernel.name}' is registered already")
    KERNELS[kernel.name] = kernel
    return kernel


def kernels_for(computes: type | str) -> list[Kernel]:
    """The kernels registered for ``computes``, in the order they are tried."""
    return [k for k in KERNELS.values() if k.computes == computes]
