"""The run's optimizer over the variants' parameter groups: AdamW, or a bitsandbytes optimizer by name.

bitsandbytes optimizers: 8-bit AdamW (Dettmers et al. 2022, arXiv:2110.02861), paged AdamW.

``adamw8bit`` keeps both Adam moments in 8 bits (block-wise dynamic quantisation) for every tensor with at
least 4096 elements (bitsandbytes' ``min_8bit_size``; smaller ones keep 32-bit state): 2 bytes of state per
parameter instead of 8. ``paged_adamw`` / ``paged_adamw8bit`` put the state in CUDA unified memory so it is
evicted to CPU RAM instead of failing when a long batch spikes GPU memory (QLoRA section 3, "Paged
Optimizers"). Paging only exists on CUDA: on CPU these run as ``adamw`` (bitsandbytes' 32-bit AdamW) and
``adamw8bit`` with a warning, which is what bitsandbytes 0.50 does itself, once per tensor.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lorakit.adapters.api import check_trained, param_groups
from lorakit.engine.config import TrainConfig

# lorakit name -> (bitsandbytes class, the class used where paging is unavailable)
BNB_OPTIMIZERS: dict[str, tuple[str, str]] = {
    "adamw8bit": ("AdamW8bit", "AdamW8bit"),
    "paged_adamw": ("PagedAdamW", "AdamW"),
    "paged_adamw8bit": ("PagedAdamW8bit", "AdamW8bit"),
}
CHOICES = ("adamw", *BNB_OPTIMIZERS)


def bnb_optimizer(
    name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The bitsandbytes optimizer called ``name`` over parameter ``groups`` (each may set its own lr).

    Raises:
        ValueError: unknown ``name`` (the message lists the choices).
        ImportError: bitsandbytes is not installed (``pip install 'lorakit[quant]'``).
    """
    if name not in BNB_OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; choose one of: {', '.join(CHOICES)}")
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError:
        raise ImportError(
            f"optimizer '{name}' needs bitsandbytes: pip install 'lorakit[quant]' (or use --optimizer adamw)"
        ) from None
    paged, unpaged = BNB_OPTIMIZERS[name]
    cls_name = paged
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    if paged != unpaged and not on_cuda:
        warnings.warn(
            f"paged optimizers page GPU memory only; the parameters are not on CUDA, so '{name}' runs as "
            f"bitsandbytes' {unpaged}",
            UserWarning,
            stacklevel=2,
        )
        cls_name = unpaged
    return getattr(bnb_optim, cls_name)(groups, lr=lr, weight_decay=weight_decay)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over :func:`lorakit.param_groups` (LoRA+'s rates, shared tensors once)."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay)
    check_trained(model, groups)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return bnb_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay)
