"""Resumable checkpoints: written crash-safely, restored from the newest complete copy, checked on resume.

A checkpoint is a directory holding the adapter (``adapter.json`` + ``adapter.safetensors``) and
``trainer.pt`` (step, losses, optimizer, scheduler, hook and data-order state, random generators, and the
settings the run must keep). ``trainer.pt`` is written last and atomically, so a directory that holds it and
the two adapter files is complete.

A new checkpoint is built beside the live one and swapped in with renames (:mod:`lorakit.common.dirswap`). A
kill between any two steps leaves at least one complete copy; :func:`restore_checkpoint` takes the newest
complete one (highest step), and the next write first puts a complete copy live before it deletes anything, so
a kill at any point, also during the cleanup after an earlier kill, leaves a resume point.

Resuming continues the same run: it must give the same adapter as a run that was never interrupted. So every
setting that changes the numbers is recorded in the checkpoint and compared on resume; a change is refused
with the setting's name and the checkpoint's value. Only the settings in :data:`MAY_CHANGE` (how often to
evaluate, checkpoint or draw progress; where evaluation data comes from) may differ. ``steps`` may not: the
learning-rate schedule and the variants' schedules (AdaLoRA's budget, Delta-LoRA's start) depend on it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapters.api import info
from lorakit.adapters.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterFileError,
    NonFiniteError,
    atomic_write,
    file_in_the_way,
    fill_tensors,
    load_tensors,
    save,
)
from lorakit.common.dirswap import finish_swap, siblings, swap_in
from lorakit.common.errors import DiskFullError, LorakitError, OutputExistsError, is_disk_full
from lorakit.core.contract import GradientSource
from lorakit.core.variant import Hook

CHECKPOINT_DIR = "checkpoint"
TRAINER_FILE = "trainer.pt"
DIVERGED = 1000.0  # a loss this many times the first step's (and above this) stops training
# Settings that only change what is observed or where it is written, never the trained numbers.
MAY_CHANGE = frozenset(
    {
        "progress",
        "eval_every",
        "checkpoint_every",
        "eval_data",
        "eval_batch_size",
        "eval_data_fingerprint",
        "output_dir",
        "overwrite",
        "resume",
    }
)


# Settings a checkpoint records that follow from others (the base and its storage, the targets, the data and
# how it is tokenised): compared last, so the setting that changed them is the one named.
DERIVED = {  # a recorded value made from settings, with the settings it is made from
    "base_fingerprint": "the base model's weights (--model, --quantize)",
    "adapted_layers": "the adapted layers (--model, --targets)",
    "training_data": "the training examples (--data, its columns, --max-length, --chat-template)",
}


class DivergedError(LorakitError):
    """The training loss grew far beyond its start; the message names the step and what was kept."""


class ResumeError(LorakitError):
    """A run cannot resume: no checkpoint, an unreadable one, or settings that differ from its settings."""


@dataclass
class RunState:
    """Everything a checkpoint saves and a resume restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    hooks: list[Hook]
    gradients: GradientSource  # its state_dict resumes what it draws (the data order)
    result: Any  # lorakit.train.loop.TrainResult: steps, seconds, losses


def write_checkpoint(run: RunState, output_dir: Path, settings: dict[str, Any]) -> None:
    """Write ``output_dir/checkpoint`` so that a kill at any point leaves a complete copy to resume from."""
    final = output_dir / CHECKPOINT_DIR
    finish_swap(final, _complete)  # after a kill during an earlier swap: a complete copy goes live first
    tmp, _ = siblings(final)
    shutil.rmtree(tmp, ignore_errors=True)  # unfinished, or older than the live copy
    try:
        _write_copy(run, tmp, settings)
    except (OSError, LorakitError) as err:
        if not is_disk_full(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the partial copy: its space back, the live copy untouched
        raise DiskFullError(
            f"no space left on {output_dir}: the checkpoint of step {run.result.steps} was not written; "
            f"{resume_point(output_dir)}"
        ) from None
    swap_in(final)


def resume_point(output_dir: Path) -> str:
    """What a run stopped by a full disk can continue from, in words, with how to continue."""
    step = checkpoint_step(output_dir)
    if step is None:
        return "no checkpoint is kept: free space and train again"
    return (
        f"the checkpoint of step {step} is kept in {output_dir}: free space, then --resume continues from it"
    )


def checkpoint_step(output_dir: Path) -> int | None:
    """The step of the newest complete, readable checkpoint in ``output_dir`` (None: there is none)."""
    steps = []
    for copy in filter(_complete, _copies(output_dir)):
        with contextlib.suppress(Exception):  # a damaged copy is not a resume point
            steps.append(_trainer_state(copy / TRAINER_FILE)["step"])
    return max(steps) if steps else None


# What a checkpoint's trainer state holds (written by :func:`_write_copy`), by key: the types it must have.
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "seconds": (int, float),
    "losses": (Tensor,),
    "optimizer": (dict,),
    "scheduler": (dict,),
    "hooks": (list,),
    "rng": (Tensor,),
    "batches": (dict, type(None)),
}


def _trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state in ``path``, read as tensors and plain values only; ``ValueError`` when it is not
    one :func:`_write_copy` wrote (another program's file of the same name, an edited one)."""
    state = torch.load(path, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not lorakit's trainer state")
    for key, types in _STATE_TYPES.items():
        if not isinstance(state.get(key), types) or isinstance(state.get(key), bool):
            raise ValueError(f"its '{key}' is missing or not a {' or '.join(t.__name__ for t in types)}")
    return state


def _write_copy(run: RunState, tmp: Path, settings: dict[str, Any]) -> None:
    save(run.model, tmp)
    state = {
        "step": run.result.steps,
        "seconds": run.result.seconds,
        "tokens": run.result.tokens,
        "losses": torch.tensor(run.result.losses, dtype=torch.float64),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "hooks": [h.state_dict() for h in run.hooks],
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "batches": run.gradients.state_dict(),
        "settings": json.dumps(settings, default=str),
    }
    # serialised here and written by Python's file calls: a full disk is an OSError naming ENOSPC, not torch's
    # "unexpected pos"; written last, it marks the copy complete
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(tmp / TRAINER_FILE, lambda path: Path(path).write_bytes(buffer.getvalue()))


def check_checkpoint_dir(output_dir: Path, *, replaces: bool) -> None:
    """Before a run that writes checkpoints into ``output_dir``: refuse a path that is a file (or lies under
    one), before any step instead of at the first checkpoint, and (``replaces``: a run that neither resumes
    nor was told to overwrite) a directory holding an earlier run's checkpoint, which it would replace."""
    blocking = file_in_the_way(output_dir)
    if blocking is not None:
        raise ResumeError(f"output_dir {output_dir}: {blocking} is a file; name a directory for checkpoints")
    if replaces and has_checkpoint(output_dir):
        raise OutputExistsError(
            f"output_dir {output_dir} holds a checkpoint of an earlier run ({output_dir / CHECKPOINT_DIR}); "
            "pass resume=True to continue it, overwrite=True to replace it, or choose another output_dir"
        )


def has_checkpoint(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds a complete checkpoint copy (live, or left by an interrupted swap)."""
    return any(_complete(copy) for copy in _copies(output_dir))


def restore_checkpoint(run: RunState, output_dir: Path, settings: dict[str, Any]) -> int:
    """Load the newest complete checkpoint in ``output_dir`` into ``run``; returns the step to continue from.

    Refuses (:class:`ResumeError`) when there is none, or when ``settings`` differ from those it was written
    with in anything outside :data:`MAY_CHANGE`.
    """
    found = []
    for copy in filter(_complete, _copies(output_dir)):
        try:
            found.append((_trainer_state(copy / TRAINER_FILE), copy))
        except Exception as err:  # noqa: BLE001 - a damaged copy: fall back to another complete one
            damaged = f"{copy / TRAINER_FILE} ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
            found.append((None, damaged))
    readable = [(state, copy) for state, copy in found if state is not None]
    if not readable:
        detail = f"; unreadable: {', '.join(str(c) for _, c in found)}" if found else ""
        raise ResumeError(
            f"no checkpoint to resume in {output_dir}{detail}; train without --resume "
            "(and with --checkpoint-every N to be able to resume)"
        )
    state, copy = max(readable, key=lambda item: item[0]["step"])
    if "settings" in state:  # checkpoints written before settings were recorded are taken as they are
        check_settings_match(json.loads(state["settings"]), settings, copy)
    try:
        tensors = load_tensors(copy)
    except AdapterFileError as err:  # the checkpoint's adapter is damaged: only a new run helps
        what = str(err).split("; re-save")[0]  # the advice for a saved adapter does not apply here
        raise ResumeError(
            f"cannot resume from {copy}: {what}; the checkpoint cannot be used: start a new run (--overwrite "
            "or another --output-dir)"
        ) from None
    fill_tensors(run.model, tensors)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        for hook, hook_state in zip(run.hooks, state["hooks"], strict=True):
            hook.load_state_dict(hook_state)
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state["batches"] is not None:
            run.gradients.load_state_dict(state["batches"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:  # an edited or foreign state
        detail = " ".join(str(err).split())[:200]
        raise ResumeError(
            f"cannot resume from {copy}: its trainer state does not fit this run ({type(err).__name__}: "
            f"{detail}); start a new run (--overwrite or another --output-dir)"
        ) from None
    run.result.losses = state["losses"].tolist()
    run.result.seconds = state["seconds"]
    run.result.tokens = state.get("tokens", 0)  # a checkpoint written before tokens were counted: 0
    run.result.steps = state["step"]
    return state["step"]


def check_settings_match(saved: dict[str, Any], current: dict[str, Any], where: Path | str) -> None:
    """Raise :class:`ResumeError` naming the first setting (outside :data:`MAY_CHANGE`) that differs; the
    settings a user sets come before those derived from them (:data:`DERIVED`), so a changed ``--quantize``
    is named as such and not as the base fingerprint it changes."""
    for name in sorted(set(saved) | set(current), key=lambda name: (name in DERIVED, name)):
        if name in MAY_CHANGE:
            continue
        old, new = saved.get(name, "(not recorded)"), current.get(name, "(not recorded)")
        if _same(old, new):
            continue
        if name in DERIVED:  # values too long to read, made from settings the user gave: name those
            raise ResumeError(
                f"cannot resume from {where}: {DERIVED[name]} differ from the checkpoint's ({name}); resume "
                "with the settings it was trained with, or start a new run (--overwrite or another "
                "--output-dir)"
            )
        now, then = ("unset" if new is None else _show(new, name)), _show(old, name)
        raise ResumeError(
            f"cannot resume from {where}: setting {name} is {now} but the checkpoint was trained with "
            f"{then}; resume with {then}, or start a new run (--overwrite or another --output-dir)"
        )


def run_settings(cfg: Any, model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint records: the training config, the adapter's config and base, and ``extra``."""
    state = info(model)
    settings: dict[str, Any] = dict(vars(cfg))
    settings.update({k: v for k, v in state.config.to_dict().items() if k != "targets"})
    settings.update(variant=state.variant, adapted_layers=state.targets, base_fingerprint=state.fingerprint)
    settings.update(extra or {})
    return json.loads(json.dumps(settings, default=str))  # the form it is stored in


def check_step(
    step: int,
    loss: float | None,
    grad_norm: Tensor | None,
    first_loss: float | None,
    output_dir: Path | None,
    kept: str | None = None,
) -> None:
    """Stop training before the optimizer step at (0-based) ``step`` if its numbers are unusable.

    :class:`NonFiniteError` for a NaN or infinite loss or gradient norm; :class:`DivergedError` for a loss
    over :data:`DIVERGED` times the first step's (and over :data:`DIVERGED`): a run that far gone (a learning
    rate of 1e6 gives losses near 1e8) cannot recover, and its adapter would only look like a result.
    ``loss`` None: only the gradient is checked (a driver that does not see or may not release the loss).
    ``kept``: what the message says was kept (default: lorakit's checkpoint in ``output_dir``, if any).
    """
    error: type[LorakitError] = NonFiniteError
    if loss is not None and not math.isfinite(loss):
        what = f"the loss is {loss} (not finite)"
    elif grad_norm is not None and not torch.isfinite(grad_norm):
        what = f"the gradient norm is {grad_norm.item()} (not finite)"
    elif loss is not None and first_loss is not None and loss > DIVERGED * max(first_loss, 1.0):
        what = f"the loss is {loss:.4g}, over {DIVERGED:g} times the first step's {first_loss:.4g} (diverged)"
        error = DivergedError
    else:
        return
    if kept is None:
        kept = "no checkpoint was written, nothing was saved"
        if output_dir is not None and has_checkpoint(output_dir):
            kept = f"the last good checkpoint is kept in {output_dir / CHECKPOINT_DIR}"
    raise error(
        f"training stopped at step {step + 1}: {what}; {kept}. Lower --lr, or check settings such as --alpha "
        "and the data, then train again"
    )


def grad_norm(params: Iterable[Tensor]) -> Tensor:
    """The total L2 norm of the gradients (NaN or inf if any gradient is)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _copies(output_dir: Path) -> tuple[Path, ...]:
    """The live checkpoint, the one being built, and the one being replaced."""
    final = output_dir / CHECKPOINT_DIR
    return (final, *siblings(final))


def _complete(copy: Path) -> bool:
    return all((copy / name).is_file() for name in (TRAINER_FILE, CONFIG_FILE, WEIGHTS_FILE))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _show(value: Any, name: str) -> str:
    if value is None:  # an optional setting left unset (e.g. no --quantize)
        return f"{name} unset"
    return value if isinstance(value, str) and value.startswith("(") else repr(value)
