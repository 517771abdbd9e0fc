"""Two gloo processes on 127.0.0.1 for the distributed tests: a free port, spawned ranks, tiny jobs, and
probes that watch a rank from inside (the files it writes, the batches it trains on, a death at a step)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from lorakit.jobs.config import DataConfig, JobConfig
from lorakit.train.loop import TrainConfig

WORLD = 2
SUBJECTS = ["film", "movie", "story", "plot", "cast", "music", "script", "ending"]
POSITIVE, NEGATIVE = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "dull"]
# Audit events (sys.addaudithook) that change the file system; "open" counts only when it opens for writing.
CHANGES = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.symlink"}


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
    model: Path,
    data: Path,
    out: Path,
    variant: str,
    options: dict,
    batch_size: int,
    mode: str | None,
    quantize: str | None = None,
) -> JobConfig:
    """``steps`` 8 with 2 micro-batches per step; ``batch_size`` per rank (the global batch is world x it)."""
    return JobConfig(
        model=str(model),
        quantize=quantize,
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


@dataclass
class Probes:
    """What to watch inside the ranks. ``writes_under``: record every file-system change below this path;
    ``batches``: record the size of every training micro-batch; ``exit_at``: ``(rank, step)``, that rank
    dies (``os._exit``) as the 0-based optimizer step begins, as a killed process would."""

    writes_under: str | None = None
    batches: bool = False
    exit_at: tuple[int, int] | None = None


@dataclass
class Outcome:
    """One rank's end: ``error`` (``Type: message``; None if every job finished), or ``died`` without one."""

    error: str | None = None
    died: bool = False
    writes: list[str] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)


def _watch_writes(root: str, into: list[str]) -> None:
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & writes)
        else:
            path, writing = (args[0] if args else ""), event in CHANGES
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            where = os.path.abspath(os.fsdecode(path))
            if where.startswith(root):
                into.append(f"{event} {where}")

    sys.addaudithook(audit)


def _install(probes: Probes, rank: int, outcome: Outcome) -> None:
    from lorakit.engine.gradients import LossBackward
    from lorakit.engine.run import Engine

    if probes.writes_under is not None:
        _watch_writes(os.path.abspath(probes.writes_under), outcome.writes)
    if probes.batches:
        run_model = LossBackward.run_model

        def counted(self: LossBackward, batch: dict, device: torch.device, step: int) -> Any:
            outcome.batches.append(len(batch["labels"]))
            return run_model(self, batch, device, step)

        LossBackward.run_model = counted  # type: ignore[method-assign]
    if probes.exit_at is not None and probes.exit_at[0] == rank:
        step_fn, dies_at = Engine.step, probes.exit_at[1]

        def dying(self: Engine, step: int, gradients: Any) -> float:
            if step == dies_at:
                os._exit(1)
            return step_fn(self, step, gradients)

        Engine.step = dying  # type: ignore[method-assign]


def _rank(rank: int, port: int, work: Callable[[int], None], probes: Probes, results: str) -> None:
    os.environ.update(loopback_env(rank, port))
    torch.set_num_threads(1)
    outcome = Outcome()
    _install(probes, rank, outcome)
    try:
        work(rank)
    except Exception as err:  # noqa: BLE001 - the test reads it
        outcome.error = f"{type(err).__name__}: {err}"
    Path(results, f"rank{rank}.json").write_text(json.dumps(outcome.__dict__))


class Jobs:
    """The jobs each rank runs, one after another (a picklable callable for the spawned ranks)."""

    def __init__(self, per_rank: list[list[JobConfig]]) -> None:
        self.per_rank = per_rank

    def __call__(self, rank: int) -> None:
        from lorakit.jobs.job import run_job

        for one in self.per_rank[rank]:
            run_job(one)


def run_ranks(
    work: Callable[[int], None], probes: Probes | None = None, timeout: float = 180.0
) -> list[Outcome]:
    """``work(rank)`` in 2 spawned gloo ranks (independent processes: one dying does not stop the other);
    each rank's :class:`Outcome`. Raises if time runs out (generous: a loaded 2-core machine runs a tiny
    job in about 20 s)."""
    context = mp.get_context("spawn")
    port, results = free_port(), tempfile.mkdtemp(prefix="lorakit-ranks-")
    processes = [
        context.Process(target=_rank, args=(rank, port, work, probes or Probes(), results))
        for rank in range(WORLD)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.1, deadline - time.monotonic()))
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
        process.join()
    if alive:
        raise TimeoutError(f"the {WORLD} ranks did not finish within {timeout} s")
    outcomes = []
    for rank in range(WORLD):
        path = Path(results, f"rank{rank}.json")
        outcomes.append(Outcome(**json.loads(path.read_text())) if path.exists() else Outcome(died=True))
    shutil.rmtree(results, ignore_errors=True)
    return outcomes


def spawn_jobs(jobs: list[JobConfig], probes: Probes | None = None) -> list[Outcome]:
    """Run ``jobs`` one after another in 2 spawned gloo ranks; raise if a rank fails."""
    outcomes = run_ranks(Jobs([jobs] * WORLD), probes, timeout=120.0 + 60.0 * len(jobs))
    failed = [f"rank {r}: {o.error or 'died'}" for r, o in enumerate(outcomes) if o.error or o.died]
    if failed:
        raise RuntimeError("; ".join(failed))
    return outcomes


class BufferBroadcasts:
    """Whether DDP broadcasts buffers: on each rank a 4-bit base under DDP; rank 1 flips one packed code after
    wrapping, and after two training steps must still hold its own codes (raises AssertionError if not)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = str(model_dir)

    def __call__(self, rank: int) -> None:
        import lorakit
        from lorakit.distributed import join
        from lorakit.jobs.models import load_model

        group = join("ddp")
        model, _ = load_model(self.model_dir, "classification")
        lorakit.apply(model, "qlora", targets=["query", "value"], rank=4, compute_dtype="float32")
        forward = group.attach(model)
        packed = lorakit.adapted_layers(model)[0][1].base_layer.weight_packed
        if rank == 1:
            packed[0] ^= 1
        held = packed.clone()
        batch = {"input_ids": torch.randint(5, 90, (2, 6)), "labels": torch.tensor([0, 1])}
        for _ in range(2):
            forward(**batch).loss.backward()
        assert torch.equal(packed, held), f"rank {rank}'s frozen buffer was overwritten"
