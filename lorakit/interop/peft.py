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
from lorakit.core.layer import AdaptedLayer
from lorakit.interop.peft_methods import METHODS
from lorakit.io import atomic_write, undo_apply

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# PEFT settings that change what the tensors mean (or add tensors lorakit would not read).
UNSUPPORTED = {
    "rank_pattern": "a rank per layer",
    "alpha_pattern": "an alpha per layer",
    "layer_replication": "layer replication",
    "trainable_token_indices": "training of token embeddings",
    "target_parameters": "adapting parameters instead of modules",
    "alora_invocation_tokens": "activated LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA",
    "use_qalora": "QA-LoRA",
}
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
    for name, layer in layers:
        method.check_export(name, layer)
    modules = dict(model.named_modules())
    adapted_heads = [
        n for n in state.train_modules if any(isinstance(m, AdaptedLayer) for m in modules[n].modules())
    ]
    if adapted_heads:
        raise ValueError(f"{adapted_heads[0]} is both adapted and fully trained; PEFT saves a module one way")
    _refuse_tied(model, state.train_modules)
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
    tensors.update(method.shared_tensors([layer for _, layer in layers]))
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
    dropout act only in training; lorakit trains an imported adapter with its own input dropout (0). Every
    tensor is checked before the model is touched, and a failure leaves the model as it was.
    """
    path = _adapter_dir(directory)
    config = _read_config(path)
    method = next(m for m in METHODS if m.peft_type == config["peft_type"])
    tensors = _read_tensors(path)
    shared = {k: tensors.pop(k) for k in method.shared_keys if k in tensors}
    foreign = [k for k in tensors if not k.startswith(PREFIX)]
    if foreign:
        raise ValueError(
            f"{path}: tensor names must start with '{PREFIX}' as PEFT writes them; got {foreign[:3]}"
        )
    local = {k[len(PREFIX) :]: v for k, v in tensors.items()}
    names = sorted({k.split(method.marker)[0] for k in local if method.marker in k})
    if not names:
        raise ValueError(f"{path}: no {config['peft_type']} tensors (keys containing '{method.marker}')")
    # Besides the adapter: modules_to_save (trained heads), and base weights PEFT saves for resized
    # embeddings (`save_embedding_layers`), which go into the base model as they are.
    rest = {k: v for k, v in local.items() if method.marker not in k}
    saved = config.get("modules_to_save") or []
    heads = {k: v for k, v in rest.items() if any(_within(k, m) for m in saved)}
    current = model.state_dict()
    for key, value in ((k.replace(".base_layer.", "."), v) for k, v in rest.items()):
        if key not in current or current[key].shape != value.shape:
            found = "no such tensor" if key not in current else f"shape {tuple(current[key].shape)}"
            raise ValueError(f"{path}: saved {key} {tuple(value.shape)} does not fit this model ({found})")
    head_modules = sorted({k.rsplit(".", 1)[0] for k in heads})
    _refuse_tied(model, head_modules)
    variant, options = method.variant_options(config, shared)
    exact = "|".join(re.escape(n) for n in names)  # full names, not suffixes
    apply(model, variant, targets=exact, train_modules=head_modules, **options)
    try:
        layers = dict(adapted_layers(model))
        params = dict(model.state_dict(keep_vars=True))
        with torch.no_grad():
            method.fill_shared(list(layers.values()), shared)
            for name in names:
                method.fill(layers[name], tensors, PREFIX + name)
            for key, value in rest.items():
                params[key].copy_(value)
    except Exception:
        undo_apply(model)
        raise
    return model


def _within(key: str, module: str) -> bool:
    """Whether tensor ``key`` belongs to a module named ``module`` (PEFT matches name suffixes)."""
    owner = key.rsplit(".", 1)[0]
    return owner == module or owner.endswith("." + module)


def _refuse_tied(model: nn.Module, module_names: list[str]) -> None:
    """PEFT keeps its own copy of a saved module, so one tied to another (embeddings) would come apart."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    modules = dict(model.named_modules())
    for module in module_names:
        for p in modules[module].parameters():
            others = [n for n in owners[id(p)] if not n.startswith(module + ".")]
            if others:
                raise ValueError(
                    f"{module} shares its weight with {others[0]} (tied); PEFT's modules_to_save would untie "
                    "them. Untie the weights first, or use lorakit.save"
                )


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
    for field, what in UNSUPPORTED.items():
        if config.get(field):
            raise ValueError(f"{file}: {what} ({field}) is not supported by lorakit's reader")
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
