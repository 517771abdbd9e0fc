"""Keeping the ranks identical: a variant's stages data-parallel, rank 0's adapter before the main run, and a
check at the end that the ranks still agree.

A data-parallel run is correct only if every rank holds the same adapter at every step. Rules that are
deterministic functions of the (averaged) gradients and the parameters stay in sync by themselves: AdaLoRA's
scores come from all-reduced gradients, so its masks agree; DyLoRA's rank of step ``t`` is drawn from a
generator seeded by ``(seed, t)``; Delta-LoRA's capture is a copy of identical factors. A variant's stage
before the main run (LoRA-drop's sample, train, score and select) trains too: :class:`StagePlacement` runs its
training data-parallel like the main run (each rank its share of the global batch, gradients averaged), and
every rank scores the whole sample with the identical adapter, so all ranks decide the same. Before the main
run, :func:`match_rank_0` checks that they did and gives every rank rank 0's adapter tensors, so the ranks
start identical whatever their random streams drew.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import lorakit
from lorakit.core.contract import Driver
from lorakit.data.datasets import BatchSampler
from lorakit.distributed.process import Group
from lorakit.distributed.sharding import ShardedBatchSampler
from lorakit.engine.placement import Placement


def adapter_tensors(model: nn.Module) -> list[Tensor]:
    """Every tensor a saved adapter holds (variant parameters and buffers, trained modules), in order."""
    modules = dict(model.named_modules())
    out = [t for _, layer in lorakit.adapted_layers(model) for t in layer.variant.state_dict().values()]
    out += [t for name in lorakit.info(model).train_modules for t in modules[name].state_dict().values()]
    return out


@torch.no_grad()
def broadcast_adapter(model: nn.Module) -> None:
    """Rank 0's adapter tensors onto every rank (in place)."""
    for tensor in adapter_tensors(model):
        # gloo has no bool type; a bool tensor travels as its bytes
        dist.broadcast(tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor, src=0)


def match_rank_0(model: nn.Module, world_size: int) -> None:
    """Give every rank rank 0's adapter tensors, once every rank is found to hold an adapter of rank 0's
    config (a stage's decision, such as LoRA-drop's kept modules, is the same on every rank: its training is
    data-parallel and its scoring identical; a difference is a bug, raised on every rank)."""
    configs: list[Any] = [None] * world_size
    dist.all_gather_object(configs, lorakit.info(model).config.to_dict())
    differ = [rank for rank, config in enumerate(configs) if config != configs[0]]
    if differ:
        raise RuntimeError(
            f"rank {differ[0]}'s adapter config differs from rank 0's after the variant's stages "
            f"({configs[differ[0]]} vs {configs[0]}); a stage is not deterministic across ranks. Report this "
            "with the variant and settings used."
        )
    broadcast_adapter(model)


class StagePlacement(Placement):
    """Where a variant's stage trains in a distributed run: data-parallel like the main run, on the model
    before DDP or FSDP2 wraps it (the stage rebuilds the adapters, which a wrapper would not see).

    Each rank takes its share of every global micro-batch of the stage's batches; the step's gradients are
    averaged over the ranks right after its backward, before any hook or the clip reads them, so every rank
    applies the update one process with the global batch would."""

    driver = Driver.DISTRIBUTED

    def __init__(self, group: Group) -> None:
        self.group = group
        self.is_writer = group.is_main
        self.params: list[nn.Parameter] = []

    def begin(self, model: nn.Module) -> None:
        broadcast_adapter(model)  # the stage starts from rank 0's adapter
        self.params = [p for p in model.parameters() if p.requires_grad]

    def shard(self, batches: Any) -> Any:
        if not isinstance(batches, BatchSampler):
            raise TypeError(f"a stage trains on a BatchSampler, got {type(batches).__name__}")
        return ShardedBatchSampler.share_of(batches, self.group.rank, self.group.world_size)

    @torch.no_grad()
    def reduce_loss(self, loss: float) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        for dtype in {g.dtype for g in grads}:  # one all-reduce per dtype
            same = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in same])
            dist.all_reduce(flat)
            flat.div_(self.group.world_size)
            for grad, averaged in zip(same, flat.split([g.numel() for g in same]), strict=True):
                grad.copy_(averaged.view_as(grad))
        return self.group.mean(loss)

    # No reseeding per rank and step (Placement.step_seed keeps the stream): the stage rebuilds the adapters
    # from the random stream it leaves, which is then one process's (bit-identical without dropout). The
    # price: in the stage the ranks draw the same dropout masks for their different examples.

    def processes(self) -> int:
        return self.group.processes()

    def total(self, value: int) -> int:
        return self.group.total(value)

    def lost_peer(self, err: BaseException) -> bool:
        return self.group.lost_peer(err)


def adapter_digest(model: nn.Module) -> str:
    """SHA-256 over the adapter tensors' bytes: equal on two ranks iff their adapters are bit-identical."""
    digest = hashlib.sha256()
    for tensor in adapter_tensors(model):
        data = tensor.detach().cpu().contiguous()
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_in_sync(model: nn.Module, world_size: int) -> None:
    """Raise if any rank's adapter differs from rank 0's (a rule that drifted would silently fork them)."""
    digests: list[Any] = [None] * world_size
    dist.all_gather_object(digests, adapter_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(
            f"the ranks' adapters diverged during training (digests {digests}); a training rule is not "
            "deterministic across ranks. Report this with the variant and settings used."
        )
