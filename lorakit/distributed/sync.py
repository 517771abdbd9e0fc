"""Keeping the ranks identical: a variant's stages run once and are broadcast, and a check that they agree.

A data-parallel run is correct only if every rank holds the same adapter at every step. Rules that are
deterministic functions of the (averaged) gradients and the parameters stay in sync by themselves: AdaLoRA's
scores come from all-reduced gradients, so its masks agree; DyLoRA's rank of step ``t`` is drawn from a
generator seeded by ``(seed, t)``; Delta-LoRA's capture is a copy of identical factors. A variant's stage
before the main run (LoRA-drop's sample, score and select) is different: it trains, so it runs once, on
rank 0, and its decision (the adapter config it rewrote) and every adapter tensor are broadcast.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import lorakit
from lorakit.io import undo_apply
from lorakit.train.loop import TrainConfig

Prepare = Callable[[nn.Module, Any, TrainConfig], dict[str, Any]]


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


def prepare_once(
    prepare: Prepare | None, model: nn.Module, global_batches: Any, cfg: TrainConfig, rank: int
) -> dict[str, Any]:
    """Run a variant's ``prepare`` stage on rank 0 only, then give every rank its result.

    ``global_batches`` and ``cfg`` describe the global batch, so rank 0 decides exactly what a single
    process would. The other ranks re-apply the adapter config rank 0 ended with (for LoRA-drop: the kept
    modules), then all ranks take rank 0's adapter tensors. Without a stage, only the tensors are broadcast
    (so ranks start identical even if their initialisation differed).
    """
    decided: list[Any] = [{}]
    if prepare is not None:
        if rank == 0:
            decided[0] = prepare(model, global_batches, cfg)
        dist.broadcast_object_list(decided, src=0)
        config = [lorakit.info(model).config.to_dict()]
        dist.broadcast_object_list(config, src=0)
        if rank != 0 and config[0] != lorakit.info(model).config.to_dict():
            name = lorakit.info(model).variant
            undo_apply(model)
            lorakit.apply(model, lorakit.get_variant(name).config_class.from_dict(config[0], name))
    broadcast_adapter(model)
    return decided[0]


def global_config(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """The single-process settings with the same global micro-batch (``batch_size * world_size``)."""
    return dataclasses.replace(cfg, batch_size=cfg.batch_size * world_size)


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
