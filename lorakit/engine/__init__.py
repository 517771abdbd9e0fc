"""The training engine shared by every driver: step order, optimizer and schedule, accumulation, clipping,
precision, checkpoints and progress (:mod:`lorakit.engine.run`), with the seams drivers fill in: how gradients
are produced (:class:`lorakit.core.contract.GradientSource`) and where processes run
(:class:`lorakit.engine.placement.Placement`)."""

from lorakit.engine.config import TrainConfig, TrainResult, lr_lambda
from lorakit.engine.gradients import LossBackward
from lorakit.engine.hooks import HookRunner
from lorakit.engine.placement import LOCAL, Placement
from lorakit.engine.run import Engine, progress_bar

__all__ = [
    "LOCAL",
    "Engine",
    "HookRunner",
    "LossBackward",
    "Placement",
    "TrainConfig",
    "TrainResult",
    "lr_lambda",
    "progress_bar",
]
