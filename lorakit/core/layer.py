"""The one wrapper around a base layer, shared by every variant and every layer kind.

It freezes the base layer, gives the variant a read-only view of it (kind, shapes, ``weight_2d()``
dequantised when the base is stored quantised, ``bias``), and implements enable/disable, merge and unmerge
once. Merging is always explicit: ``.eval()`` never changes weights.

The forward asks the variant for its computation form (:meth:`Variant.form`) and the kernels' policy, through
the slot in :mod:`lorakit.core.seam`, whether a kernel computes it; otherwise, and wherever hooks watch the
variant (a kernel would skip its call), the variant's plain forward runs.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lorakit.common.errors import AdapterStateError
from lorakit.core.config import VariantConfig
from lorakit.core.contract import Shared
from lorakit.core.kinds import LayerKind, weight_norm_hook
from lorakit.core.quantized import QuantizedBase
from lorakit.core.seam import fast_forward, fast_paths_active
from lorakit.core.variant import Variant, precise_dtype


class AdaptedLayer(nn.Module):
    """A frozen base layer plus one variant's adapter."""

    def __init__(
        self,
        base_layer: nn.Module,
        kind: LayerKind,
        variant_class: type[Variant],
        config: VariantConfig,
        shared: Shared | None = None,
        name: str = "",
    ) -> None:
        """``name`` is the module name in the model (what a variant's shared state is keyed by); ``shared``
        is the ``apply`` call's shared state (None: a layer on its own)."""
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.name = name
        self.out_features, self.in_features = kind.shape_2d(base_layer)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        if not isinstance(shared, variant_class.shared_class):
            shared = variant_class.shared_class(targets={name: (self.out_features, self.in_features)})
        self.variant = variant_class(config, self, shared)
        storage = getattr(torch, config.adapter_dtype)
        base_dtypes = {p.dtype for p in base_layer.parameters() if p.is_floating_point()}
        if storage == torch.float32 and torch.float64 in base_dtypes:
            storage = torch.float64  # an fp64 model computes, and merges, its adapter in fp64 too
        if storage != torch.float32:  # its floating tensors (shared ones once: the same Parameter)
            self.variant.to(storage)
        self.merged = False
        self.enabled = True
        self.train(base_layer.training)  # a model put in eval mode before apply stays in eval mode

    def __getattr__(self, name: str) -> Any:
        """A public attribute of the base layer that the model reads from the layer in its place (Whisper's
        encoder reads ``conv1.stride``), as the layer it stands in for. Private names are not looked up
        there: frameworks mark modules with those (hooks, flags) and must see the wrapper's own."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("_"):
                raise
        try:
            return getattr(base, name)
        except AttributeError:
            raise AttributeError(
                f"'{type(self).__name__}' object (over {type(base).__name__}) has no attribute '{name}'"
            ) from None

    # --- read-only view for variants ----------------------------------------------------------------
    def weight_2d(self) -> Tensor:
        """The base weight as ``(out, in)`` (dequantised if stored quantised)."""
        return self.kind.weight_2d(self.base_layer)

    @property
    def weight(self) -> Tensor | None:
        """The base layer's weight, for code that reads a layer's ``weight`` rather than calling it for its
        dtype or device (transformers' T5 casts its input to ``wo.weight.dtype``), as PEFT's adapter layers
        expose it; None for a 4-bit base, which holds codes rather than a weight (as a layer without one)."""
        layer = self.base_layer
        return None if isinstance(layer, QuantizedBase) else layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def has_frozen_dense_weight(self) -> bool:
        """Whether :meth:`weight_2d` is a view of a frozen float weight parameter and the bias (if any) is
        frozen. An adapter function may then keep the weight for backward at no memory cost (not a dequantised
        copy of 4-bit codes) and form the base layer's input gradient itself (nothing of the base trains)."""
        weight, bias = self.stored_weight(), self.bias
        return (
            not self.weight_is_dequantised()
            and isinstance(weight, nn.Parameter)
            and weight.is_floating_point()
            and not weight.requires_grad
            and (bias is None or not bias.requires_grad)
        )

    def base_output_formable(self, x: Tensor) -> bool:
        """Whether an adapter may form the base output ``op(x, W0) + b0`` for the input ``x`` itself, inside
        its own autograd function, instead of calling the base layer: the layer computes exactly its kind's
        op (:meth:`LayerKind.runs_as_op`), no hook watches it (the hook would be skipped), its weight is a
        frozen float parameter (:meth:`has_frozen_dense_weight`) in ``x``'s dtype, and no autocast is on
        (which would choose the product's dtype)."""
        layer = self.base_layer
        return (
            self.kind.runs_as_op(layer)
            and not _hooked(layer)
            and self.has_frozen_dense_weight()
            and x.dtype == layer.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def weight_is_dequantised(self) -> bool:
        """Whether :meth:`weight_2d` dequantises stored codes into a new full-precision tensor (a 4-bit base):
        an adapter keeping that tensor for backward would keep the full-precision weight the 4-bit storage
        exists to avoid."""
        return isinstance(self.base_layer, QuantizedBase)

    def stored_weight(self) -> Tensor:
        """The tensor the base weight is stored in: the weight itself, or a quantised layer's codes (what a
        cache derived from the weight is keyed on)."""
        layer = self.base_layer
        return layer.stored_weight() if isinstance(layer, QuantizedBase) else layer.weight

    @property
    def device(self) -> torch.device:
        """Where the base weight lives (adapter parameters are created there, in fp32)."""
        first = next(itertools.chain(self.base_layer.parameters(), self.base_layer.buffers()))
        return first.device

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x)
        if fast_paths_active() and not _hooked(self.variant):  # a kernel would skip a hooked variant's call
            form = self.variant.form(self)
            out = None if form is None else fast_forward(self, x, form)
            if out is not None:
                return out
        y = self.base_layer(x) if self.variant.needs_base_output(x, self) else None
        return self.variant(x, y, self)

    def factored(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``B A`` applied to ``x`` as this layer applies its weight, without forming ``B A``:
        ``up(down(x, A), B)`` for ``A (r, in)`` and ``B (out, r)``, in ``x``'s dtype (for ids: the
        factors' :func:`~lorakit.core.variant.precise` dtype, fp32 for a bf16-stored adapter)."""
        dtype = x.dtype if x.is_floating_point() else precise_dtype(a.dtype)
        return self.kind.up(self.kind.down(self.base_layer, x, a.to(dtype)), b.to(dtype))

    def weight_folds_exactly(self, x: Tensor) -> bool:
        """Whether ``op(x, W0 + dW)`` may stand in for ``op(x, W0) + op(x, dW)`` in this forward.

        Only for a layer that computes exactly its kind's op with no hook watching it (the base layer is not
        called, so neither would run), and a dense base weight in fp32 or fp64 with ``x`` in the same dtype
        and no autocast: a bf16 or fp16 ``W0 + dW`` rounds a small ``dW`` away (its spacing near
        ``|W0| = 0.05`` is ``2e-4``), and a quantised base would be dequantised for it. Not under torch.func
        transforms (per-example gradients), where the adapter keeps the path its gradients are checked on.
        """
        layer, weight = self.base_layer, self.stored_weight()  # a 4-bit layer's codes are no float weight
        return (
            self.kind.runs_as_op(layer)
            and not _hooked(layer)
            and weight.dtype in (torch.float32, torch.float64)
            and x.dtype == weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
            and not torch._C._are_functorch_transforms_active()
        )

    # --- merge / unmerge -----------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the adapter into the base weight in place (a quantised base is dequantised first)."""
        if self.merged:
            return
        if isinstance(self.base_layer, QuantizedBase):
            # Re-quantising would lose the adapter's detail: merging into a 4-bit base gives a dense layer.
            # The 4-bit layer is kept aside (a fraction of the dense one's bytes) for unmerge to put back as
            # it was; it is no submodule, so it is neither saved nor trained while merged.
            object.__setattr__(self, "_quantised_base", self.base_layer)
            self.base_layer = self.base_layer.to_dense()
            self.base_layer.requires_grad_(False)
        try:
            with torch.no_grad():
                w0 = self.weight_2d()
                merged = self.variant.merged_weight(w0.to(precise_dtype(w0.dtype)), self).to(w0.dtype)
                _write_weight(self.base_layer, self.kind.from_2d(self.base_layer, merged), self.name)
        except BaseException:  # out of memory, say: the 4-bit layer goes back, nothing merged
            quantised = self.__dict__.pop("_quantised_base", None)
            if quantised is not None:
                self.base_layer = quantised
            raise
        self.merged = True

    def unmerge(self) -> None:
        """Take the adapter's change back out of the merged weight: the base weight again, up to the rounding
        of the weight's own dtype (exact in fp32/fp64 up to the last bits; a bf16 weight may move by its
        spacing at each merge and unmerge). A 4-bit base comes back as the very layer merge replaced."""
        if not self.merged:
            return
        quantised = self.__dict__.pop("_quantised_base", None)
        if quantised is not None:  # the 4-bit layer merge replaced, unchanged, on the dense layer's device
            self.base_layer = quantised.to(self.base_layer.weight.device)
            self.merged = False
            return
        with torch.no_grad():
            w = self.weight_2d()
            restored = self.variant.unmerged_weight(w.to(precise_dtype(w.dtype)), self).to(w.dtype)
            _write_weight(self.base_layer, self.kind.from_2d(self.base_layer, restored), self.name)
        self.merged = False

    def extra_repr(self) -> str:
        return f"kind={self.kind.name}, in={self.in_features}, out={self.out_features}, merged={self.merged}"


def _write_weight(layer: nn.Module, value: Tensor, name: str) -> None:
    """Make ``value`` (in the layer's layout) the base layer's weight. A weight the layer computes from other
    tensors is written through them, since a copy into the computed tensor is lost at the next forward:
    a parametrization (``torch.nn.utils.parametrizations.weight_norm``, as wav2vec2's positional
    convolution) through its ``right_inverse``, the older ``weight_norm`` hook by setting its magnitude and
    direction. A parametrization that cannot give back ``value`` (no ``right_inverse``, or one that is not
    exact, such as spectral norm) is refused, the layer left as it was."""
    if parametrize.is_parametrized(layer, "weight"):
        originals = layer.parametrizations.weight
        before = [t.detach().clone() for t in originals.parameters()]
        try:
            layer.weight = value  # the parametrization's right_inverse sets what the weight is computed from
            written = layer.weight
            error = float((written - value).abs().max())
            exact = error <= 16 * torch.finfo(value.dtype).eps * max(float(value.abs().max()), 1e-30)
        except (RuntimeError, NotImplementedError, ValueError):
            exact = False
        if not exact:
            for t, old in zip(originals.parameters(), before, strict=True):
                t.copy_(old)
            kinds = ", ".join(type(m).__name__ for m in originals)
            raise AdapterStateError(
                f"cannot merge into {name}: its weight is computed by a parametrization ({kinds}) that "
                "cannot be set to the merged weight exactly; keep the adapter unmerged, or remove the "
                "parametrization first (torch.nn.utils.parametrize.remove_parametrizations)"
            )
        return
    hook = weight_norm_hook(layer)
    if hook is not None:  # g v / ||v||: v = value, g = ||value||
        layer.weight_g.copy_(torch.norm_except_dim(value, 2, hook.dim))
        layer.weight_v.copy_(value)
        layer.weight = hook.compute_weight(layer)
        return
    layer.weight.copy_(value)


def _hooked(module: nn.Module) -> bool:
    """Whether hooks run around ``module``'s forward or backward: its own, or global ones (as
    ``nn.Module.__call__`` checks them)."""
    glob = torch.nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or glob._global_forward_hooks
        or glob._global_forward_pre_hooks
        or glob._global_backward_hooks
        or glob._global_backward_pre_hooks
    )
