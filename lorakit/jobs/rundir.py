"""A training run's output directory: one run writes it at a time, and its files change only once the run has
produced a complete adapter.

A run holds the directory's lock (:func:`exclusive`, :mod:`lorakit.common.dirlock`) from its start to its end,
so a second run into it, with ``--overwrite`` or without, is refused at its start naming the running one.
Then, before anything is written, :func:`open_run_dir` checks that the run may use the directory (an adapter
there is replaced only with ``overwrite``; ``resume`` needs an interrupted run's checkpoint; no other files
are in the way; the place is writable). The run then writes beside it, into ``.NAME.lorakit-new`` in the same
parent: its checkpoints, then ``job.json`` and the adapter. Only then is the directory swapped for the new one
(:mod:`lorakit.common.dirswap`), so ``eval``, ``merge`` and ``export`` of the previous adapter keep working
whatever happens to the new run. A run that fails keeps its directory only if it holds a checkpoint to resume
from.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lorakit.common.dirlock as dirlock
from lorakit.adapters.io import CONFIG_FILE, WEIGHTS_FILE
from lorakit.common.dirswap import finish_swap, siblings, swap_in
from lorakit.common.errors import LorakitError
from lorakit.train.checkpoint import CHECKPOINT_DIR, has_checkpoint

JOB_FILE = "job.json"
METRICS_FILE = "metrics.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # the chat template a causal-LM run rendered its data in
EVAL_DIR = "eval"  # where `lorakit eval` writes by default: the run's own evaluation, replaced with the run
GENERATIONS_FILE = "generations.jsonl"
EVAL_FILES = (METRICS_FILE, GENERATIONS_FILE)  # what `lorakit eval` writes, in EVAL_DIR or its --out
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, JOB_FILE, METRICS_FILE, CHAT_TEMPLATE_FILE, CHECKPOINT_DIR, EVAL_DIR)


class OutputDirError(LorakitError):
    """The output directory cannot be used as asked; the message names the fix."""


@dataclass
class RunDir:
    """Where a run's result goes (``path``), where it is built (``staging``), and what it may replace."""

    path: Path  # absolute
    shown: str  # as the user gave it, for messages
    created: Path | None = None  # the topmost directory this run created, removed again if the run fails

    @property
    def staging(self) -> Path:
        return siblings(self.path)[0]


@contextlib.contextmanager
def exclusive(output_dir: str | os.PathLike[str], command: str = "lorakit train") -> Iterator[None]:
    """Hold the lock of the run directory ``output_dir`` for the whole block: the one process that writes it
    (under torchrun, rank 0) calls this around the run; ``command`` is named to a second one."""
    run = run_path(output_dir)
    with dirlock.exclusive(run.path, f"--output-dir {run.shown}", command):
        yield


def locate(output_dir: str | os.PathLike[str]) -> RunDir:
    """Where a run with ``output_dir`` puts its result and builds it; reads only symlinks (a distributed run's
    other ranks use this, rank 0 alone opens the directory with :func:`open_run_dir`)."""
    return RunDir(dirlock.real_path(output_dir), str(output_dir))


def interrupted_run(output_dir: str | os.PathLike[str]) -> bool:
    """Whether ``output_dir`` has an interrupted run with a checkpoint to resume (``--resume auto``); reads
    only (refuses what :func:`run_path` refuses)."""
    return has_checkpoint(run_path(output_dir).staging)


def run_path(output_dir: str | os.PathLike[str]) -> RunDir:
    """``output_dir`` as a place a run can be swapped into; refuses the root, ``.``, a file, or a directory
    holding the current one. Reads nothing inside it and writes nothing."""
    shown = str(output_dir)
    path = dirlock.real_path(output_dir)  # through a symlink: the directory it points to is swapped
    if path.parent == path or Path(output_dir).expanduser().absolute().name in ("", ".", ".."):
        raise OutputDirError(
            f"--output-dir {shown} cannot hold a run; name a new directory such as runs/my-run"
        )
    if Path.cwd().is_relative_to(path):
        raise OutputDirError(
            f"--output-dir {shown} is the current directory or contains it; a run replaces its output "
            "directory as a whole, so name a new directory such as runs/my-run"
        )
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--output-dir {shown} is a file; name a directory")
    _check_writable(RunDir(path, shown))
    return RunDir(path, shown)


def open_run_dir(
    output_dir: str | os.PathLike[str], *, overwrite: bool, resume: bool, resumable: bool = True
) -> RunDir:
    """Check that a run may write its result to ``output_dir``; writes nothing (ends an interrupted swap).
    ``resumable``: whether the command offers ``--resume`` (``lorakit federate`` does not)."""
    run = run_path(output_dir)
    path, shown = run.path, run.shown
    finish_swap(path, lambda d: (d / CONFIG_FILE).is_file())  # a kill while an earlier run was swapped in
    _check_only_run_files(run)
    interrupted = has_checkpoint(run.staging)
    if resume and not interrupted:
        finished = " It holds a finished run: steps cannot change on resume (the schedules depend on them), "
        raise OutputDirError(
            f"nothing to resume in {shown}: no interrupted run with a checkpoint."
            + (finished if (path / CONFIG_FILE).is_file() else " ")
            + "train without --resume (with --overwrite to replace an adapter); --checkpoint-every N makes "
            "a run resumable"
        )
    if not resume and (path / CONFIG_FILE).is_file() and not overwrite:
        to_continue = "--resume to continue the interrupted run, " if resumable and interrupted else ""
        raise OutputDirError(
            f"{shown} already holds a trained adapter; pass --overwrite to replace it, {to_continue}"
            "or choose another --output-dir"
        )
    if not resume and interrupted and not overwrite:
        raise OutputDirError(
            f"{shown} has an interrupted run with a checkpoint ({run.staging / CHECKPOINT_DIR}); pass "
            "--resume to continue it, or --overwrite to discard it"
        )
    return run


def begin(run: RunDir, *, resume: bool) -> Path:
    """Create (or, resuming, keep) the staging directory; returns it."""
    if resume:
        return run.staging
    shutil.rmtree(run.staging, ignore_errors=True)  # an earlier run's leftovers, refused above if resumable
    run.created = dirlock.make_parents(run.path.parent)
    run.staging.mkdir()
    return run.staging


def abandon(run: RunDir) -> None:
    """After a failed run: keep the staging directory if it holds a checkpoint, else remove all it created."""
    if has_checkpoint(run.staging):
        return
    shutil.rmtree(run.staging, ignore_errors=True)
    dirlock.remove_empty_parents(run.path.parent, run.created)


def holds_adapter(run: RunDir) -> bool:
    """Whether the output directory holds a finished run's adapter (an earlier run's, while this one runs)."""
    return (run.path / CONFIG_FILE).is_file()


def commit(run: RunDir) -> None:
    """Swap the finished staging directory in for the output directory."""
    _check_only_run_files(run)  # files that appeared during training would be deleted with the old copy
    swap_in(run.path)


def _check_writable(run: RunDir) -> None:
    anchor = run.path.parent
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OutputDirError(f"--output-dir {run.shown}: {anchor} is a file, not a directory")
    for place in (anchor, run.path) if run.path.exists() else (anchor,):
        if not os.access(place, os.W_OK | os.X_OK):
            raise OutputDirError(f"cannot write in {place}; choose a writable --output-dir")


def _check_only_run_files(run: RunDir) -> None:
    if not run.path.is_dir():
        return
    others = sorted(e.name for e in run.path.iterdir() if not _is_run_file(e.name))
    evaluation = run.path / EVAL_DIR
    if evaluation.is_dir():  # the run's own evaluation only: another run's, or a file of one's own, is kept
        others += sorted(
            f"{EVAL_DIR}/{e.name}" for e in evaluation.iterdir() if not _is_written_by(e.name, EVAL_FILES)
        )
    if others:
        listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise OutputDirError(
            f"{run.shown} holds files that are not from a lorakit run ({listed}); a run replaces its output "
            "directory as a whole, so choose an empty or new --output-dir"
        )
    # Names alone prove nothing: files named as a run's, without the adapter and job files every finished
    # run writes, may be someone's own (a metrics.json, an eval/ of another tool).
    proved = (run.path / CONFIG_FILE).is_file() or (run.path / JOB_FILE).is_file()
    named = sorted(e.name for e in run.path.iterdir() if e.name in RUN_FILES)
    if named and not proved:
        raise OutputDirError(
            f"{run.shown} holds {', '.join(named)} but no {CONFIG_FILE} or {JOB_FILE} of a lorakit run, so "
            "they may be files of your own, which a run would replace; choose an empty or new --output-dir"
        )


def _is_run_file(name: str) -> bool:
    """A file or directory a run writes, including leftovers of writes a kill interrupted."""
    return _is_written_by(name, RUN_FILES)


# A leftover of a write a kill interrupted, after ``.NAME.``: a swap copy, or tempfile's eight characters.
_LEFTOVER = r"(lorakit-new|lorakit-old|[a-z0-9_]{8})"


def _is_written_by(name: str, known: tuple[str, ...]) -> bool:
    """``name`` is one of ``known``, or the atomic-write temporary (``tempfile``'s eight random characters)
    or swap copy of one; a file of one's own named after one (an editor's ``.job.json.swp``) is not."""
    return name in known or any(re.fullmatch(rf"\.{re.escape(k)}\.{_LEFTOVER}", name) for k in known)


def part_of_run(target: Path) -> tuple[Path, str] | None:
    """``(run, entry)`` where ``target`` is a lorakit run directory (``entry`` empty) or lies in one of the
    entries a run writes (its checkpoint folder, ``eval``...), which a re-run or ``--resume`` replaces;
    None elsewhere (a new folder inside a run is left alone: a re-run refuses to replace a directory holding
    it)."""
    runs = [d for d in (target, *target.parents) if (d / CONFIG_FILE).is_file() or (d / JOB_FILE).is_file()]
    if not runs:
        return None
    run = runs[-1]  # the outermost: a checkpoint folder inside a run holds an adapter.json too
    if target == run:
        return run, ""
    entry = target.relative_to(run).parts[0]
    return (run, entry) if _is_run_file(entry) else None
