"""The typed pieces of the variant <-> driver contract that :class:`lorakit.core.variant.Variant` refers to.

A driver (lorakit's loop, DP-SGD, a ``transformers.Trainer``, a federated client, a distributed run) asks a
variant only through these types and the members of ``Variant``, its config and its ``Hook``; each has a
default, so a variant states only what differs. Nothing here imports a driver: drivers implement
:class:`StageContext` and :class:`GradientSource`, variants implement :class:`Stages`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from lorakit.common.errors import LorakitError
from lorakit.core.config import VariantConfig


class Driver(enum.Enum):
    """The ways of training a variant; a variant that cannot run in one says so before training starts."""

    LOOP = "lorakit's training loop"
    DP_SGD = "DP-SGD"
    TRAINER = "transformers.Trainer"
    FEDERATED = "a federated client"
    DISTRIBUTED = "a distributed (torchrun) run"


class CapabilityError(LorakitError):
    """A variant cannot run in the chosen driver; raised before any training step."""


@dataclass
class Shared:
    """State that every layer built by one ``apply`` call shares, typed per variant (subclass it).

    ``targets`` maps each target module name to its ``(out, in)`` view, in the order the layers are built.
    """

    targets: dict[str, tuple[int, int]] = field(default_factory=dict)


class StageContext(Protocol):
    """What a driver offers a variant's stages before the main run (implemented by the engine).

    Examples are addressed by their index in the run's training data; the stages never see the data's type.
    """

    model: nn.Module  # the adapted model
    seed: int  # the run's seed
    steps: int  # the main run's optimizer steps
    batch_size: int  # examples per micro-batch

    def strata(self) -> list[Hashable]:
        """One stratum per training example (its class label; one shared stratum for per-token labels)."""
        ...

    def train(self, indices: list[int], steps: int) -> None:
        """Train the adapted model for ``steps`` optimizer steps on the examples ``indices`` (the run's
        settings, the variant's hooks, no evaluation or checkpoints)."""
        ...

    def batches(self, indices: list[int]) -> Iterator[dict[str, Tensor]]:
        """Model inputs (labels included) over ``indices`` in order, ``batch_size`` examples at a time."""
        ...

    def config(self) -> VariantConfig:
        """The variant config the model was adapted with."""
        ...

    def reapply(self, config: VariantConfig) -> None:
        """Replace the adapters by fresh ones built from ``config`` and put fully trained modules (a new
        head) back to their state before the stages, so the main run starts from scratch."""
        ...


class Stages:
    """Work a variant does on the training data before the main run (LoRA-drop's module selection).

    ``drivers`` are those whose guarantees the stages keep; every other driver refuses the variant before
    training (DP-SGD's accounting does not cover a data-dependent selection; federated clients would each
    select differently). A distributed run keeps the loop's: it trains the stages data-parallel on the
    global batch of one process and every rank decides the same.
    """

    drivers: frozenset[Driver] = frozenset({Driver.LOOP, Driver.DISTRIBUTED})

    def pending(self, config: VariantConfig) -> bool:
        """Whether the stages still have to run for ``config`` (False once their decision is in it)."""
        return True

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Run every stage; returns what was decided (for the report), JSON-serialisable."""
        raise NotImplementedError(f"{type(self).__name__} must implement run()")  # abstract


class GradientSource:
    """How one optimizer step's gradients are produced: drivers implement this seam, the engine calls it.

    The engine's default backs the task loss plus the hooks' ``extra_loss`` up through every micro-batch;
    DP-SGD supplies per-example clipping and noise instead. :meth:`backward` leaves the step's gradients in
    ``p.grad`` and returns the step's training loss; everything around it (hooks, clipping, optimizer,
    scheduler, checkpoints, progress) stays the engine's.
    """

    clips_globally: bool = True  # the engine then clips the summed gradient to ``TrainConfig.clip``
    releases_loss: bool = True  # the step's loss may be recorded and shown (DP-SGD: it may not)
    tokens: int = 0  # input tokens backed up so far (padding excluded), for the throughput report

    def backward(self, step: int, extra_loss: Callable[[int], Tensor | None]) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement backward()")  # abstract

    def zero_grad(self, optimizer: Any) -> None:
        """Clear the step's gradients (and whatever the source keeps beside them)."""
        optimizer.zero_grad(set_to_none=True)

    def stop_before(self, step: int) -> str | None:
        """Why the run must end before ``step`` (DP-SGD: its privacy budget), or None to go on."""
        return None

    def after_step(self, step: int) -> dict[str, str]:
        """Bookkeeping after a finished step; returns extra progress-bar fields (DP-SGD: epsilon)."""
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint needs to continue this source exactly (the data order), or None."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


@dataclass(frozen=True)
class PeftSpec:
    """How a variant's tensors and settings map onto one PEFT method (``peft_type``).

    ``names``: lorakit parameter attribute -> PEFT key suffix (empty: the method's own layout).
    ``config_fields``: lorakit config field -> PEFT ``adapter_config.json`` field, both ways.
    ``flags``: PEFT config fields that tell this variant apart within its method (DoRA: ``use_dora``); a
    PEFT file loads as the first registered variant of its method whose flags it matches.
    """

    peft_type: str
    names: dict[str, str] = field(default_factory=dict)
    config_fields: dict[str, str] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)
