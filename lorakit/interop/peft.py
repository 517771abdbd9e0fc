"""PEFT's adapter formats, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`save_peft` writes a lorakit adapter so that ``peft.PeftModel.from_pretrained(base, dir)`` (and
every server that reads PEFT adapters) loads it; :func:`load_peft` reads a PEFT LoRA, DoRA, LoHa or LoKr
adapter into lorakit, to evaluate, train further with lorakit's hooks, merge or save. Neither needs PEFT
installed. How each method's tensors map is in :mod:`lorakit.interop.peft_methods`; variants PEFT has no
format for are refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lorakit.api import adapted_layers, apply, info
from lorakit.interop.peft_methods import METHODS
from lorakit.io import atomic_write

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
EXPORTABLE = tuple(v for method in METHODS for v in method.variants)


def save_peft(model: nn.Module, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the model's adapter and trained head in PEFT's format; returns the directory.

    DyLoRA is written at the rank :func:`lorakit.variants.dylora.set_rank` chose (``R`` if none) as a plain
    LoRA of that rank. A 4-bit (QLoRA) base is not written: load the base in 4 bits on the PEFT side.
    """
    state = info(model)
    method = next((m for m in METHODS if state.variant in m.variants), None)
    if method is None:
        raise ValueError(
            f"variant '{state.variant}' has no PEFT equivalent; PEFT's formats hold {', '.join(EXPORTABLE)}. "
            "Use lorakit.save, or lorakit.merge and save the merged model."
        )
    layers = adapted_layers(model)
    if any(layer.merged for _, layer in layers):
        raise ValueError("the adapter is merged into the base; call lorakit.unmerge(model) before save_peft")
    out = Path(directory)
    if (out / CONFIG_FILE).exists() and not overwrite:
        raise FileExistsError(
            f"{out} already holds a PEFT adapter; choose another directory or overwrite=True"
        )
    variant = layers[0][1].variant
    rank = int(getattr(variant, "current_rank", variant.config.rank))  # DyLoRA: the chosen rank
    tensors: dict[str, Tensor] = {}
    for name, layer in layers:
        tensors.update(method.tensors(PREFIX + name, layer, rank))
    modules = dict(model.named_modules())
    for name in state.train_modules:
        for key, value in modules[name].state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = value.detach()
    peft_config = {
        "peft_type": method.peft_type,
        "task_type": None,
        "base_model_name_or_path": state.base_model,
        **method.config(state, [layer for _, layer in layers], rank),
        "target_modules": [name for name, _ in layers],
        "modules_to_save": list(state.train_modules) or None,
        "inference_mode": True,
    }
    out.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.contiguous().cpu() for k, v in tensors.items()}
    text = json.dumps(peft_config, indent=2) + "\n"
    atomic_write(out / WEIGHTS_FILE, lambda path: save_file(contiguous, path, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_FILE, lambda path: Path(path).write_text(text))
    return out


def load_peft(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Apply the PEFT adapter in ``directory`` (or a Hub repo id) to the plain base ``model``, in place.

    LoRA and DoRA adapters become ``lora``/``dora``, LoHa ``loha`` and LoKr ``lokr``. PEFT's rank and module
    dropout act only in training; lorakit trains an imported adapter with its own input dropout (0).
    """
    path = _adapter_dir(directory)
    config = _read_config(path)
    method = next(m for m in METHODS if m.peft_type == config["peft_type"])
    tensors = _read_tensors(path)
    foreign = [k for k in tensors if not k.startswith(PREFIX)]
    if foreign:
        raise ValueError(
            f"{path}: tensor names must start with '{PREFIX}' as PEFT writes them; got {foreign[:3]}"
        )
    marker = method.marker
    names = sorted({k[len(PREFIX) :].split(marker)[0] for k in tensors if marker in k})
    if not names:
        raise ValueError(f"{path}: no {config['peft_type']} tensors (keys containing '{marker}')")
    heads = {k[len(PREFIX) :]: v for k, v in tensors.items() if marker not in k}
    unknown = sorted(set(heads) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"the adapter's saved modules do not fit this model: no {unknown[:3]} in it")
    variant, options = method.variant_options(config)
    head_modules = sorted({k.rsplit(".", 1)[0] for k in heads})
    apply(model, variant, targets=names, train_modules=head_modules, **options)
    layers = dict(adapted_layers(model))
    with torch.no_grad():
        for name in names:
            method.fill(layers[name], tensors, PREFIX + name)
        params = dict(model.state_dict(keep_vars=True))
        for key, value in heads.items():
            params[key].copy_(value)
    return model


def _adapter_dir(directory: str | os.PathLike[str]) -> Path:
    """A local directory as given; an ``owner/name`` that is not one is fetched from the Hugging Face Hub."""
    path = Path(directory)
    if path.exists() or not HUB_ID.fullmatch(str(directory)):
        return path
    from huggingface_hub import snapshot_download  # installed with transformers

    files = [CONFIG_FILE, WEIGHTS_FILE, "adapter_model.bin"]
    try:
        return Path(snapshot_download(str(directory), allow_patterns=files))
    except Exception as err:  # offline, unknown repo, no access: all mean "not found" to the caller
        raise FileNotFoundError(
            f"no adapter directory {directory}, and fetching it from the Hugging Face Hub failed: {err}"
        ) from err


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}: not a PEFT adapter directory")
    config = json.loads(file.read_text())
    types = [m.peft_type for m in METHODS]
    if config.get("peft_type") not in types:
        raise ValueError(f"{file}: peft_type {config.get('peft_type')!r}; lorakit reads {', '.join(types)}")
    if config.get("use_effective_conv2d"):
        raise ValueError(f"{file}: use_effective_conv2d (a Tucker core for convolutions) is not supported")
    unsupported = {
        "rank_pattern": "per-layer ranks",
        "alpha_pattern": "per-layer alphas",
        "layer_replication": "layer replication",
        "trainable_token_indices": "trainable token indices",
    }
    for field, what in unsupported.items():
        if config.get(field):
            raise ValueError(
                f"{file}: {what} ({field}) are not supported; use one rank and alpha for all layers"
            )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ValueError(f"{file}: trained biases (bias={config.get('bias')!r}) are not supported")
    return config


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """The adapter's tensors: safetensors, or a legacy ``adapter_model.bin`` read without unpickling code."""
    if (path / WEIGHTS_FILE).is_file():
        return load_file(str(path / WEIGHTS_FILE))
    legacy = path / "adapter_model.bin"
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_FILE} (or adapter_model.bin) in {path}")
