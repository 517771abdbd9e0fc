"""Datasets for training and evaluation: TSV / CSV / JSONL files, Hugging Face dataset ids, a built-in demo.

Classification rows have a text and an integer label; causal-LM rows a prompt and a response (the loss covers
the response tokens only). Texts are tokenised once; batches are padded to their longest row.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorakit.errors import LorakitError


class DataError(LorakitError):
    """A dataset cannot be read or lacks a column; the message names the file and the fix."""


Row = dict[str, Any]


def read_rows(source: str, *, split: str = "train") -> list[Row]:
    """Rows of a ``.tsv``/``.csv``/``.jsonl`` file, the built-in ``demo`` task or a Hugging Face dataset."""
    if source == "demo":
        return demo_rows(split)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv", ".jsonl", ".json"):
        if not path.is_file():
            raise DataError(f"data file {source} does not exist; check the path")
        try:
            with path.open(newline="", encoding="utf-8") as f:
                if suffix in (".jsonl", ".json"):
                    return [json.loads(line) for line in f if line.strip()]
                return list(
                    csv.DictReader(
                        f,
                        delimiter="\t" if suffix == ".tsv" else ",",
                        quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL,
                    )
                )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"cannot read {source}: {err}") from None
    return _hub_rows(source, split)


def _hub_rows(dataset_id: str, split: str) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"'{dataset_id}' is not a .tsv/.csv/.jsonl file; to load Hugging Face dataset ids install "
            "lorakit[hub] (pip install 'lorakit[hub]')"
        ) from None
    try:
        return list(datasets.load_dataset(dataset_id, split=split))
    except Exception as err:  # offline, unknown id, unknown split
        raise DataError(f"cannot load dataset '{dataset_id}' split '{split}': {err}") from None


def column(rows: list[Row], name: str, source: str) -> list[Any]:
    """One column of ``rows``; a clear error naming the available columns when it is missing."""
    if not rows:
        raise DataError(f"{source} has no rows")
    if name not in rows[0]:
        raise DataError(
            f"{source} has no column '{name}'; its columns are {sorted(rows[0])} "
            "(set --text-column / --label-column / --prompt-column / --response-column)"
        )
    return [row[name] for row in rows]


@dataclass
class TokenizedData:
    """Token ids per example plus labels (class ids, or per-token targets with -100 on prompt tokens)."""

    input_ids: list[list[int]]
    labels: list[int] | list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        width = max(len(self.input_ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        token_labels = isinstance(self.labels[0], list)
        labels = torch.full((len(indices), width), -100, dtype=torch.long) if token_labels else None
        for row, i in enumerate(indices):
            n = len(self.input_ids[i])
            ids[row, :n] = torch.tensor(self.input_ids[i])
            mask[row, :n] = 1
            if labels is not None:
                labels[row, :n] = torch.tensor(self.labels[i])
        out = {"input_ids": ids, "attention_mask": mask}
        out["labels"] = labels if labels is not None else torch.tensor([self.labels[i] for i in indices])
        return out


def tokenize_classification(
    rows: list[Row], tokenizer: Any, text_column: str, label_column: str, max_length: int, source: str
) -> TokenizedData:
    texts = [str(t) for t in column(rows, text_column, source)]
    try:
        labels = [int(v) for v in column(rows, label_column, source)]
    except ValueError as err:
        raise DataError(f"{source}: labels in column '{label_column}' must be integers ({err})") from None
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return TokenizedData(ids, labels, tokenizer.pad_token_id or 0)


def tokenize_causal(
    rows: list[Row], tokenizer: Any, prompt_column: str, response_column: str, max_length: int, source: str
) -> TokenizedData:
    prompts = [str(t) for t in column(rows, prompt_column, source)]
    responses = [str(t) for t in column(rows, response_column, source)]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids, labels = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
        seq = (p + r)[:max_length]
        ids.append(seq)
        labels.append(([-100] * len(p) + r)[:max_length])  # loss on the response only
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return TokenizedData(ids, labels, pad)


class BatchSampler:
    """Endless shuffled batches from a seeded generator whose state is checkpointed for exact resume."""

    def __init__(self, data: TokenizedData, batch_size: int, seed: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if len(self._order) < self.batch_size:
            self._order += torch.randperm(len(self.data), generator=self.generator).tolist()
        take, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return self.data.batch(take)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": torch.tensor(self._order, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._order = state["order"].tolist()


def eval_batches(data: TokenizedData, batch_size: int) -> Iterator[dict[str, Tensor]]:
    for start in range(0, len(data), batch_size):
        yield data.batch(list(range(start, min(start + batch_size, len(data)))))


# --- the built-in demo task ----------------------------------------------------------------------------
_POSITIVE = [
    "a delight",
    "wonderful",
    "moving and funny",
    "beautifully made",
    "a joy to watch",
    "sharp and warm",
    "clever",
    "touching",
    "brilliant",
    "full of life",
    "gorgeous",
    "smart and tender",
    "a small gem",
    "charming",
    "gripping from start to end",
    "honest and kind",
    "fresh",
    "deeply satisfying",
]
_NEGATIVE = [
    "a mess",
    "dull",
    "tedious and flat",
    "badly made",
    "a chore to sit through",
    "lifeless",
    "clumsy",
    "boring",
    "awful",
    "empty",
    "ugly",
    "stiff and cold",
    "a waste of time",
    "tiresome",
    "confused from start to end",
    "cynical and mean",
    "stale",
    "deeply disappointing",
]
_SUBJECTS = [
    "the film",
    "this movie",
    "the story",
    "the acting",
    "the script",
    "the ending",
    "the soundtrack",
    "the direction",
    "the cast",
    "the second half",
    "this sequel",
    "the pacing",
]
_FRAMES = [
    "{s} is {p} .",
    "{s} feels {p} .",
    "honestly , {s} is {p} .",
    "i thought {s} was {p} .",
    "{s} turned out {p} .",
]


def demo_rows(split: str = "train") -> list[Row]:
    """A small sentiment task built from phrase templates: 1,800 training rows, 360 test rows.

    Held-out rows use subject/frame pairs never seen in training, so the test checks generalisation.
    """
    rows = []
    for si, subject in enumerate(_SUBJECTS):
        for fi, frame in enumerate(_FRAMES):
            held_out = (si + fi) % 6 == 0
            if held_out != (split != "train"):
                continue
            for label, phrases in ((1, _POSITIVE), (0, _NEGATIVE)):
                rows += [{"sentence": frame.format(s=subject, p=p), "label": label} for p in phrases]
    random.Random(0).shuffle(rows)
    return rows
