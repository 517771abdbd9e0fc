"""Before the first step every rank checks that it runs rank 0's job: settings, data, base model and code.

Ranks launched separately (one launcher per node) can be given different data files, flags or model copies;
they would train to the end, averaging gradients of different problems, or fail only at the end when their
adapters differ. So each rank describes its job (:func:`describe`), the ranks exchange the descriptions
once, and all stop before training with the same line naming the first difference and the rank it is on.

Paths that name a node's own copy (the model, the data files) are compared by content instead: the data by
:func:`lorakit.jobs.job.data_identity`, the base by a digest of every frozen tensor (the adapted layers'
through the adapter's fingerprint). The digest also covers the buffers (a 4-bit base's packed codes and
scales), which are identical by construction once it matches: DDP then never broadcasts them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import transformers
from torch import nn

import lorakit
from lorakit.common.errors import LorakitError

if TYPE_CHECKING:
    from lorakit.jobs.config import JobConfig

# Job settings that name this node's copy of something compared by content (or only change what is shown).
BY_CONTENT = frozenset({"model", "data", "eval_data", "progress"})


class RanksDisagreeError(LorakitError):
    """The ranks of a distributed run were started with different jobs; the message names the difference."""


def code_version() -> dict[str, str]:
    """lorakit's version and a digest of its source files, and the versions of torch and transformers."""
    digest = hashlib.sha256()
    package = Path(lorakit.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return {
        "lorakit": lorakit.__version__,
        "lorakit source": digest.hexdigest()[:16],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def base_digest(model: nn.Module) -> str:
    """SHA-256 over the frozen base: the adapted layers' base weights through the adapter's fingerprint, and
    every other parameter and buffer outside the adapters and the trained modules (a new head, broadcast
    from rank 0 with the adapter)."""
    state = lorakit.info(model)
    modules = dict(model.named_modules())
    owners = [layer for _, layer in lorakit.adapted_layers(model)] + [modules[n] for n in state.train_modules]
    skip = {id(t) for owner in owners for t in (*owner.parameters(), *owner.buffers())}
    digest = hashlib.sha256(state.fingerprint.encode())
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if id(tensor) not in skip:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def describe(job: JobConfig, model: nn.Module, training: str, evaluation: str | None) -> dict[str, Any]:
    """What this rank runs: the code, the job's settings (by their flag names), the identities of its
    training and evaluation data, and the digest of its base model."""
    settings: dict[str, Any] = {}
    for name, value in dataclasses.asdict(job).items():
        settings |= value if isinstance(value, dict) and name != "options" else {name: value}
    settings = {f"setting {k}": v for k, v in settings.items() if k not in BY_CONTENT}
    data = {"training data": training, "evaluation data": evaluation}
    return {**code_version(), **settings, **data, "base model": base_digest(model)}


def check_ranks_agree(mine: dict[str, Any], world_size: int) -> None:
    """Exchange every rank's :func:`describe` and raise :class:`RanksDisagreeError` (on every rank, with the
    same text) if any differs from rank 0's."""
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, mine)
    first = everyone[0]
    differ = []
    for name in first:
        ranks = [r for r, other in enumerate(everyone) if other.get(name, "(missing)") != first[name]]
        if ranks:
            differ.append((name, ranks[0]))
    if not differ:
        return
    name, rank = differ[0]
    also = "".join(f"; also {other} on rank {r}" for other, r in differ[1:4])
    more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
    raise RanksDisagreeError(
        f"the ranks disagree before training: {name} is {everyone[rank].get(name)!r} on rank {rank} but "
        f"{first[name]!r} on rank 0{also}{more}. Start every rank with the same settings, data, base model "
        "and lorakit"
    )
