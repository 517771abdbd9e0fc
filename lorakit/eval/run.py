"""``lorakit eval --generate`` and ``lorakit generate``: a causal LM's answers to a job's prompts, scored.

Each evaluation row's prompt is rendered as in training (the run's chat template) and answered greedily; the
answer's final number (or ``--answer-pattern``'s match) is compared with the reference's. A reference without
a final answer is not scored (it is counted and reported; data none of whose references has one is refused
before anything is generated). The metrics and one JSON line per row (prompt, reference, generation, both
extracted answers, whether they match) are written to an output directory: ``metrics.json`` and
``generations.jsonl``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.adapters.io import atomic_write
from lorakit.common import dirlock
from lorakit.common.errors import LorakitError, OutputExistsError, SettingError
from lorakit.data import chat
from lorakit.data import datasets as D
from lorakit.eval.generation import capped_rows, generate, stop_tokens
from lorakit.eval.scoring import extract_answer, score
from lorakit.jobs.config import JobConfig
from lorakit.jobs.job import chat_template, report
from lorakit.jobs.models import context_length
from lorakit.jobs.rundir import EVAL_DIR, GENERATIONS_FILE, METRICS_FILE, part_of_run

DEFAULT_NEW_TOKENS = 256  # per answer, where the model's context leaves room for them


class GenerationError(LorakitError):
    """Prompts or references that cannot be generated from or scored; the message names the fix."""


@dataclass
class GenerationReport:
    """Exact match over the ``total`` rows whose reference has a final answer, ``unscored`` rows without one,
    and the rows themselves."""

    correct: int
    total: int
    unscored: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None

    @property
    def metrics(self) -> dict[str, float]:
        return {"exact_match": self.correct / self.total if self.total else 0.0}

    @staticmethod
    def check_out(out: Path, overwrite: bool) -> None:
        """Refuse, before anything is generated, an ``out`` that cannot take the evaluation: a file, a run's
        own directory (its ``metrics.json`` is the training's) or a part of a run other than its ``eval``
        (which a re-run replaces), an earlier evaluation without ``overwrite``, or a place that cannot be
        written."""
        if out.exists() and not out.is_dir():
            raise OutputExistsError(
                f"--out {out} is a file; name a directory for {METRICS_FILE} and {GENERATIONS_FILE}"
            )
        run, entry = part_of_run(dirlock.real_path(str(out))) or (None, EVAL_DIR)
        if not entry:
            raise OutputExistsError(
                f"--out {out} is a run's directory (its {METRICS_FILE} is the training's); name another "
                "directory, or leave --out out to write to ADAPTER/eval"
            )
        if entry != EVAL_DIR:  # a run's own evaluation goes in EVAL_DIR; the rest a re-run replaces
            raise OutputExistsError(
                f"--out {out} is part of the lorakit run {run} ({entry}), which a re-run or --resume "
                f"replaces; name a directory outside it, or {run / EVAL_DIR}"
            )
        existing = [name for name in (METRICS_FILE, GENERATIONS_FILE) if (out / name).exists()]
        if existing and not overwrite:
            raise OutputExistsError(
                f"{out} already holds an evaluation ({', '.join(existing)}); pass --out with a new directory "
                "or --overwrite to replace it"
            )
        anchor = out
        while not anchor.exists() and anchor.parent != anchor:
            anchor = anchor.parent
        if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
            raise SettingError(f"--out {out}: cannot write in {anchor}; name a writable directory")

    def write(self, out: Path, metrics: dict[str, float], overwrite: bool = False) -> None:
        """``metrics.json`` (with the counts) and ``generations.jsonl`` in ``out``; files of an earlier
        evaluation there are replaced only with ``overwrite``."""
        self.check_out(out, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows)
        atomic_write(out / GENERATIONS_FILE, lambda path: Path(path).write_text(lines, encoding="utf-8"))
        record = {
            **metrics,
            "exact_match_correct": self.correct,
            "exact_match_total": self.total,
            "exact_match_unscored": self.unscored,
        }
        text = json.dumps(record, indent=2) + "\n"
        atomic_write(out / METRICS_FILE, lambda path: Path(path).write_text(text))
        self.path = out / GENERATIONS_FILE


def generation_eval(
    job: JobConfig,
    model: nn.Module,
    tokenizer: Any,
    rows: list[D.Row],
    source: str,
    pattern: re.Pattern[str] | None,
    max_new_tokens: int | None,
    batch_size: int,
    named: bool = False,
) -> GenerationReport:
    """Generate an answer to every row of ``rows`` and score it against the row's reference answer.
    ``named``: the columns were named for these rows (:func:`lorakit.data.datasets.conversations`)."""
    d = job.data
    examples = D.conversations(
        rows, d.messages_column, d.prompt_column, d.response_column, source, named=named
    )
    expected = [extract_answer(example.answer or "", pattern) for example in examples]
    unscored = sum(answer is None for answer in expected)
    finds = "the pattern's match" if pattern is not None else "GSM8K's '#### N' or a number"
    if unscored == len(examples):
        raise GenerationError(
            f"none of the {len(examples)} references in {source} has a final answer ({finds}), so nothing "
            "can be scored; pass --answer-pattern that finds the answers, or other --data"
        )
    if unscored:
        report(
            f"{source}: {unscored} of {len(examples)} references have no final answer ({finds}); they are "
            "not scored"
        )
    template = chat_template(job, tokenizer)
    prompts = chat.prompts_ids(tokenizer, template, examples, f"{source} row")
    budget, context = new_tokens(
        model, tokenizer, template, prompts, max_new_tokens, f"{source} row", batch_size
    )
    texts = generate(
        model,
        tokenizer,
        prompts,
        template=template,
        max_new_tokens=budget,
        batch_size=batch_size,
        context=context,
    )
    result = GenerationReport(correct=0, total=len(examples) - unscored, unscored=unscored)
    for example, text, answer in zip(examples, texts, expected, strict=True):
        scored = score(text, example.answer or "", pattern)
        result.correct += answer is not None and scored.correct
        result.rows.append(
            {
                "prompt": example.prompt[-1]["content"],
                "reference": example.answer or "",
                "generation": text,
                "predicted": scored.predicted,
                "expected": scored.expected,
                "correct": scored.correct if answer is not None else None,
            }
        )
    return result


def new_tokens(
    model: nn.Module,
    tokenizer: Any,
    template: str | None,
    prompts: list[list[int]],
    requested: int | None,
    what: str,
    batch_size: int,
) -> tuple[int, int | None]:
    """Tokens to generate per answer (``requested``, or by default up to :data:`DEFAULT_NEW_TOKENS`) and the
    model's context length. A prompt that fills the context is refused naming it (``what`` N); answers
    batched with a prompt that leaves less room stop where the context ends, which, for a ``requested``
    number, is said once with their count. Where no token ends an answer, that is said once too."""
    if not stop_tokens(model, tokenizer, template):
        report(
            "neither the tokenizer nor the model names an end-of-sequence token: every answer runs to "
            "--max-new-tokens"
        )
    budget = requested or DEFAULT_NEW_TOKENS
    context = context_length(model)
    if context is None:
        return budget, None
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) >= context:
        raise GenerationError(
            f"{what} {longest + 1} has {len(prompts[longest])} tokens, which fill the model's context of "
            f"{context} tokens and leave none to answer with; shorten it"
        )
    capped = capped_rows(prompts, batch_size, budget, context) if requested is not None else 0
    if capped:  # the default is "up to 256, within the context": only a number asked for is cut short
        report(
            f"{capped} of {len(prompts)} answers have fewer than {budget} tokens of the model's context of "
            f"{context} left after the longest prompt of their batch (the longest, {what} {longest + 1}, has "
            f"{len(prompts[longest])} tokens): they stop where the context ends"
            + ("; a smaller --batch-size caps fewer" if batch_size > 1 else "")
        )
    return budget, context


def answer_prompts(
    model: nn.Module,
    tokenizer: Any,
    job: JobConfig,
    prompts: list[chat.Example],
    max_new_tokens: int | None,
    batch_size: int,
) -> list[str]:
    """The model's answers to conversations that end with the user's turn, rendered in the job's chat
    template."""
    template = chat_template(job, tokenizer)
    ids = chat.prompts_ids(tokenizer, template, prompts, "prompt")
    budget, context = new_tokens(model, tokenizer, template, ids, max_new_tokens, "prompt", batch_size)
    return generate(
        model,
        tokenizer,
        ids,
        template=template,
        max_new_tokens=budget,
        batch_size=batch_size,
        progress=False,
        context=context,
    )
