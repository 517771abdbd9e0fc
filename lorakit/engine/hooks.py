"""The variants' hooks at their call points: one object every driver calls in the same order.

The order within one optimizer step (the engine keeps it; a ``transformers.Trainer`` maps its events onto
the same calls)::

    step_start -> [forward, loss + extra_loss, backward] x micro-batches (or DP-SGD's gradient seam)
      -> after_backward -> clip -> before_optimizer -> optimizer.step -> after_step -> scheduler.step
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lorakit.core.variant import Hook


class HookRunner:
    """Calls every hook at one call point; ``extra_loss`` sums their terms (None when there are none)."""

    def __init__(self, hooks: list[Hook]) -> None:
        self.hooks = hooks

    def step_start(self, step: int) -> None:
        for hook in self.hooks:
            hook.on_step_start(step)

    def extra_loss(self, step: int) -> Tensor | None:
        total = None
        for hook in self.hooks:
            extra = hook.extra_loss(step)
            if extra is not None:
                total = extra if total is None else total + extra
        return total

    def after_backward(self, step: int) -> None:
        for hook in self.hooks:
            hook.on_after_backward(step)

    def before_optimizer(self, step: int) -> None:
        for hook in self.hooks:
            hook.on_before_optimizer_step(step)

    def after_step(self, step: int) -> None:
        for hook in self.hooks:
            hook.on_after_step(step)

    def state_dict(self) -> list[dict[str, Any]]:
        return [hook.state_dict() for hook in self.hooks]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for hook, state in zip(self.hooks, states, strict=True):
            hook.load_state_dict(state)
