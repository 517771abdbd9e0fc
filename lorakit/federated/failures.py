"""Why a client's update was not used, as a client reports it and as the server prints and records it.

A client that fails answers with an error message rather than raising (so Flower logs nothing of its own):
``lorakit:CODE`` under DP, ``lorakit:CODE: Type: message`` without. ``CODE`` is one of :data:`CODES`, fixed
texts that depend on the kind of failure only. Under DP no client text that could depend on its data may reach
the server, its logs or the run's files (a diverged client's message quotes its unnoised training losses), so
the client sends the code alone and the server, whatever it receives, keeps only a code it knows
(``unreported`` for anything else, such as the traceback of a client that crashed outside lorakit's handler).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lorakit.adapters.io import NonFiniteError
from lorakit.common.errors import LorakitError
from lorakit.engine.checkpoint import DivergedError

# code -> what it means and the fix, printed by the server (the same text for every run)
CODES = {
    "diverged": "a client's local training diverged (its loss grew over 1000 times its first step's); "
    "lower --lr or --server-lr, or check --alpha",
    "non-finite": "a client's local training produced NaN or infinite values; lower --lr or --server-lr, or "
    "check --alpha",
    "setup": "a SuperNode's partition does not fit the run; start every SuperNode with --node-config "
    "'partition-id=I num-partitions=N', N equal to --clients and each I in [0, N) once",
    "bad-input": "a client refused its settings or its data; check --data and the settings on every node",
    "out-of-memory": "a client ran out of memory; lower --batch-size, --max-length or --num-cpus",
    "error": "a client failed with an internal error (a bug in lorakit; rerun without DP to see it)",
    "unusable-update": "a client's update held NaN or infinite values or tensors that do not fit the round",
    "timeout": "a client did not reply within --round-timeout seconds; raise it, or lower --local-steps",
    "unreported": "a client failed outside lorakit's handler (its message is withheld under DP)",
}
CLIENT_FAILED = 100  # the code of lorakit's error replies (Flower's own codes are below 10)
_PREFIX = "lorakit:"
_REASON = re.compile(r"lorakit:([a-z-]+)(?:: (.*))?", re.DOTALL)
_DETAIL_CHARS = 500


class FederatedError(LorakitError):
    """A federated run cannot go on: its clients failed, or nothing was trained; nothing is saved."""


class NodeConfigError(LorakitError):
    """A SuperNode's partition settings do not fit the run's number of clients."""


@dataclass(frozen=True)
class Failure:
    """One unused update: a code from :data:`CODES` and, only without DP, the client's own message."""

    code: str
    detail: str = ""

    def describe(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else f"{self.code} ({CODES[self.code]})"


def code_of(err: BaseException) -> str:
    """The reason code of an exception raised in a client."""
    if isinstance(err, DivergedError):
        return "diverged"
    if isinstance(err, NonFiniteError):
        return "non-finite"
    if isinstance(err, NodeConfigError):
        return "setup"
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return "out-of-memory"
    if isinstance(err, LorakitError):
        return "bad-input"
    return "error"


def client_reason(err: BaseException, private: bool) -> str:
    """What a failed client sends: the code alone under DP, else the code and its one-line message."""
    code = code_of(err)
    if private:
        return _PREFIX + code
    return f"{_PREFIX}{code}: {type(err).__name__}: {_one_line(str(err))}"


def read_reason(reason: str | None, private: bool) -> Failure:
    """The failure a client's error reply reports; under DP only its code (unknown codes: ``unreported``)."""
    text = reason or ""
    match = _REASON.fullmatch(text.strip())
    if private:
        return Failure(match.group(1) if match and match.group(1) in CODES else "unreported")
    if match and match.group(1) in CODES:
        return Failure(match.group(1), _one_line(match.group(2) or ""))
    return Failure("unreported", _one_line(text) or "no reason given")


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _DETAIL_CHARS else line[: _DETAIL_CHARS - 3] + "..."
