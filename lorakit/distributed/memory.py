"""What each rank holds of the adapted layers' base weights, and proof that a 4-bit base stays packed.

QLoRA's memory saving disappears silently if a sharding wrapper turns the packed 4-bit weight into a plain
tensor and drops its quantisation state. Here the bytes of every adapted layer's base weight are counted on
this rank as stored (a DTensor counts its local shard; an NF4 weight its packed codes plus block scales)
and compared with the same weights as dense fp32 (FSDP2 shards a 4-bit base too, see
:mod:`lorakit.distributed.wrap`); and a digest of the packed bytes shows they never change.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

import lorakit


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor  # a DTensor's shard on this rank


def _whole(tensor: Tensor) -> Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # gathered from every rank


def _weights(layer: nn.Module) -> list[tuple[str, Tensor]]:
    """A base layer's weight tensors (parameters and buffers), its bias left out."""
    tensors = list(layer.named_parameters(recurse=False)) + list(layer.named_buffers(recurse=False))
    return [(name, t) for name, t in tensors if t is not None and name != "bias"]


def base_weight_bytes(model: nn.Module) -> dict[str, float]:
    """``per_rank`` bytes of the adapted layers' base weights on this rank, ``fp32`` bytes of the same
    weights dense in fp32 (whole), and their ``ratio`` (QLoRA's NF4: about 0.127 in one process or under DDP,
    about 0.127 / W on each of W ranks under FSDP2)."""
    per_rank = fp32 = 0
    for _, layer in lorakit.adapted_layers(model):
        out_features, in_features = layer.kind.shape_2d(layer.base_layer)
        fp32 += out_features * in_features * 4
        for _, tensor in _weights(layer.base_layer):
            local = _local(tensor)
            per_rank += local.numel() * local.element_size()
    return {"per_rank": per_rank, "fp32": fp32, "ratio": round(per_rank / fp32, 4) if fp32 else 0.0}


def packed_digest(model: nn.Module) -> str:
    """SHA-256 over the integer-coded base weights (NF4 codes, absmax codes) as a whole: unchanged by
    training, sharded or not (sharded ones are gathered: every rank must call it)."""
    digest = hashlib.sha256()
    for _, layer in lorakit.adapted_layers(model):
        for name, tensor in sorted(_weights(layer.base_layer), key=lambda item: item[0]):
            if not tensor.is_floating_point():
                whole = _whole(tensor.detach()).cpu().contiguous()
                digest.update(name.encode())
                digest.update(whole.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
