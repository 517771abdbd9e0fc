"""This process's place in a data-parallel run, as the model's wrapping (:mod:`lorakit.distributed.wrap`)
and a stage's placement (:mod:`lorakit.distributed.sync`) see it. The process group
(:class:`lorakit.distributed.group.Distributed`) implements it and builds on those modules, which name this
protocol instead of it."""

from __future__ import annotations

from typing import Protocol

import torch


class Group(Protocol):
    """The process group of a run: this rank's place in it and the collectives over it."""

    mode: str  # 'ddp' or 'fsdp'
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        ...

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all ranks."""
        ...

    def processes(self) -> int:
        """How many processes train."""
        ...

    def total(self, value: int) -> int:
        """The sum of ``value`` over all ranks."""
        ...

    def lost_peer(self, err: BaseException) -> bool:
        """Whether ``err`` is a collective broken by a peer that died."""
        ...
