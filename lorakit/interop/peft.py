"""PEFT's LoRA adapter format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`save_peft` writes a lorakit LoRA-family adapter so that ``peft.PeftModel.from_pretrained(base, dir)``
(and every server that reads PEFT adapters) loads it; :func:`load_peft` reads a PEFT LoRA or DoRA adapter into
lorakit, to evaluate, train further with lorakit's hooks, merge or save. Neither needs PEFT installed.

The two parameterisations are the same: PEFT's ``lora_A`` is ``A (r, in)``, ``lora_B`` is ``B (out, r)`` (for
convolutions reshaped to a kernel and a 1x1 convolution; for embeddings ``lora_embedding_A/B``), the scale is
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), and DoRA's magnitude is ``lora_magnitude_vector``.
Variants whose update is not ``s B A`` (or DoRA's) have no PEFT LoRA equivalent and are refused.
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
from lorakit.core.layer import AdaptedLayer
from lorakit.io import atomic_write

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# Variants whose adapter is PEFT's LoRA (DoRA: with use_dora); DyLoRA is written at its chosen rank.
EXPORTABLE = ("lora", "lora_fa", "lora_plus", "qlora", "dora", "dylora")


def save_peft(model: nn.Module, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the model's adapter and trained head in PEFT's LoRA format; returns the directory.

    DyLoRA is written at the rank :func:`lorakit.variants.dylora.set_rank` chose (``R`` if none) as a plain
    LoRA of that rank. A 4-bit (QLoRA) base is not written: load the base in 4 bits on the PEFT side.
    """
    state = info(model)
    if state.variant not in EXPORTABLE:
        raise ValueError(
            f"variant '{state.variant}' has no PEFT LoRA equivalent; PEFT's LoRA format holds "
            f"{', '.join(EXPORTABLE)}. Use lorakit.save, or lorakit.merge and save the merged model."
        )
    layers = adapted_layers(model)
    if any(layer.merged for _, layer in layers):
        raise ValueError("the adapter is merged into the base; call lorakit.unmerge(model) before save_peft")
    out = Path(directory)
    if (out / CONFIG_FILE).exists() and not overwrite:
        raise FileExistsError(
            f"{out} already holds a PEFT adapter; choose another directory or overwrite=True"
        )
    rank = _rank(layers[0][1])
    tensors: dict[str, Tensor] = {}
    for name, layer in layers:
        tensors.update(_peft_tensors(name, layer, rank))
    modules = dict(model.named_modules())
    for name in state.train_modules:
        for key, value in modules[name].state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = value.detach()
    config = state.config
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": state.base_model,
        "r": rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": bool(getattr(config, "rslora", False)),
        "use_dora": state.variant == "dora",
        "target_modules": [name for name, _ in layers],
        "fan_in_fan_out": all(layer.kind.name == "conv1d_gpt2" for _, layer in layers),
        "modules_to_save": list(state.train_modules) or None,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.contiguous().cpu() for k, v in tensors.items()}
    atomic_write(out / WEIGHTS_FILE, lambda path: save_file(contiguous, path, metadata={"format": "pt"}))
    atomic_write(
        out / CONFIG_FILE, lambda path: Path(path).write_text(json.dumps(peft_config, indent=2) + "\n")
    )
    return out


def _rank(layer: AdaptedLayer) -> int:
    variant = layer.variant
    return int(getattr(variant, "current_rank", variant.config.rank))  # DyLoRA: the chosen rank


def _peft_tensors(name: str, layer: AdaptedLayer, rank: int) -> dict[str, Tensor]:
    """One layer's factors under PEFT's names and in PEFT's shapes."""
    v, kind, base = layer.variant, layer.kind, layer.base_layer
    a, b = v.A.detach()[:rank], v.B.detach()[:, :rank]  # (r, in), (out, r); DyLoRA truncated to its rank
    key = PREFIX + name
    conv = kind.name.startswith("conv") and kind.name != "conv1d_gpt2"
    spatial = base.weight.shape[2:] if conv else ()
    if kind.name == "embedding":
        found = {f"{key}.lora_embedding_A": a, f"{key}.lora_embedding_B": b}
    elif conv:
        found = {
            f"{key}.lora_A.weight": a.reshape(rank, *base.weight.shape[1:]),  # a convolution like the base
            f"{key}.lora_B.weight": b.reshape(*b.shape, *([1] * len(spatial))),  # a 1x1 convolution
        }
    else:
        found = {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
    if hasattr(v, "m"):  # DoRA's magnitude (out,); PEFT keeps (1, out, 1, ...) for convolutions
        m = v.m.detach()
        found[f"{key}.lora_magnitude_vector"] = m.reshape(1, -1, *([1] * len(spatial))) if conv else m
    return found


def load_peft(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Apply the PEFT LoRA or DoRA adapter in ``directory`` (or a Hub repo id) to the base ``model``."""
    path = _adapter_dir(directory)
    config = _read_config(path)
    tensors = _read_tensors(path)
    foreign = [k for k in tensors if not k.startswith(PREFIX)]
    if foreign:
        raise ValueError(
            f"{path}: tensor names must start with '{PREFIX}' as PEFT writes them; got {foreign[:3]}"
        )
    names = sorted({k[len(PREFIX) :].rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    if not names:
        raise ValueError(f"{path / WEIGHTS_FILE} holds no LoRA tensors (keys like '...lora_A.weight')")
    heads = {k[len(PREFIX) :]: v for k, v in tensors.items() if ".lora_" not in k}
    unknown = sorted(set(heads) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"the adapter's saved modules do not fit this model: no {unknown[:3]} in it")
    head_modules = sorted({k.rsplit(".", 1)[0] for k in heads})
    apply(
        model,
        "dora" if config.get("use_dora") else "lora",
        targets=names,
        train_modules=head_modules,
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=bool(config.get("use_rslora")),
    )
    layers = dict(adapted_layers(model))
    with torch.no_grad():
        for name in names:
            _fill_layer(layers[name], tensors, PREFIX + name)
        params = dict(model.state_dict(keep_vars=True))
        for key, value in heads.items():
            params[key].copy_(value)
    return model


def _fill_layer(layer: AdaptedLayer, tensors: dict[str, Tensor], key: str) -> None:
    v = layer.variant
    embedding = layer.kind.name == "embedding"
    a = tensors[f"{key}.lora_embedding_A" if embedding else f"{key}.lora_A.weight"]
    b = tensors[f"{key}.lora_embedding_B" if embedding else f"{key}.lora_B.weight"]
    if a.shape[0] != v.A.shape[0] or a.numel() != v.A.numel() or b.numel() != v.B.numel():
        raise ValueError(
            f"{key}: adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit this model's layer"
        )
    v.A.copy_(a.reshape(v.A.shape))
    v.B.copy_(b.reshape(v.B.shape))
    magnitude = tensors.get(f"{key}.lora_magnitude_vector")
    if hasattr(v, "m"):
        if magnitude is None:
            raise ValueError(
                f"{key}: use_dora is set but the file has no lora_magnitude_vector for this layer"
            )
        v.m.copy_(magnitude.reshape(-1))


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
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type {config.get('peft_type')!r}; lorakit reads PEFT's LORA adapters")
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
