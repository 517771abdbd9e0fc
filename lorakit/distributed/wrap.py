"""Wrapping an adapted model for data-parallel training: DDP, or FSDP2 with the frozen base sharded.

``ddp``: PyTorch's ``DistributedDataParallel`` around the model; every rank holds the whole model and the
gradients of the trainable tensors are averaged in backward.

``fsdp``: FSDP2's ``fully_shard`` on every block (each child of a ``ModuleList``) and on the root. It shards
the frozen dense base weights, which hold nearly all the memory of a LoRA-family run; the adapter tensors
(frozen ones too) and the trained modules are passed as ``ignored_params``: every rank keeps them whole, and
:class:`GradientAverager` averages their gradients during backward, as DDP does, so every rule, the
clipping and the optimizer see the global batch's gradient. Every variant's training rule reads and writes
ordinary full tensors (AdaLoRA's masks, DyLoRA's row restore, Delta-LoRA's capture, VeRA's shared
projections, LoRA+'s groups) and a saved adapter is never a shard. A 4-bit base keeps its packed codes and
block scales in buffers, which FSDP2 neither shards nor gathers: :func:`storage_as_parameters` re-registers
them as frozen parameters first, so each rank holds its 1/W share of them too (gathered per block for its
forward and backward like any frozen weight, never cast: FSDP2 gathers tensors of several dtypes as bytes).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

import lorakit
from lorakit.core.nf4_linear import NF4Linear
from lorakit.distributed.process import Group

KeepLocal = Callable[[], contextlib.AbstractContextManager[None]]  # a context in which gradients stay local


class GradientAverager:
    """Averages each of ``params``' gradients over all ranks as soon as backward has accumulated it.

    Backward reaches the tensors in the same order on every rank (the graph does not depend on the data), so
    the all-reduces pair up. Within :meth:`paused` (a step's micro-batches before the last) gradients only
    accumulate locally; the last micro-batch averages the sum, as DDP's ``no_sync`` does.
    """

    def __init__(self, params: list[nn.Parameter], world_size: int) -> None:
        self.world_size = world_size
        self.active = True
        for param in params:
            param.register_post_accumulate_grad_hook(self._average)

    @torch.no_grad()
    def _average(self, param: nn.Parameter) -> None:
        if self.active:
            dist.all_reduce(param.grad)
            param.grad.div_(self.world_size)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.active = False
        try:
            yield
        finally:
            self.active = True


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: children of every ``ModuleList`` that hold parameters,
    deepest first (FSDP2 wraps bottom-up: a block inside a block is sharded before its parent)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            found += [(name.count("."), child) for child in module if any(True for _ in child.parameters())]
    return [child for _, child in sorted(found, key=lambda item: -item[0])]


def storage_as_parameters(model: nn.Module) -> None:
    """Re-register every 4-bit layer's storage (packed codes, block scales; not the scalar offset) as frozen
    parameters, in place, so FSDP2 shards it: it shards parameters only. The layer reads them by name as
    before; nothing trains them."""
    for module in model.modules():
        if isinstance(module, NF4Linear):
            for name, tensor in list(module.named_buffers(recurse=False)):
                if tensor.dim() > 0:
                    delattr(module, name)
                    module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def shard(model: nn.Module, group: Group) -> nn.Module:
    """FSDP2 ``fully_shard`` per block and on the root, adapter and trainable tensors ignored (kept whole),
    a 4-bit base's storage sharded too; in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    storage_as_parameters(model)
    mesh = init_device_mesh(group.device.type, (group.world_size,))
    # Whole on every rank: whatever trains, and every adapter tensor (LoRA-FA's frozen A too).
    whole = {p for p in model.parameters() if p.requires_grad}
    whole |= {p for _, layer in lorakit.adapted_layers(model) for p in layer.variant.parameters()}
    for block in blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=whole)
    fully_shard(model, mesh=mesh, ignored_params=whole)
    return model


def wrap(model: nn.Module, group: Group) -> tuple[nn.Module, KeepLocal]:
    """The forward module for ``group.mode`` (see the module docstring), and a context that keeps gradients
    local (for a step's micro-batches before the last)."""
    if group.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [group.device.index] if group.device.type == "cuda" else None
        # No search for unused parameters: it would mark the tensors of a loss term computed outside
        # forward (AdaLoRA's orthogonality penalty) as unused. Every variant keeps all its trainable tensors
        # in the graph of every step instead. No buffer broadcasts: the buffers are frozen (a 4-bit base's
        # packed codes and scales, several times the adapter's gradients) and were checked identical on
        # every rank before training (lorakit.jobs.agree), so broadcasting them each forward is waste.
        with warnings.catch_warnings():
            # torch 2.13 deprecates broadcast_buffers for forward_sync_buffers (absent before), which still
            # broadcasts every buffer once at construction; broadcast_buffers=False never does.
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        return ddp, ddp.no_sync
    averager = GradientAverager([p for p in model.parameters() if p.requires_grad], group.world_size)
    return shard(model, group), averager.paused
