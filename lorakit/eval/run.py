"""``lorakit eval --generate`` and ``lorakit generate``: a causal LM's answers to a job's prompts, scored.

Each evaluation row's prompt is rendered as in training (the run's chat template) and answered greedily; the
answer's final number (or ``--answer-pattern``'s match) is compared with the reference's. The metrics and one
JSON line per row (prompt, reference, generation, both extracted answers, whether they match) are written to
an output directory: ``metrics.json`` and ``generations.jsonl``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.errors import OutputExistsError
from lorakit.eval.generation import generate
from lorakit.eval.scoring import compile_pattern, score
from lorakit.io import atomic_write
from lorakit.train import chat
from lorakit.train import data as D
from lorakit.train.job import JobConfig, chat_template

METRICS_FILE, GENERATIONS_FILE = "metrics.json", "generations.jsonl"


@dataclass
class GenerationReport:
    """Exact match over ``total`` rows and the rows themselves."""

    correct: int
    total: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None

    @property
    def metrics(self) -> dict[str, float]:
        return {"exact_match": self.correct / self.total if self.total else 0.0}

    def write(self, out: Path, metrics: dict[str, float], overwrite: bool = False) -> None:
        """``metrics.json`` (with the counts) and ``generations.jsonl`` in ``out``; files of an earlier
        evaluation there are replaced only with ``overwrite``."""
        existing = [name for name in (METRICS_FILE, GENERATIONS_FILE) if (out / name).exists()]
        if existing and not overwrite:
            raise OutputExistsError(
                f"{out} already holds an evaluation ({', '.join(existing)}); pass --out with a new directory "
                "or --overwrite to replace it"
            )
        out.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows)
        atomic_write(out / GENERATIONS_FILE, lambda path: Path(path).write_text(lines, encoding="utf-8"))
        record = {**metrics, "exact_match_correct": self.correct, "exact_match_total": self.total}
        text = json.dumps(record, indent=2) + "\n"
        atomic_write(out / METRICS_FILE, lambda path: Path(path).write_text(text))
        self.path = out / GENERATIONS_FILE


def generation_eval(
    job: JobConfig, model: nn.Module, tokenizer: Any, rows: list[D.Row], source: str, args: argparse.Namespace
) -> GenerationReport:
    """Generate an answer to every row of ``rows`` and score it against the row's reference answer."""
    d = job.data
    examples = D.conversations(rows, d.messages_column, d.prompt_column, d.response_column, source)
    template = chat_template(job, tokenizer)
    prompts = [chat.prompt_ids(tokenizer, template, example) for example in examples]
    texts = generate(
        model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    pattern = compile_pattern(args.answer_pattern)
    report = GenerationReport(correct=0, total=len(examples))
    for example, text in zip(examples, texts, strict=True):
        reference = example.answer or ""
        scored = score(text, reference, pattern)
        report.correct += scored.correct
        report.rows.append(
            {
                "prompt": example.prompt[-1]["content"],
                "reference": reference,
                "generation": text,
                "predicted": scored.predicted,
                "expected": scored.expected,
                "correct": scored.correct,
            }
        )
    return report


def answer_prompts(
    model: nn.Module, tokenizer: Any, job: JobConfig, prompts: list[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """The model's answers to user prompts, rendered in the job's chat template."""
    template = chat_template(job, tokenizer)
    examples = [chat.Example(({"role": "user", "content": prompt},)) for prompt in prompts]
    ids = [chat.prompt_ids(tokenizer, template, example) for example in examples]
    return generate(
        model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False
    )
