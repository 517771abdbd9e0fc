"""Dropout masks drawn as the gaps between dropped elements, on a CPU (a ``"keep_mask"`` kernel).

In a sequence of independent Bernoulli(p) drops the gaps between consecutive drops are geometric:
``1 + floor(log(1 - u) / log(1 - p))`` for a uniform ``u``. So one random number is drawn per *dropped*
element (one per twenty at ``p = 0.05``) instead of one per element, and the mask is a fill of ones with the
drops written in; each gap is exact up to ``u``'s resolution (fp32, ``2**-24``). The positions themselves
serve the kernels that take products from the dropped inputs only (:mod:`lorakit.kernels.dropped`). A CPU
only, for ``p <= 0.25``: the draw needs the count of drops on the host, a device sync on a GPU.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lorakit.core.dropout import new_seed
from lorakit.kernels.registry import FLOATS, Kernel, register

GAPS_UP_TO = 0.25  # the largest drop rate drawn as gaps


def drawn_as_gaps(p: float) -> bool:
    """The dropout rates this kernel covers."""
    return 0 < p <= GAPS_UP_TO


def _gap_count(remaining: int, p: float) -> int:
    """How many gaps to draw for ``remaining`` elements: past the end in all but about one draw in ``10**9``
    (six standard deviations above the mean count); the rare shortfall draws again."""
    mean = remaining * p
    return int(mean + 6 * math.sqrt(mean) + 16)


def dropped_indices(numel: int, p: float, seed: int, device: torch.device) -> Tensor:
    """The flat indices (sorted, int64) of the elements that dropout at rate ``p`` drops among ``numel``,
    reproducible from ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    per_log = 1.0 / math.log1p(-p)
    runs, last = [], -1  # last: the last index drawn so far
    while last < numel:
        u = torch.empty(_gap_count(numel - 1 - last, p), dtype=torch.float32, device=device)
        u.uniform_(generator=gen)
        gaps = u.neg_().log1p_().mul_(per_log).floor_().to(torch.int64).add_(1)
        gaps[:1].add_(last)
        runs.append(gaps.cumsum_(0))
        last = int(runs[-1][-1])
    flat = torch.cat(runs) if len(runs) > 1 else runs[0]
    return flat[: int(torch.searchsorted(flat, numel))]


def fresh_dropped_indices(x: Tensor, p: float) -> Tensor:
    """The flat indices that the keep-mask of a fresh seed (:func:`lorakit.core.dropout.new_seed`) marks
    False, without forming the mask."""
    return dropped_indices(x.numel(), p, int(new_seed().item()), x.device)


def gap_keep_mask(x: Tensor, p: float, seed: int) -> Tensor:
    """Dropout's keep-mask for ``seed`` (``bool``, shaped like ``x``), drawn as gaps."""
    keep = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    return keep.view(-1).index_fill_(0, dropped_indices(x.numel(), p, seed, x.device), False).view(x.shape)


GAP_MASK = register(Kernel("gap_mask", "keep_mask", gap_keep_mask, ("cpu",), FLOATS, dropout=drawn_as_gaps))
