"""Layer kinds: the only code in lorakit that knows layer types.

Every adaptable layer computes ``y = op(x, W) + b`` for some weight ``W``. A kind maps that weight to a 2-D
``(out, in)`` view and back, and applies a weight (or a low-rank factor of one) the way the layer does, so
variants only ever see ``(out, in)`` matrices:

- ``nn.Linear``: weight ``(out, in)``; the view is the weight itself.
- transformers' GPT-2 ``Conv1D``: weight stored ``(in, out)``; the view is its transpose.
- ``nn.Conv1d/2d/3d``: weight ``(out, in/groups, *k)``; the view flattens the kernel:
  ``(out, in/groups * k)``. A grouped convolution (``groups > 1``) is a kind of its own
  (``conv2d_grouped``): its weight change applies whole (:meth:`LayerKind.op`) but not as two factors, since
  each output channel sees only its group's inputs; only variants that form the whole change adapt it.
- ``nn.Embedding``: weight ``(num, dim)`` computes ``y = W[x] = W^T onehot(x)``: the view is
  ``(dim, num)``.

``down(x, A)`` applies an ``(r, in)`` factor as a layer of the same kind with ``r`` outputs (same stride,
padding, padding_idx); ``up(z, B)`` applies an ``(out, r)`` factor as a 1x1 map on the channel dimension.
Then ``op(x, B @ A) == up(down(x, A), B)`` and a variant never needs to form ``B @ A``.

Each kind is one object of a small class that carries its own behaviour; code elsewhere asks a kind what
it is (``takes_ids``, ``is_matrix``, ``fan_in_fan_out``, ``kernel_shape``) instead of comparing names.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from lorakit.core.quantized import QuantizedBase


class LayerKind:
    """How one layer type maps its weight to ``(out, in)`` and applies it (the ``nn.Linear`` behaviour)."""

    name = "linear"
    features_last = True  # ``x`` is a float tensor with features on its last dim (matrix fast paths apply)
    takes_ids = False  # ``x`` holds integer ids (no dropout on them; LoRA swaps its init)
    is_matrix = True  # a dense matrix layer: what ``targets="all-linear"`` selects
    fan_in_fan_out = False  # the weight is stored ``(in, out)`` (PEFT's name for GPT-2's Conv1D)

    def matches(self, layer: nn.Module) -> bool:
        return isinstance(layer, nn.Linear) or _stands_in_for(layer, self)

    def refusal(self, layer: nn.Module) -> str | None:
        """Why a layer this kind matches cannot be adapted after all (None: it can)."""
        return None

    def runs_as_op(self, layer: nn.Module) -> bool:
        """Whether the layer's own forward is exactly ``op(x, weight_2d(), bias)`` (not a subclass with a
        forward of its own, such as a quantised layer), so an adapter may compute it in its place."""
        return _runs_forward_of(layer, nn.Linear)

    def probe_input(self, layer: nn.Module) -> Tensor:
        """A small input the layer takes (two rows of features), for :func:`_own_forward_refusal`."""
        gen = torch.Generator(device=layer.weight.device).manual_seed(0)
        w = layer.weight
        return torch.randn(2, self.shape_2d(layer)[1], generator=gen, device=w.device).to(w.dtype)

    # --- weight views ------------------------------------------------------------------------------
    def weight_2d(self, layer: nn.Module, weight: Tensor | None = None) -> Tensor:
        """The layer's weight (or ``weight`` in the layer's layout) as ``(out, in)``."""
        return _base_weight(layer) if weight is None else weight

    def from_2d(self, layer: nn.Module, w2d: Tensor) -> Tensor:
        """Inverse of :meth:`weight_2d`: an ``(out, in)`` matrix in the layer's own layout."""
        return w2d

    def shape_2d(self, layer: nn.Module) -> tuple[int, int]:
        """``(out, in)`` of the 2-D view, without touching (possibly quantised) weight data."""
        return int(layer.out_features), int(layer.in_features)

    def kernel_shape(self, layer: nn.Module) -> tuple[int, ...]:
        """A convolution's kernel shape; ``()`` for matrix layers and embeddings."""
        return ()

    # --- application -------------------------------------------------------------------------------
    def op(self, layer: nn.Module, x: Tensor, w2d: Tensor, bias: Tensor | None = None) -> Tensor:
        """Apply an ``(out, in)`` weight to ``x`` exactly as ``layer`` applies its own weight."""
        return F.linear(x, w2d, bias)

    def down(self, layer: nn.Module, x: Tensor, a: Tensor) -> Tensor:
        """Apply an ``(r, in)`` factor as this kind of layer with ``r`` outputs."""
        return F.linear(x, a)

    def up(self, z: Tensor, b: Tensor) -> Tensor:
        """Apply an ``(out, r)`` factor on the channel dimension (last dim, or dim 1 for convs)."""
        return F.linear(z, b)

    def channel_view(self, v: Tensor) -> Tensor:
        """Reshape a per-output vector ``(out,)`` so it broadcasts against this kind's output."""
        return v

    def __repr__(self) -> str:
        return f"LayerKind({self.name})"


class TransposedKind(LayerKind):
    """A layer whose weight is stored ``(in, out)``: the ``(out, in)`` view is its transpose."""

    def weight_2d(self, layer: nn.Module, weight: Tensor | None = None) -> Tensor:
        return (_base_weight(layer) if weight is None else weight).t()

    def from_2d(self, layer: nn.Module, w2d: Tensor) -> Tensor:
        return w2d.t()

    def shape_2d(self, layer: nn.Module) -> tuple[int, int]:
        if isinstance(layer, QuantizedBase):  # a 4-bit layer has no .weight; it states its shape
            return int(layer.out_features), int(layer.in_features)
        return int(layer.weight.shape[1]), int(layer.weight.shape[0])


class GPT2Conv1DKind(TransposedKind):
    """transformers' ``Conv1D`` (GPT-2 and relatives): a linear layer whose weight is stored ``(in, out)``."""

    name = "conv1d_gpt2"
    fan_in_fan_out = True

    def matches(self, layer: nn.Module) -> bool:
        # Matched by structure so transformers stays optional here; a 4-bit layer standing in for a Conv1D
        # names this kind in ``lorakit_kind``.
        if _stands_in_for(layer, self):
            return True
        return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and layer.weight.dim() == 2

    def runs_as_op(self, layer: nn.Module) -> bool:
        # transformers' own class: ``addmm(bias, x, weight)``, the op of the transposed view.
        own = type(layer).__name__ == "Conv1D" and type(layer).__module__ == "transformers.pytorch_utils"
        return own and "forward" not in vars(layer)


class ConvKind(LayerKind):
    """``nn.Conv1d/2d/3d``: the view flattens the kernel; factors apply as convolutions on channels."""

    features_last = False
    is_matrix = False

    grouped = False  # whether it matches convolutions with groups > 1 (and only those)

    def __init__(self, dims: int, module: type[nn.Module]) -> None:
        self.dims = dims
        self.module = module
        self.name = f"conv{dims}d" + ("_grouped" if self.grouped else "")

    def matches(self, layer: nn.Module) -> bool:
        return isinstance(layer, self.module) and (layer.groups > 1) == self.grouped

    def runs_as_op(self, layer: nn.Module) -> bool:
        return _runs_forward_of(layer, self.module)

    def probe_input(self, layer: nn.Module) -> Tensor:
        # One example, each spatial size covering the dilated kernel twice over.
        w = layer.weight
        sizes = [2 * (k - 1) * d + 2 for k, d in zip(w.shape[2:], layer.dilation, strict=True)]
        gen = torch.Generator(device=w.device).manual_seed(0)
        return torch.randn(1, layer.in_channels, *sizes, generator=gen, device=w.device).to(w.dtype)

    def weight_2d(self, layer: nn.Module, weight: Tensor | None = None) -> Tensor:
        w = _base_weight(layer) if weight is None else weight
        return w.reshape(w.shape[0], -1)

    def from_2d(self, layer: nn.Module, w2d: Tensor) -> Tensor:
        return w2d.reshape(w2d.shape[0], *layer.weight.shape[1:])

    def shape_2d(self, layer: nn.Module) -> tuple[int, int]:
        w = layer.weight
        return int(w.shape[0]), int(w[0].numel())

    def kernel_shape(self, layer: nn.Module) -> tuple[int, ...]:
        return tuple(layer.weight.shape[2:])

    def op(self, layer: nn.Module, x: Tensor, w2d: Tensor, bias: Tensor | None = None) -> Tensor:
        return _conv(layer, x, self.from_2d(layer, w2d), bias, groups=layer.groups)

    def down(self, layer: nn.Module, x: Tensor, a: Tensor) -> Tensor:
        if layer.groups != 1:
            raise ValueError(f"low-rank factors need groups=1 convolutions, got groups={layer.groups}")
        return _conv(layer, x, a.reshape(a.shape[0], *layer.weight.shape[1:]), None, groups=1)

    def up(self, z: Tensor, b: Tensor) -> Tensor:
        if z.dim() == self.dims + 1:  # one unbatched example (channels, *size), which nn.ConvNd accepts
            return torch.einsum("or,r...->o...", b, z)
        return torch.einsum("or,nr...->no...", b, z)

    def channel_view(self, v: Tensor) -> Tensor:
        return v.reshape(-1, *([1] * self.dims))


class GroupedConvKind(ConvKind):
    """A convolution with ``groups > 1``: the ``(out, in/groups * k)`` view and :meth:`op` work as for any
    convolution, but :meth:`down` cannot (an output channel reads only its group's inputs, which one factor
    ``A`` applied to all inputs cannot express), so only variants that form the whole change adapt it."""

    grouped = True


class EmbeddingKind(TransposedKind):
    """``nn.Embedding``: ``y = W[x] = W^T onehot(x)``, so the view is ``(dim, num)`` and ``x`` holds ids."""

    name = "embedding"
    features_last = False
    takes_ids = True
    is_matrix = False

    def matches(self, layer: nn.Module) -> bool:
        return isinstance(layer, nn.Embedding)

    def runs_as_op(self, layer: nn.Module) -> bool:
        return _runs_forward_of(layer, nn.Embedding)

    def probe_input(self, layer: nn.Module) -> Tensor:
        return torch.tensor([[0, layer.num_embeddings - 1]], device=layer.weight.device)  # two ids

    def refusal(self, layer: nn.Module) -> str | None:
        if layer.max_norm is not None:
            # The lookup rescales looked-up rows of the table it is given, in place: the base table changes
            # at every forward, and the adapter's change would be rescaled on its own, not with the row.
            return (
                f"an nn.Embedding with max_norm={layer.max_norm} rescales its rows in place at every lookup, "
                "so an added weight change can neither be applied nor merged exactly; set max_norm=None"
            )
        return None

    def op(self, layer: nn.Module, x: Tensor, w2d: Tensor, bias: Tensor | None = None) -> Tensor:
        y = _embed(layer, x, w2d.t())
        return y if bias is None else y + bias

    def down(self, layer: nn.Module, x: Tensor, a: Tensor) -> Tensor:
        return _embed(layer, x, a.t())


class KindSet:
    """The layer kinds a variant (or a PEFT method) supports; membership by kind object or by name."""

    def __init__(self, kinds: Iterable[LayerKind]) -> None:
        self.kinds = tuple(dict.fromkeys(kinds))

    def __contains__(self, item: object) -> bool:
        return any(item is k or item == k.name for k in self.kinds)

    def __iter__(self) -> Iterator[LayerKind]:
        return iter(self.kinds)

    def __len__(self) -> int:
        return len(self.kinds)

    def __sub__(self, other: Iterable[LayerKind]) -> KindSet:
        drop = KindSet(other)
        return KindSet(k for k in self.kinds if k not in drop)

    def names(self) -> list[str]:
        return sorted(k.name for k in self.kinds)

    def __repr__(self) -> str:
        return f"KindSet({self.names()})"


def _base_weight(layer: nn.Module) -> Tensor:
    # Quantised layers expose a dequantised view (in the layout of the layer they replace); plain layers
    # their weight.
    if isinstance(layer, QuantizedBase):
        return layer.dequantized_weight()
    hook = weight_norm_hook(layer)
    # The older weight-norm hook sets ``weight`` before each forward: computed now, as the hook will, since
    # the tensor the last forward left may hold that forward's graph (or one from before the base froze).
    return layer.weight if hook is None else hook.compute_weight(layer)


def weight_norm_hook(layer: nn.Module) -> WeightNorm | None:
    """The older ``torch.nn.utils.weight_norm`` hook computing ``layer.weight`` (``g v / ||v||``), if any."""
    return next(
        (h for h in layer._forward_pre_hooks.values() if isinstance(h, WeightNorm) and h.name == "weight"),
        None,
    )


def _hook_computed_refusal(layer: nn.Module) -> str | None:
    """Why a weight that a forward hook recomputes as a plain tensor cannot be adapted (the older
    ``torch.nn.utils.spectral_norm``): until the hook runs, ``weight`` is not the weight the layer computes
    with, and a merge written into it is overwritten at the next forward. The older weight-norm hook is
    read and written through its magnitude and direction; a parametrization through its own protocol."""
    if (
        isinstance(layer, QuantizedBase)
        or parametrize.is_parametrized(layer, "weight")
        or "weight" in layer._parameters
        or "weight" in layer._buffers
        or weight_norm_hook(layer) is not None
    ):
        return None
    hooks = ", ".join(type(h).__name__ for h in layer._forward_pre_hooks.values()) or "none"
    return (
        f"its weight is a plain tensor that a forward hook recomputes (hooks: {hooks}), which an adapter "
        "can neither read nor merge into; use the parametrization form "
        "(torch.nn.utils.parametrizations.spectral_norm) or remove the hook"
    )


def _runs_forward_of(layer: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether calling ``layer`` runs ``cls.forward``: neither its class nor the instance (as accelerate's
    hooks do, replacing ``forward`` on the module) has another."""
    return type(layer).forward is cls.forward and "forward" not in vars(layer)


def _output_hooks(layer: nn.Module) -> list[Any]:
    """The layer's own forward hooks and pre-hooks, but for the older weight-norm hook (which computes the
    weight the layer is read and merged through): any of them may change what the layer returns."""
    pre = [h for h in layer._forward_pre_hooks.values() if h is not weight_norm_hook(layer)]
    return [*pre, *layer._forward_hooks.values()]


def _stands_in_for(layer: nn.Module, kind: LayerKind) -> bool:
    """Whether ``layer`` is a quantised layer standing in for a layer of ``kind``."""
    return isinstance(layer, QuantizedBase) and layer.lorakit_kind == kind.name


def _embed(layer: nn.Module, x: Tensor, table: Tensor) -> Tensor:
    # Dense gradients whatever the layer's ``sparse``: the tables here are transposed views of an adapter's
    # factors (or of a weight formed from them), through which a sparse gradient cannot flow; the frozen
    # base table itself, looked up by the base layer, keeps its setting.
    return F.embedding(x, table, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq)


def _conv(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    if layer.padding_mode != "zeros":
        # Non-zero padding modes pad explicitly and convolve with no padding, as nn.ConvNd does.
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding: tuple[int, ...] | str = 0
    else:
        padding = layer.padding
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    return conv(x, weight, bias, layer.stride, padding, layer.dilation, groups)


LINEAR = LayerKind()
CONV1D_GPT2 = GPT2Conv1DKind()
EMBEDDING = EmbeddingKind()
# Matched in this order. A layer that stands in for another (a 4-bit NF4 layer) names the kind it replaces in
# ``lorakit_kind``.
KINDS: dict[str, LayerKind] = {
    k.name: k
    for k in (
        LINEAR,
        CONV1D_GPT2,
        ConvKind(1, nn.Conv1d),
        ConvKind(2, nn.Conv2d),
        ConvKind(3, nn.Conv3d),
        GroupedConvKind(1, nn.Conv1d),
        GroupedConvKind(2, nn.Conv2d),
        GroupedConvKind(3, nn.Conv3d),
        EMBEDDING,
    )
}

ALL_KINDS = KindSet(KINDS.values())
MATRIX_KINDS = KindSet(k for k in KINDS.values() if k.is_matrix)
# The kinds whose weight change also applies as two factors, ``up(down(x, A), B)``: what the low-rank path
# of the LoRA family needs, and the kinds a variant adapts unless it says otherwise.
FACTOR_KINDS = KindSet(k for k in KINDS.values() if not isinstance(k, GroupedConvKind))


def matched_kind(layer: nn.Module) -> LayerKind | None:
    """The kind whose layers ``layer`` is one of, whether or not it can be adapted (None: no kind's)."""
    return next((kind for kind in KINDS.values() if kind.matches(layer)), None)


def kind_of(layer: nn.Module) -> LayerKind | None:
    """The kind of ``layer``, or None when lorakit cannot adapt it (see :func:`why_not_adaptable`)."""
    kind = matched_kind(layer)
    return None if kind is None or _refusal(kind, layer) is not None else kind


def _refusal(kind: LayerKind, layer: nn.Module) -> str | None:
    """Why a layer of ``kind`` cannot be adapted: no weights yet, an empty weight, a forward of its own that
    is not its kind's op, or its kind's reason."""
    if any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in layer.parameters()):
        return (
            f"{type(layer).__name__} has no weights yet (a lazy module): run one forward pass to initialise "
            "it, then apply"
        )
    out_features, in_features = kind.shape_2d(layer)
    if out_features == 0 or in_features == 0:
        return f"its weight is empty ({out_features} x {in_features}): there is nothing to adapt"
    return kind.refusal(layer) or _hook_computed_refusal(layer) or _own_forward_refusal(kind, layer)


# What the probe found per layer, with the weight's storage and version it ran on.
_Probed = tuple[tuple[Any, ...], str | None]
_PROBED: weakref.WeakKeyDictionary[nn.Module, _Probed] = weakref.WeakKeyDictionary()


def _own_forward_refusal(kind: LayerKind, layer: nn.Module) -> str | None:
    """Why a subclass with a forward of its own cannot be adapted: an adapter adds ``op(x, dW)`` to the
    layer's output and a merge writes ``W + dW``, both right only if the output moves by ``op(x, dW)`` when
    the weight moves by ``dW``. Many subclasses compute their kind's op, or add to it something the weight
    does not change (Falcon's linear layers, a shift); others do not: Gemma's word embeddings scale the rows
    they look up, learned positional embeddings look up positions, routers return scores. So the layer is
    run on a small probe input with its weight and with a moved one, and the move compared with
    ``op(x, dW)``; a quantised layer standing in for a kind computes the op by construction. Forward hooks on
    the layer run in its call too (a hook that scales the output breaks the same rule), so a hooked layer is
    probed as well."""
    hooks = _output_hooks(layer)
    if isinstance(layer, QuantizedBase) or (kind.runs_as_op(layer) and not hooks):
        return None
    weight = layer.weight
    if weight.device.type == "meta":
        return None  # nothing to run, nothing to remember: a meta model is refused where it is applied
    # weights loaded or moved since, or other hooks or forward: probed again
    key = (weight.data_ptr(), weight._version, tuple(map(id, hooks)), id(vars(layer).get("forward")))
    known = _PROBED.get(layer)
    if known is None or known[0] != key:
        _PROBED[layer] = known = (key, _probe(kind, layer, hooks))
    return known[1]


def _probe(kind: LayerKind, layer: nn.Module, hooks: list[Any]) -> str | None:
    if kind.runs_as_op(layer):
        names = ", ".join(getattr(h, "__name__", type(h).__name__) for h in hooks)
        own = f"{type(layer).__name__} has forward hooks ({names}) that make it no plain {kind.name}"
    else:
        own = f"{type(layer).__name__} has a forward of its own that is not a plain {kind.name} of its weight"
    fix = "an adapter's change would not follow it"
    weight = layer.weight
    gen = torch.Generator(device=weight.device).manual_seed(1)
    with torch.no_grad():
        x = kind.probe_input(layer)
        move = torch.randn(weight.shape, generator=gen, device=weight.device).to(weight.dtype)
        move = move * weight.float().square().mean().sqrt().clamp_min(1e-3).to(weight.dtype)
        try:  # the layer's own call, with the weight it has and with the moved one
            y = torch.func.functional_call(layer, {"weight": weight}, (x,), strict=False)
            moved = torch.func.functional_call(layer, {"weight": weight + move}, (x,), strict=False)
        except Exception as err:  # noqa: BLE001 - any failure means the layer is not called as its kind
            return f"{own}: it does not take the input of a {kind.name} layer ({type(err).__name__}); {fix}"
        if not isinstance(y, Tensor) or not isinstance(moved, Tensor):
            return f"{own}: it returns {type(y).__name__}, not a tensor; {fix}"
        expected = kind.op(layer, x, kind.weight_2d(layer, move))
        if y.shape != expected.shape:
            return f"{own}: its output is shaped {tuple(y.shape)}, not {tuple(expected.shape)}; {fix}"
        change = moved.float() - y.float()
        scale = max(float(expected.abs().max()), float(y.abs().max())) + torch.finfo(torch.float32).tiny
        # rounding of the same sums in another order: grows with the width; never past 5% of the output
        tolerance = min(64 * torch.finfo(weight.dtype).eps * kind.shape_2d(layer)[1] ** 0.5, 5e-2)
        if not float((change - expected.float()).abs().max()) <= tolerance * scale:
            return (
                f"{own}: its output does not move with its weight as the op's does (it scales it, say); {fix}"
            )
    return None


def why_not_adaptable(layer: nn.Module) -> str:
    """Why :func:`kind_of` gives None for ``layer``: the reason its kind refuses it, or that no kind is it."""
    kind = matched_kind(layer)
    if kind is not None:
        return _refusal(kind, layer) or f"{kind.name} layers can be adapted"
    return (
        f"{type(layer).__name__} is not a layer kind lorakit adapts (nn.Linear, GPT-2's Conv1D, "
        "nn.Conv1d/2d/3d, nn.Embedding)"
    )
