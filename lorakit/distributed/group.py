"""The process group of a run launched by ``torchrun``: who am I, how many are we, and what only rank 0 does.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; the group
is PyTorch's own (``torch.distributed``), with the NCCL backend on GPUs and gloo on CPUs. Only rank 0 writes
(checkpoints, adapters, metrics, the progress bar); every rank reads.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import lorakit
from lorakit.common.errors import LorakitError
from lorakit.core.contract import Driver
from lorakit.data.datasets import TokenizedData, check_one_step
from lorakit.distributed.failures import brief, peer_failed
from lorakit.distributed.sharding import ShardedBatchSampler
from lorakit.distributed.sync import StagePlacement, match_rank_0
from lorakit.engine.placement import Placement

if TYPE_CHECKING:
    from lorakit.adapters.summary import Summary
    from lorakit.distributed.wrap import KeepLocal

MODES = ("ddp", "fsdp")
T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def writes_files() -> bool:
    """Whether this process may write files: always in a single process, only on rank 0 under torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Distributed(Placement):
    """This process's place in a data-parallel run, and the operations the training engine asks of it (the
    engine's :class:`~lorakit.engine.placement.Placement`: wrap the model, average the loss, let rank 0
    write). Batches come already sharded (:meth:`sampler`)."""

    mode: str  # 'ddp' (replicated model) or 'fsdp' (FSDP2: frozen base sharded, see lorakit.distributed.wrap)
    rank: int
    world_size: int
    device: torch.device
    _attached: tuple[nn.Module, nn.Module, KeepLocal] | None = field(default=None, repr=False)
    counts: Summary | None = field(default=None, repr=False)  # the model's parameter counts as trained
    driver = Driver.DISTRIBUTED  # a class attribute, not a field: variants may refuse a distributed run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_writer(self) -> bool:  # type: ignore[override]
        return self.is_main

    def begin(self, model: nn.Module) -> None:
        # every rank starts from rank 0's adapter; the counts before FSDP2 makes 4-bit storage parameters
        match_rank_0(model, self.world_size)
        self.counts = lorakit.summary(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return self.attach(model)

    def reduce_loss(self, loss: float) -> float:
        return self.mean(loss)

    def step_seed(self, seed: int, step: int) -> int | None:
        # Distinct per rank and per step, deterministic in (seed, rank, step); see Placement.step_seed.
        # SeedSequence mixes the three into well-spread bits (no overflow or collisions from arithmetic).
        return int(np.random.SeedSequence([seed, self.rank, step]).generate_state(1, np.uint64)[0] >> 1)

    def place(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to this rank's device (its own GPU under NCCL; the CPU under gloo)."""
        return model.to(self.device)

    def sampler(
        self,
        data: TokenizedData,
        batch_size: int,
        seed: int,
        group_by_length: bool = False,
        grad_accum: int = 1,
    ) -> ShardedBatchSampler:
        """This rank's share of each global micro-batch of ``batch_size * world_size`` examples; refused for
        data with fewer examples than one step's global batch (``grad_accum`` such micro-batches)."""
        check_one_step(len(data), batch_size, grad_accum, self.world_size)
        return ShardedBatchSampler(data, batch_size, seed, self.rank, self.world_size, group_by_length)

    def for_stages(self) -> Placement:
        # A variant's stages train data-parallel on the unwrapped model (lorakit.distributed.sync).
        return StagePlacement(self)

    def attach(self, model: nn.Module) -> nn.Module:
        """The module to run forward and backward on: the DDP wrapper, or ``model`` sharded in place by FSDP2
        (with its replicated trainable tensors' gradients averaged in backward). Wraps ``model`` once;
        attaching it again returns the same module."""
        from lorakit.distributed.wrap import wrap

        if self._attached is None or self._attached[0] is not model:
            self._attached = (model, *wrap(model, self))
        return self._attached[1]

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager[None]:
        # DDP's no_sync, or the FSDP2 path's averaging paused; see Placement.micro_batch.
        if last or self._attached is None:
            return contextlib.nullcontext()
        return self._attached[2]()

    def lost_peer(self, err: BaseException) -> bool:
        return peer_failed(err)

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has created the run's staging directory)."""
        dist.barrier()

    def on_main(self, decide: Callable[[], T]) -> T:
        """``decide()`` on rank 0 alone (it looks at or changes files, as only rank 0 may); every rank gets
        its result, or raises the error it raised, so all stop with the same line. The result travels
        pickled between the run's own processes: plain values only."""
        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome[0] = (True, decide())
            except Exception as err:  # noqa: BLE001 - raised below, on every rank
                outcome[0] = (False, err)
        dist.broadcast_object_list(outcome, src=0)
        done, value = outcome[0]
        if not done:
            raise value
        return value

    def processes(self) -> int:
        return self.world_size

    def total(self, value: int) -> int:
        count = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(count)
        return int(count.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all ranks (the logged loss is the global batch's)."""
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total.item()) / self.world_size


class LaunchError(LorakitError):
    """The processes were launched in a way the job cannot run in; the message shows the launch that works."""


def check_one_process(
    fix: str = "add --distributed ddp (or fsdp), or run a single process without torchrun",
) -> None:
    """Refuse a job without ``--distributed`` in one of several processes torchrun started: each would run
    the whole job into the same output directory, racing the others' files. ``fix``: what to do instead."""
    world = os.environ.get("WORLD_SIZE", "1").strip()
    if world.isdigit() and int(world) > 1:
        raise LaunchError(
            f"this process is one of {world} that torchrun started (WORLD_SIZE={world}) but the job is not "
            f"distributed, so each would run the whole job into the same --output-dir; {fix}"
        )


def _check_launch(mode: str) -> None:
    if mode not in MODES:
        raise LaunchError(f"--distributed must be one of {', '.join(MODES)}, got {mode!r}")
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise LaunchError(
            f"--distributed {mode} needs a torchrun launch (missing {', '.join(missing)}); run e.g. "
            f"`torchrun --nproc_per_node 2 -m lorakit train --distributed {mode} ...`"
        )


def join(mode: str) -> Distributed:
    """Join (or reuse) the process group described by torchrun's environment variables; refused on every
    rank when a process of the launch stopped before joining (see :func:`release_peers`)."""
    _check_launch(mode)
    device, backend = _device_and_backend()
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend)
        except RuntimeError as err:  # torch's DistError types derive from it
            if not peer_failed(err):
                raise
            raise LaunchError(
                f"rank {os.environ['RANK']} could not connect to the other processes of the run "
                f"({brief(err)}); check that every node reaches the rendezvous address, and for torchrun's "
                "restarts set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/distributed.md)"
            ) from err
        atexit.register(_leave)
        stopped = [(rank, why) for rank, why in enumerate(_starts(None)) if why is not None]
        if stopped:
            rank, why = stopped[0]
            raise LaunchError(
                f"rank {rank} of this {dist.get_world_size()}-process run stopped before training: "
                f"{why.rstrip('.')}; fix its command (every rank runs the same one) and launch again"
            )
    return Distributed(mode, dist.get_rank(), dist.get_world_size(), device)


def release_peers(reason: str) -> None:
    """In a process of a torchrun launch that stops before joining the process group (its command refused),
    join the group only to hand the others ``reason`` and leave: they stop with that line at once instead of
    waiting for this process until the group's timeout (30 minutes), as they would in a launch per node,
    where no launcher stops them. Waits at most :data:`RELEASE_WAIT` for them; gives up silently, having
    already said why it stops."""
    world = os.environ.get("WORLD_SIZE", "1").strip()
    # torchrun's own launch (its agent sets TORCHELASTIC_RUN_ID), whose processes all start together: the
    # variables alone may be left in a shell, where no other process would ever come
    launched = all(name in os.environ for name in (*TORCHRUN_VARIABLES, "TORCHELASTIC_RUN_ID"))
    if not launched or not world.isdigit() or int(world) < 2 or dist.is_initialized():
        return
    try:
        _, backend = _device_and_backend()
        dist.init_process_group(backend, timeout=RELEASE_WAIT)
        _starts(reason)
    except Exception:  # noqa: BLE001 - the others are gone or never came: there is no one to tell
        pass
    finally:
        _leave()


# How long a process that stops before training waits for the others of its launch to hear why.
RELEASE_WAIT = datetime.timedelta(minutes=5)


def _starts(reason: str | None) -> list[str | None]:
    """Every rank's reason to stop before training (None: it goes on): the first collective of a run."""
    reasons: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return reasons


def _device_and_backend() -> tuple[torch.device, str]:
    """This rank's device and the backend for it: its own GPU under NCCL, else the CPU under gloo."""
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
