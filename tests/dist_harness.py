"""Two gloo processes on 127.0.0.1 for the distributed tests: a free port, spawned ranks, tiny jobs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lorakit.train.job import DataConfig, JobConfig
from lorakit.train.loop import TrainConfig

WORLD = 2
SUBJECTS = ["film", "movie", "story", "plot", "cast", "music", "script", "ending"]
POSITIVE, NEGATIVE = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "dull"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(rank: int, port: int) -> dict[str, str]:
    """What torchrun would set for ``rank`` of a 2-process run on this machine."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(WORLD),
        "LOCAL_WORLD_SIZE": str(WORLD),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def write_data(path: Path) -> Path:
    """64 rows ``"<subject> was <adjective>"``: every row is 5 tokens, so no batch pads differently."""
    rows = [
        {"sentence": f"{s} was {w}", "label": label}
        for s in SUBJECTS
        for label, words in ((1, POSITIVE), (0, NEGATIVE))
        for w in words
    ]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    path.write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    return path


def without_dropout(model_dir: Path, out: Path) -> Path:
    """A copy of a local model directory with dropout off (masks would differ between process layouts)."""
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


def job(
    model: Path, data: Path, out: Path, variant: str, options: dict, batch_size: int, mode: str | None
) -> JobConfig:
    """``steps`` 8 with 2 micro-batches per step; ``batch_size`` per rank (the global batch is world x it)."""
    return JobConfig(
        model=str(model),
        variant=variant,
        targets=["query", "value"],
        rank=4,
        alpha=8.0,
        dropout=0.0,
        options=options,
        output_dir=str(out),
        distributed=mode,
        data=DataConfig(data=str(data), max_length=16),
        train=TrainConfig(steps=8, batch_size=batch_size, grad_accum=2, lr=2e-2, progress=False),
    )


def _run_jobs(rank: int, port: int, jobs: list[JobConfig]) -> None:
    os.environ.update(loopback_env(rank, port))
    torch.set_num_threads(1)
    from lorakit.train.job import run_job

    for one in jobs:
        try:
            run_job(one)
        except Exception as err:
            raise RuntimeError(f"rank {rank}, variant {one.variant}: {err}") from err


def spawn_jobs(jobs: list[JobConfig]) -> None:
    """Run ``jobs`` one after another in 2 spawned gloo ranks; raise if a rank fails or time runs out
    (generous: a loaded 2-core machine runs a tiny job in about 20 s)."""
    timeout = 120.0 + 60.0 * len(jobs)
    context = mp.start_processes(
        _run_jobs, args=(free_port(), jobs), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the {WORLD} ranks did not finish within {timeout} s")
