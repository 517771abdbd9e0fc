"""The variants' hooks at their call points: one object every driver calls in the same order.

The order within one optimizer step (the engine keeps it; a ``transformers.Trainer`` maps its events onto
the same calls)::

    step_start -> [forward, loss + extra_loss, backward] x micro-batches (or DP-SGD's gradient seam)
      -> after_backward -> clip -> before_optimizer -> optimizer.step -> after_step -> scheduler.step
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lorakit.common.errors import SettingError
from lorakit.core.variant import Hook


def with_user_hooks(own: list[Hook], user: list[Hook]) -> list[Hook]:
    """The variant's own hooks, then the user's: a user's hook adds to the variant's rules and never replaces
    them. A user hook of the same class as one of the variant's would run those rules twice: refused."""
    classes = {type(hook) for hook in own}
    twice = [type(hook).__name__ for hook in user if type(hook) in classes]
    if twice:
        raise SettingError(
            f"hooks holds {twice[0]}, which the variant declares and the engine already runs; "
            "pass only your own hooks (they run after the variant's at every call point)"
        )
    return [*own, *user]


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
