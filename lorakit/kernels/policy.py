"""The one policy that picks a kernel, and the switch that turns every kernel off.

Kernels are on unless ``LORAKIT_KERNELS=off`` (or ``0``, ``false``, ``no``) is in the environment when lorakit
is imported, or :func:`enable` ``(False)`` was called; :func:`plain` switches them off for a ``with`` block.
Off, every variant runs its plain PyTorch form and dropout draws its plain mask. :func:`enabled` is what any
kernel asks, a variant's or a model-level one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.common.errors import SettingError
from lorakit.core.forms import Form
from lorakit.kernels.registry import Kernel, kernels_for

ENV = "LORAKIT_KERNELS"
_ON, _OFF = ("", "on", "1", "true", "yes"), ("off", "0", "false", "no")


def from_environment() -> bool:
    """What ``LORAKIT_KERNELS`` says (unset: on); any other value is refused, naming the choices."""
    value = os.environ.get(ENV, "").strip().lower()
    if value not in _ON + _OFF:
        raise SettingError(f"{ENV}={os.environ[ENV]!r} is not a switch; set it to 'on' or 'off'")
    return value in _ON


_enabled = from_environment()


def enabled() -> bool:
    """Whether fast paths may run (asked by the policy and by any kernel that chooses its own path)."""
    return _enabled


def enable(on: bool = True) -> None:
    """Switch every kernel on or off for this process (off: every variant runs its plain form)."""
    global _enabled
    _enabled = bool(on)


@contextlib.contextmanager
def plain() -> Iterator[None]:
    """``with lorakit.kernels.plain():`` runs the plain forms inside the block, then restores the switch."""
    before = enabled()
    enable(False)
    try:
        yield
    finally:
        enable(before)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the products run in: autocast's where it is on, else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def choose(
    computes: type | str, x: Tensor, *case: Any, p: float = 0.0, layer: nn.Module | None = None
) -> Kernel | None:
    """The first registered kernel for ``computes`` that covers ``x``'s device and compute dtype, the
    dropout rate ``p``, the ``layer``'s kind (for a form) and its own condition on ``case`` (``when(*case)``);
    None when the kernels are off or none covers it. Any kernel, a model-level one too, is chosen here."""
    if not enabled():
        return None
    device, dtype = x.device.type, compute_dtype(x)
    for kernel in kernels_for(computes):
        if (
            device in kernel.devices
            and dtype in kernel.dtypes
            and kernel.dropout(p)
            and (kernel.kinds is None or (layer is not None and layer.kind in kernel.kinds))
            and (kernel.when is None or kernel.when(*case))
        ):
            return kernel
    return None


class Policy:
    """What core's slot asks (:class:`lorakit.core.seam.FastPaths`), answered from the registry."""

    def active(self) -> bool:
        return enabled()

    def forward(self, layer: nn.Module, x: Tensor, form: Form) -> Tensor | None:
        kernel = choose(type(form), x, layer, x, form, p=form.p, layer=layer)
        return None if kernel is None else kernel.run(layer, x, form)

    def keep_mask(self, x: Tensor, p: float, seed: int) -> Tensor | None:
        kernel = mask_kernel(x, p)
        return None if kernel is None else kernel.run(x, p, seed)

    def linear_cross_entropy(
        self, h: Tensor, weight: Tensor, bias: Tensor | None, t: Tensor
    ) -> Tensor | None:
        kernel = choose("linear_cross_entropy", h, h, weight, bias, t)
        return None if kernel is None else kernel.run(h, weight, bias, t)


def mask_kernel(x: Tensor, p: float) -> Kernel | None:
    """The kernel that draws dropout's keep-mask for ``x`` at rate ``p`` (None: the plain draw)."""
    return choose("keep_mask", x, x, p, p=p)


POLICY = Policy()
