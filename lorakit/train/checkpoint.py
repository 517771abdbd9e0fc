"""Resumable checkpoints: the engine's (:mod:`lorakit.engine.checkpoint`), named here for the drivers."""

from lorakit.engine.checkpoint import (
    CHECKPOINT_DIR,
    DIVERGED,
    MAY_CHANGE,
    TRAINER_FILE,
    DivergedError,
    ResumeError,
    RunState,
    check_settings_match,
    check_step,
    checkpoint_step,
    grad_norm,
    has_checkpoint,
    restore_checkpoint,
    resume_point,
    run_settings,
    write_checkpoint,
)

__all__ = [
    "CHECKPOINT_DIR",
    "MAY_CHANGE",
    "TRAINER_FILE",
    "ResumeError",
    "RunState",
    "DIVERGED",
    "DivergedError",
    "check_step",
    "check_settings_match",
    "grad_norm",
    "has_checkpoint",
    "checkpoint_step",
    "resume_point",
    "restore_checkpoint",
    "run_settings",
    "write_checkpoint",
]
