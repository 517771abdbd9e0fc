"""Per-example gradients of adapter parameters, through Opacus' GradSampleModule hooks.

Opacus computes per-example gradients layer by layer: a forward hook keeps each trainable module's input, a
backward hook receives the gradient of its output, and a per-layer rule turns the two into ``(N, *p.shape)``
gradients (built-in rules for ``nn.Linear``, ``nn.Embedding``...; ``torch.func`` for any other module whose
forward takes one tensor). A lorakit adapter is called as ``variant(x, y, base)``: the input, the frozen base
layer's output, and the layer view. :class:`AdapterGradSampleModule` keeps all three for every adapter and
registers one rule for every variant: ``vmap(grad(...))`` over the examples of the variant's own forward,
the per-example form of exactly what ran. Trained head modules (``nn.Linear`` etc.) keep Opacus' rules.

A variant whose forward uses an operation ``torch.func`` cannot transform (an old-style
``autograd.Function``) falls back to one backward per example: slower, equally exact. With adapter dropout
the per-example gradient draws its own mask; it is exact with dropout 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lorakit.core.layer import AdaptedLayer
from lorakit.core.variant import Variant
from lorakit.privacy import require
from lorakit.privacy.config import PrivacyError, check_clipped_dtype

_opacus_gsm = require("opacus.grad_sample.grad_sample_module")
_module_utils = require("opacus.utils.module_utils")
GradSampleModule = _opacus_gsm.GradSampleModule

# Variant classes whose forward torch.func could not transform; they use the per-example loop.
_LOOP_ONLY: set[type] = set()


class _Call(nn.Module):
    """Calls ``variant.forward`` directly, so the variant's own Opacus hooks do not fire while sampling."""

    def __init__(self, variant: Variant) -> None:
        super().__init__()
        self.variant = variant

    def forward(self, x: Tensor, y: Tensor, base: AdaptedLayer) -> Tensor:
        return self.variant.forward(x, y, base)


def variant_grad_sample(module: Variant, activations: list[Any], backprops: Tensor) -> dict[Tensor, Tensor]:
    """``{p: (N, *p.shape)}``: per-example gradients of ``sum(out_i * g_i)`` for every trainable ``p``.

    ``activations`` is ``[base, y, x]`` as kept by :meth:`AdapterGradSampleModule.capture_activations_hook`
    (``y`` None where the adapter computed the whole output, see ``Variant.needs_base_output``) and
    ``backprops`` the gradient of the adapter's output, already scaled to per-example losses.
    """
    base, y, x = activations
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    names = ["variant." + n for n, _ in named]
    params = tuple(p.detach() for _, p in named)
    call = _Call(module)
    backprops = backprops.to((x if y is None else y).dtype)

    def loss(ps: tuple[Tensor, ...], xi: Tensor, yi: Tensor | None, gi: Tensor) -> Tensor:
        out = torch.func.functional_call(call, dict(zip(names, ps, strict=True)), (xi, yi, base))
        return (out * gi).sum()

    if type(module) not in _LOOP_ONLY:
        try:
            one = lambda ps, xi, yi, gi: loss(ps, xi[None], _first(yi), gi[None])  # noqa: E731  (1, ...) inputs
            y_dim = None if y is None else 0
            grads = torch.func.vmap(
                torch.func.grad(one), in_dims=(None, 0, y_dim, 0), randomness="different"
            )(params, x, y, backprops)
            return {p: g for (_, p), g in zip(named, grads, strict=True)}
        except RuntimeError as err:
            if "functorch" not in str(err) and "autograd.Function" not in str(err):
                raise
            _LOOP_ONLY.add(type(module))
    return _loop_grad_sample(named, loss, x, y, backprops)


def _first(t: Tensor | None) -> Tensor | None:
    return None if t is None else t[None]


def _loop_grad_sample(
    named: list[tuple[str, Tensor]], loss: Any, x: Tensor, y: Tensor | None, g: Tensor
) -> dict:
    """The same per-example gradients, one autograd call per example."""
    out: dict[Tensor, list[Tensor]] = {p: [] for _, p in named}
    with torch.enable_grad():
        for i in range(x.shape[0]):
            leaves = tuple(p.detach().requires_grad_(True) for _, p in named)
            value = loss(leaves, x[i : i + 1], None if y is None else y[i : i + 1], g[i : i + 1])
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
            for (_, p), leaf, grad in zip(named, leaves, grads, strict=True):
                out[p].append(torch.zeros_like(leaf) if grad is None else grad)
    return {p: torch.stack(gs) for p, gs in out.items()}


class _Samplers(dict):
    """Opacus' registered rules, plus :func:`variant_grad_sample` for every :class:`Variant` (looked up live,
    so rules Opacus registers later are seen too)."""

    def __contains__(self, key: object) -> bool:
        return key is Variant or key in GradSampleModule.GRAD_SAMPLERS

    def __getitem__(self, key: Any) -> Any:
        return variant_grad_sample if key is Variant else GradSampleModule.GRAD_SAMPLERS[key]


class AdapterGradSampleModule(GradSampleModule):
    """Opacus' hook-based GradSampleModule that also covers lorakit adapters.

    After ``loss.backward()`` every trainable parameter ``p`` of the wrapped model holds ``p.grad_sample``
    ``(N, *p.shape)``, as Opacus' ``DPOptimizer`` expects. ``loss`` must be the mean of per-example losses.
    """

    GRAD_SAMPLERS = _Samplers()

    def __init__(self, model: nn.Module, *, loss_reduction: str = "mean") -> None:
        _check_trainable_modules(model)
        # strict=False: Opacus rejects any trainable module that has buffers; adapters' buffers (AdaLoRA's
        # mask, Delta-LoRA's snapshot) are derived from the trained parameters, never from data.
        super().__init__(model, batch_first=True, loss_reduction=loss_reduction, strict=False)

    def _get_module_type(self, module: nn.Module) -> type:
        return Variant if isinstance(module, Variant) else type(module)

    def iterate_submodules(self, module: nn.Module) -> Any:
        if isinstance(module, Variant):  # one rule covers all of an adapter's parameters
            if any(p.requires_grad for p in module.parameters()):
                yield module
            return
        yield from super().iterate_submodules(module)

    def capture_activations_hook(self, module: nn.Module, forward_input: Any, forward_output: Tensor) -> None:
        if not isinstance(module, Variant):
            super().capture_activations_hook(module, forward_input, forward_output)
            return
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return
        x, y, base = forward_input
        if not hasattr(module, "activations"):
            module.activations = []
        # [base, y, x]: Opacus reads the batch size from the last entry, and y may be None.
        module.activations.append([base, None if y is None else y.detach(), x.detach()])
        for _, p in _module_utils.trainable_parameters(module):
            p._forward_counter += 1


def _check_trainable_modules(model: nn.Module) -> None:
    """Refuse modules DP-SGD cannot account for: normalisation keeping statistics of the private data (and
    BatchNorm's mixing examples), trained modules with buffers, trained tensors below fp32 (clipped
    inexactly), and gradient checkpointing (whose recomputed blocks capture their activations twice, so the
    per-example gradients come out wrong)."""
    for param in model.parameters():
        if param.requires_grad:
            check_clipped_dtype(str(param.dtype).removeprefix("torch."))
    for name, module in model.named_modules():
        if vars(module).get("gradient_checkpointing") is True:  # transformers' flag on what it recomputes
            raise PrivacyError(
                f"module '{name}' ({type(module).__name__}) recomputes its blocks in backward (gradient "
                "checkpointing), which captures their activations twice and makes the per-example gradients "
                "wrong; turn it off (model.gradient_checkpointing_disable()) for DP-SGD"
            )
        batch_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if batch_norm or (
            isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats
        ):
            # frozen or not: a training forward writes running statistics of the private data
            mixes = (
                "normalises by the batch's statistics (one example moves every other's gradient) and "
                if batch_norm
                else ""
            )
            raise PrivacyError(
                f"module '{name}' ({type(module).__name__}) {mixes}keeps running statistics of the private "
                "data, which leave unaccounted; replace it with GroupNorm or LayerNorm "
                "(opacus.validators.ModuleValidator.fix does)"
            )
        if isinstance(module, Variant) or not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if list(module.buffers(recurse=False)):
            raise PrivacyError(
                f"module '{name}' ({type(module).__name__}) trains with buffers, which per-example clipping "
                "does not cover; freeze it or replace it"
            )
