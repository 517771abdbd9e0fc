"""When another process of a distributed run dies, the collective this process waits in breaks: say that.

gloo reports a peer that exited or was killed as ``Connection closed by peer [host]:port`` (or ``reset by
peer``), NCCL as a remote process that exited, and both time out when a peer stops answering. None of it is
a lorakit bug, and none of it is this process's own error: the survivors stop with one line that says a peer
failed (the rank when it is known), that its own error names the cause, and how to continue.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch.distributed as dist

from lorakit.common.errors import LorakitError

# What the backends report, in lower case, when a peer process is gone or stopped answering.
PEER_GONE = (
    "closed by peer",
    "reset by peer",
    "broken pipe",
    "connection refused",
    "remote process exited",
    "remote worker",
    "timed out waiting",
    "collective operation timeout",
)


class PeerFailedError(LorakitError):
    """Another process of the distributed run failed or was stopped, so this one cannot go on."""


def peer_failed(err: BaseException) -> bool:
    """Whether ``err`` is a broken collective: a peer process that died, left or stopped answering."""
    if isinstance(err, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    return isinstance(err, RuntimeError) and any(sign in str(err).lower() for sign in PEER_GONE)


@contextlib.contextmanager
def peer_failures(rank: int, world_size: int, checkpoints: bool) -> Iterator[None]:
    """Turn a broken collective in the block into :class:`PeerFailedError`; ``checkpoints``: whether the
    run writes checkpoints to resume from."""
    try:
        yield
    except Exception as err:
        if isinstance(err, LorakitError) or not peer_failed(err):
            raise
        who = f"rank {1 - rank}" if world_size == 2 else "another rank"
        then = (
            "relaunch the same command with --resume (or --resume auto) to continue from the last checkpoint"
            if checkpoints
            else "no checkpoint was written (--checkpoint-every 0): relaunch to train again, with "
            "--checkpoint-every N to be able to resume"
        )
        raise PeerFailedError(
            f"rank {rank} stopped because {who} of this {world_size}-process run failed or was stopped "
            f"({brief(err)}); that process's own error (torchrun names it) says why. Fix it, then {then}"
        ) from err


def brief(err: BaseException) -> str:
    """The backend's message in one short line, without the source location it starts with."""
    return re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(err).split())).split(". ")[0][:160]
