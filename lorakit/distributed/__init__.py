"""Data-parallel training under ``torchrun``: DDP, or FSDP2 with the frozen base sharded.

See docs/distributed.md.

:func:`join` joins the process group torchrun describes; the :class:`Distributed` it returns shards the
data (:class:`ShardedBatchSampler`), wraps the model for the training loop (:meth:`Distributed.attach`)
and says who writes (:func:`writes_files`). :mod:`lorakit.distributed.sync` keeps the ranks' adapters
identical (a variant's stages data-parallel, rank 0's adapter before the main run, a check at the end);
:mod:`lorakit.jobs.agree` checks before training that every rank runs rank 0's job;
:mod:`lorakit.distributed.failures` names a peer that died; :mod:`lorakit.distributed.memory` reports what
each rank holds of the base weights.
"""

from lorakit.distributed.group import MODES, Distributed, LaunchError, check_one_process, join, writes_files
from lorakit.distributed.sharding import ShardedBatchSampler

__all__ = [
    "MODES",
    "Distributed",
    "LaunchError",
    "ShardedBatchSampler",
    "check_one_process",
    "join",
    "writes_files",
]
