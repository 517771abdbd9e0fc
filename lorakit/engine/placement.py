"""Where a run's processes are: the seam a distributed run (torchrun with DDP or FSDP2) fills in.

A single process needs none of it. A distributed placement wraps the model for its forward and backward,
gives each process its shard of the batches, averages what is reported across processes, and lets only
rank 0 write checkpoints and draw progress; the engine calls these and nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from lorakit.core.contract import Driver


class Placement:
    """One process on one device (the default): every method is the identity."""

    is_writer: bool = True  # this process writes checkpoints and reports and shows progress (rank 0)
    driver: Driver = Driver.LOOP  # what lorakit's loop in this placement is to a variant (its refusal)

    def begin(self, model: nn.Module) -> None:
        """Before a run's first step, with the adapted ``model``: a distributed run gives every process rank
        0's adapter here (nothing to do in one process)."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the forward and backward run through (DDP/FSDP2 wrap the adapted model, or the module
        that runs it to its loss, here)."""
        return model

    def shard(self, batches: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        """This process's batches (a distributed run gives each rank its own part)."""
        return batches

    def reduce_loss(self, loss: float) -> float:
        """The step's loss as reported: the mean over processes in a distributed run. Called right after
        the step's backward, before any hook or the clip reads a gradient, so gradients can be averaged in
        the same collective."""
        return loss

    def processes(self) -> int:
        """How many processes average their gradients (their losses are divided accordingly)."""
        return 1

    def total(self, value: int) -> int:
        """The sum of ``value`` over processes (a step's labelled tokens, by which its loss is divided)."""
        return value

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager[None]:
        """Context for one micro-batch's forward and backward; ``last``: the step's last one. A distributed
        run averages gradients across processes only there: the earlier micro-batches accumulate locally,
        and averaging their sum once equals averaging each (``grad_accum - 1`` fewer all-reduces a step)."""
        return contextlib.nullcontext()

    def for_stages(self) -> Placement:
        """Where a variant's stages before the main run (LoRA-drop's selection) train: here, in one process;
        a distributed run trains them data-parallel before it wraps the model."""
        return self

    def lost_peer(self, err: BaseException) -> bool:
        """Whether ``err`` is a collective that another process's failure broke, not an error of this
        process's own (never, in one process)."""
        return False

    def barrier(self) -> None:
        """Wait for every process (before reading what rank 0 wrote)."""

    def step_seed(self, seed: int, step: int) -> int | None:
        """A seed for the global random generator at the start of ``step`` (None: keep its stream).

        One process keeps the stream seeded once (a checkpoint stores and restores it). Processes that share
        a seed would draw the same dropout masks for different examples: a distributed run reseeds every
        step from ``(seed, rank, step)``, which also makes a resumed run draw what the uninterrupted one
        drew. Rules that must agree across processes (DyLoRA's rank) use their own seeded generators."""
        return None


LOCAL = Placement()
