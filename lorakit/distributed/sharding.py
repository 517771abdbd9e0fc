"""Data sharded by rank, with ``DistributedSampler`` semantics and the global batch of a single process.

Every rank draws the same shuffled order from the same seeded generator and takes its own slice of each
global micro-batch: with per-rank batch ``b`` and ``W`` ranks, rank ``r`` gets examples ``[r b, (r + 1) b)``
of the ``W b`` that one process with batch ``W b`` would draw. The global batch of an optimizer step is
``b x W x grad_accum`` examples, the same examples in the same order as that single process, so a
data-parallel run (gradients averaged over ranks) follows the single-process run step for step.
"""

from __future__ import annotations

from torch import Tensor

from lorakit.data.datasets import BatchSampler, TokenizedData


class ShardedBatchSampler(BatchSampler):
    """Rank ``rank``'s ``batch_size`` examples of each global micro-batch of ``batch_size * world_size``.

    The checkpointed state (generator and pending order) is the global one, identical on every rank, so a
    resumed run continues the same global order whatever rank reads the checkpoint.
    """

    def __init__(
        self,
        data: TokenizedData,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        group_by_length: bool = False,
    ) -> None:
        super().__init__(data, batch_size * world_size, seed, group_by_length)
        self.rank, self.world_size, self.per_rank = rank, world_size, batch_size

    @classmethod
    def share_of(cls, batches: BatchSampler, rank: int, world_size: int) -> ShardedBatchSampler:
        """Rank ``rank``'s ``batches.batch_size`` examples of each global batch of ``world_size`` times as
        many, drawn from where ``batches``' generator is (the order of one process with the global batch)."""
        sharded = cls(batches.data, batches.batch_size, 0, rank, world_size, batches.group_by_length)
        sharded.load_state_dict(batches.state_dict())
        return sharded

    def __next__(self) -> dict[str, Tensor]:
        indices = self.next_indices()
        return self.data.batch(indices[self.rank * self.per_rank : (self.rank + 1) * self.per_rank])
