"""A causal LM trained data-parallel with 2 gloo processes follows one process with the same micro-batches:
the loss of a step is divided by the labelled tokens of all its micro-batches in every process, so ranks that
hold answers of different lengths weigh every token alike (a mean of per-rank means would not)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from dist_harness import WORLD, spawn_jobs
from safetensors.torch import load_file

import lorakit
from lorakit.jobs.config import DataConfig, JobConfig
from lorakit.jobs.job import run_job
from lorakit.train.loop import TrainConfig


def chat_rows(path: Path) -> Path:
    """Questions with answers from 2 to 30 words: micro-batches and ranks hold very different token counts."""
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        words = " ".join(["so"] * rng.choice([1, 5, 14, 29]))
        rows.append({"q": f"What is {a} plus {b}?", "a": f"{words} {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lm_job(model: Path, data: Path, out: Path, batch_size: int, mode: str | None) -> JobConfig:
    return JobConfig(
        model=str(model),
        variant="lora",
        targets="all-linear",
        rank=4,
        alpha=8.0,
        dropout=0.0,
        output_dir=str(out),
        distributed=mode,
        data=DataConfig(data=str(data), prompt_column="q", response_column="a", max_length=96),
        train=TrainConfig(steps=4, batch_size=batch_size, grad_accum=2, lr=2e-2, progress=False),
    )


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_a_causal_lm_trains_across_processes_as_one_process_with_the_same_micro_batches(
    chat_llama_dir, tmp_path, mode
) -> None:
    data = chat_rows(tmp_path / "rows.jsonl")
    spawn_jobs([lm_job(chat_llama_dir, data, tmp_path / mode, 2, mode)])
    run_job(lm_job(chat_llama_dir, data, tmp_path / "single", 2 * WORLD, None))
    got = load_file(str(tmp_path / mode / lorakit.adapters.io.WEIGHTS_FILE))
    want = load_file(str(tmp_path / "single" / lorakit.adapters.io.WEIGHTS_FILE))
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    assert any(t.abs().sum() > 1e-3 for k, t in want.items() if k.endswith(".B"))  # it trained
    metrics = json.loads((tmp_path / mode / "metrics.json").read_text())
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert metrics["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4)
    # the throughput counts every process's tokens, as one process counts them all (rank 0's are about half)
    assert metrics["extra"]["tokens"] == single["extra"]["tokens"] > 0
