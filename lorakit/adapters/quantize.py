"""Frozen linear layers stored in 4 bits: the base of QLoRA (Dettmers et al. 2023, arXiv:2305.14314).

>>> lorakit.quantize(model)               # every linear layer except the output head -> NF4Linear, in place
>>> lorakit.apply(model, "lora", rank=8)  # any variant then trains on the 4-bit base

Only linear layers are quantised (NF4, block size 64, double quantisation, see :mod:`lorakit.core.quant`):
``nn.Linear`` and GPT-2's ``Conv1D``, whose ``(in, out)`` weight is stored transposed as ``(out, in)`` (as
bitsandbytes' integration in transformers does); embeddings, norms, convolutions and output heads keep their
precision, as in the paper. A quantised layer dequantises its weight to ``compute_dtype`` on every forward
and never takes a gradient, so only adapters train. Merging an adapter into a 4-bit layer gives a dense layer
of the original type (never re-quantised: that would lose the adapter's detail); :func:`dequantize` turns the
remaining 4-bit layers back into dense ones, e.g. before saving a merged model.

An adapter's fingerprint covers the quantised weights, so an adapter trained on a 4-bit base loads onto a
base quantised the same way: ``quantize(model)`` then ``lorakit.load(model, dir)`` (the CLI does this from
``job.json``; the ``qlora`` variant records its quantisation in its config and quantises on load itself).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.adapters.targets import TargetError, find_targets, output_head_names, set_module
from lorakit.common.errors import LorakitError
from lorakit.core.config import BaseStorage
from lorakit.core.kinds import ALL_KINDS, MATRIX_KINDS, kind_of
from lorakit.core.nf4_linear import NF4Linear

QUANT_TYPES = ("nf4",)
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


class QuantizationError(LorakitError):
    """A model or layer cannot be quantised as asked; the message names the fix."""


def quantize(
    model: nn.Module,
    quant_type: str = "nf4",
    *,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    double_quant: bool = True,
    targets: str | list[str] | None = None,
) -> nn.Module:
    """Replace ``model``'s linear layers with 4-bit :class:`NF4Linear` layers in place; returns ``model``.

    ``targets`` selects layers as in :func:`lorakit.apply` (suffixes, a regex, ``"all-linear"``); the default
    is every linear layer (``nn.Linear``, GPT-2 ``Conv1D``) except the output head/classifier. For a Hugging
    Face model this also makes the input embeddings' output require grad (as PEFT's
    ``prepare_model_for_kbit_training`` does), so adapters still get gradients under reentrant gradient
    checkpointing.
    """
    check_quant_type(quant_type)
    dtype = compute_dtype_of(compute_dtype)
    if getattr(model, "lorakit", None) is not None:
        raise QuantizationError(
            "model already has a lorakit adapter; quantise the base first: lorakit.quantize(model), "
            "then lorakit.apply(model, ...)"
        )
    names = _select(model, targets)
    _quantize_layers(model, names, dtype, double_quant)
    _enable_input_grads(model)
    return model


def quantize_targets(model: nn.Module, names: list[str], storage: BaseStorage) -> None:
    """Quantise the layers ``names`` as a variant's ``base_storage()`` asks (called by :func:`lorakit.apply`
    for QLoRA). Layers that are already quantised stay, but must have been quantised with the same settings:
    the saved config is what a later load uses to rebuild the base, so it has to describe the base exactly.
    """
    check_quant_type(storage.quant_type)
    dtype = compute_dtype_of(storage.compute_dtype)
    double_quant = storage.double_quant
    todo = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, NF4Linear):
            todo.append(name)
        elif layer.compute_dtype != dtype or (layer.weight_absmax is None) != double_quant:
            raise QuantizationError(
                f"{name} was quantised with compute_dtype={dtype_name(layer.compute_dtype)}, "
                f"double_quant={layer.weight_absmax is None}, but the config asks for "
                f"compute_dtype={dtype_name(dtype)}, double_quant={double_quant}; pass matching values "
                "(or apply to an unquantised model and let apply quantise it)"
            )
    _check_layers(model, todo)
    _quantize_layers(model, todo, dtype, double_quant)
    if todo:
        _enable_input_grads(model)


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every :class:`NF4Linear` in ``model`` with the dense layer it stands for (``nn.Linear`` or
    GPT-2 ``Conv1D``, original dtype), in place."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]:
        dense = layer.to_dense()
        dense.requires_grad_(False)
        dense.train(layer.training)
        set_module(model, name, dense)
    release_input_grads(model)
    return model


def check_quant_type(quant_type: Any) -> None:
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(
            f"unknown quant type {quant_type!r}; lorakit implements {', '.join(QUANT_TYPES)} "
            "(QLoRA's 4-bit NormalFloat): pass 'nf4'"
        )


def compute_dtype_of(value: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` from ``torch.bfloat16`` or ``"bfloat16"``; a clear error for anything else."""
    if isinstance(value, torch.dtype) and value in _FLOAT:
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[value.removeprefix("torch.")]
    raise QuantizationError(
        f"compute_dtype {value!r} is not supported; choose one of {', '.join(COMPUTE_DTYPES)}"
    )


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")


def _select(model: nn.Module, targets: str | list[str] | None) -> list[str]:
    """Names of the layers to quantise: the explicit ``targets``, or every linear layer outside the head."""
    if targets is not None:
        names = find_targets(model, targets, ALL_KINDS)
        _check_layers(model, names)
        return names
    try:
        names = find_targets(model, "all-linear", ALL_KINDS)  # nn.Linear and GPT-2 Conv1D, head excluded
    except TargetError:
        names = []
    if not names:
        heads = sorted(output_head_names(model))
        kept = f" (the output head {', '.join(heads[:3])} stays in full precision)" if heads else ""
        raise QuantizationError(
            f"{type(model).__name__} has no linear layer to quantise{kept}; NF4 covers nn.Linear and GPT-2 "
            "Conv1D only (convolutions and embeddings are left as they are): pass targets=[...] to choose"
        )
    _check_layers(model, names)
    return names


def _check_layers(model: nn.Module, names: list[str]) -> None:
    """Every named layer must be a float, materialised, not yet quantised nn.Linear or GPT-2 Conv1D (checked
    before any layer is replaced, so a failed call leaves the model as it was)."""
    modules = dict(model.named_modules())
    done = [n for n in names if isinstance(modules[n], NF4Linear)]
    if done:
        raise QuantizationError(
            f"{done[0]} is already NF4-quantised ({len(done)} of the selected layers are); quantize "
            "runs once per model: use the model as it is, or quantise a freshly loaded one"
        )
    for name in names:
        layer = modules[name]
        kind = kind_of(layer)
        if kind is None or kind not in MATRIX_KINDS:
            raise QuantizationError(
                f"{name} is a {kind.name if kind else type(layer).__name__} layer; NF4 quantises nn.Linear "
                "and GPT-2 Conv1D layers only: leave it out of targets"
            )
        weight = layer.weight
        if weight.dtype in (torch.uint8, torch.int8):
            raise QuantizationError(
                f"{name} has a {weight.dtype} weight: it looks already quantised (e.g. by bitsandbytes); "
                "load the model in full precision and quantise that"
            )
        if weight.dtype not in _FLOAT:
            raise QuantizationError(
                f"{name} has a {weight.dtype} weight; NF4 quantises float32/float16/bfloat16 weights: "
                "cast the model first (model.float())"
            )
        if weight.is_meta:
            raise QuantizationError(
                f"{name} is on the meta device (no weight data); load or materialise the weights first"
            )


def _quantize_layers(model: nn.Module, names: list[str], dtype: torch.dtype, double_quant: bool) -> None:
    # One layer at a time, each replaced as soon as it is quantised, so the peak is one extra NF4 layer.
    for name in names:
        dense = model.get_submodule(name)
        layer = NF4Linear.from_linear(dense, compute_dtype=dtype, double_quant=double_quant)
        layer.train(dense.training)
        set_module(model, name, layer)


def _inputs_require_grad(module: nn.Module, inputs: Any, output: Any) -> None:
    """A forward hook marking the input embeddings' output as needing grad. A module-level function (not
    transformers' closure), so a model holding it can still be pickled and the hook found again."""
    output.requires_grad_(True)


def _enable_input_grads(model: nn.Module) -> None:
    # A frozen 4-bit model gives the first checkpointed block inputs that need no grad; with reentrant
    # checkpointing its adapters would then get none. Hugging Face models can mark the embeddings' output.
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        embeddings = None  # a model without input embeddings: nothing to mark
    if isinstance(embeddings, nn.Module) and _inputs_require_grad not in embeddings._forward_hooks.values():
        embeddings.register_forward_hook(_inputs_require_grad)


def release_input_grads(model: nn.Module) -> None:
    """Remove the hook :func:`_enable_input_grads` put on ``model`` (its adapter merged away, or its base
    dequantised): the plain model's embeddings need no grad."""
    for module in model.modules():
        for key in [k for k, hook in module._forward_hooks.items() if hook is _inputs_require_grad]:
            del module._forward_hooks[key]
