"""The slot through which core reaches the fast paths without importing them.

Core is the lowest layer of lorakit, so it cannot import ``lorakit.kernels``; instead the kernels' policy
installs itself here when lorakit is imported (``lorakit/__init__.py`` imports ``lorakit.kernels``, the one
module outside the kernels that does). Three questions are asked through it: the adapted layer's, whether a
kernel computes a variant's computation form (:mod:`lorakit.core.forms`); dropout's, whether a kernel draws
the keep-mask; and the engine's, whether a kernel computes a causal LM's cross-entropy through its head.
With nothing installed, or the kernels switched off, every answer is "no": everything runs its plain form.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from lorakit.core.forms import Form


class FastPaths(Protocol):
    """What the kernels' policy answers (``lorakit.kernels.policy``)."""

    def active(self) -> bool:
        """Whether any kernel may run now (False: the kernels are switched off)."""
        ...

    def forward(self, layer: nn.Module, x: Tensor, form: Form) -> Tensor | None:
        """The adapted ``layer``'s whole output for ``x`` from a kernel registered for ``form``, or None where
        no kernel covers the case (the layer then calls the variant's plain forward)."""
        ...

    def keep_mask(self, x: Tensor, p: float, seed: int) -> Tensor | None:
        """Dropout's keep-mask for ``seed`` from a kernel, or None: the plain draw
        (:func:`lorakit.core.dropout.draw_keep_mask`)."""
        ...

    def linear_cross_entropy(
        self, h: Tensor, weight: Tensor, bias: Tensor | None, t: Tensor
    ) -> Tensor | None:
        """``sum -log softmax(h W^T + b)[t]`` over the rows of ``h`` from a kernel, or None: the plain form
        (the head's logits, then ``F.cross_entropy``)."""
        ...


_installed: FastPaths | None = None


def install(paths: FastPaths | None) -> None:
    """Put ``paths`` in the slot (None: empty it)."""
    global _installed
    _installed = paths


def fast_paths_active() -> bool:
    """Whether an installed policy may run kernels now (asked before a form is built for it)."""
    return _installed is not None and _installed.active()


def fast_forward(layer: nn.Module, x: Tensor, form: Form) -> Tensor | None:
    """:meth:`FastPaths.forward` of the installed policy; None with nothing installed."""
    return None if _installed is None else _installed.forward(layer, x, form)


def fast_keep_mask(x: Tensor, p: float, seed: int) -> Tensor | None:
    """:meth:`FastPaths.keep_mask` of the installed policy; None with nothing installed."""
    return None if _installed is None else _installed.keep_mask(x, p, seed)


def fast_linear_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, t: Tensor) -> Tensor | None:
    """:meth:`FastPaths.linear_cross_entropy` of the installed policy; None with nothing installed."""
    return None if _installed is None else _installed.linear_cross_entropy(h, weight, bias, t)
