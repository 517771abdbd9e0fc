"""A ``lorakit train`` job under torchrun: what :func:`lorakit.jobs.job.run_job` does besides training."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from torch import nn

import lorakit
from lorakit.common.errors import SettingError
from lorakit.data.datasets import TokenizedData
from lorakit.distributed.failures import peer_failures
from lorakit.distributed.group import Distributed, join
from lorakit.distributed.memory import base_weight_bytes, packed_digest
from lorakit.distributed.sharding import ShardedBatchSampler
from lorakit.distributed.sync import check_in_sync
from lorakit.jobs.agree import check_ranks_agree, describe

if TYPE_CHECKING:
    from lorakit.adapters.summary import Summary
    from lorakit.jobs.config import JobConfig


class ScaleOut:
    """One job's distributed side: the checks before training, sharded data, and the end-of-run checks."""

    def __init__(self, job: JobConfig, group: Distributed) -> None:
        self.job, self.group = job, group
        self.packed = ""  # the 4-bit base's digest before training

    @classmethod
    def join(cls, job: JobConfig) -> ScaleOut:
        """Refuse what cannot run distributed, then join torchrun's process group."""
        if job.privacy.dp:
            raise SettingError(
                "DP-SGD does not run distributed: its privacy accounting assumes one process sampling and "
                "noising the whole batch. Train with --dp on a single process (no --distributed)."
            )
        return cls(job, join(str(job.distributed)))

    def watch(self) -> contextlib.AbstractContextManager[None]:
        """A context in which a broken collective (a peer process that died) becomes one clear error."""
        return peer_failures(self.group.rank, self.group.world_size, bool(self.job.train.checkpoint_every))

    def agree(self, job: JobConfig, model: nn.Module, training: str, evaluation: str | None) -> None:
        """Every rank runs rank 0's ``job`` (settings, data, base model, code), or all stop here with one
        line (:mod:`lorakit.jobs.agree`). ``training``, ``evaluation``: the data's identities."""
        check_ranks_agree(describe(job, model, training, evaluation), self.group.world_size)

    def start(
        self, model: nn.Module, data: TokenizedData, group_by_length: bool = False
    ) -> ShardedBatchSampler:
        """Move the model to this rank's device; this rank's batches of the training data."""
        self.group.place(model)
        self.packed = packed_digest(model)
        train = self.job.train
        return self.group.sampler(data, train.batch_size, train.seed, group_by_length, train.grad_accum)

    def counts(self, model: nn.Module) -> Summary:
        """The model's parameter counts as it trained (taken before FSDP2 made a 4-bit base's storage
        parameters, see :mod:`lorakit.distributed.wrap`)."""
        return self.group.counts or lorakit.summary(model)

    def finish(self, model: nn.Module) -> dict[str, Any]:
        """Check the ranks agree and the 4-bit base is untouched; the report for ``metrics.json``."""
        check_in_sync(model, self.group.world_size)
        if packed_digest(model) != self.packed:
            raise RuntimeError("the packed 4-bit base weights changed during training; they must stay frozen")
        weights = base_weight_bytes(model)
        return {
            "distributed": self.group.mode,
            "world_size": self.group.world_size,
            "base_bytes_per_rank": weights["per_rank"],
            "base_fp32_bytes": weights["fp32"],
            "base_bytes_ratio": weights["ratio"],
        }
