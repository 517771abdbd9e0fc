"""One writer per output directory: an exclusive lock that a command holds for as long as it writes there.

``train``, ``merge``, ``export`` and ``bench`` hold ``.NAME.lorakit-lock`` beside the directory they write (in
the same parent, so the lock stays put while the directory itself is swapped for a new one). The lock is an
``flock`` on that file, which the operating system releases when its process ends, however it ends; the file
also records the owner's command, pid, host and start time, so a second command into the same directory, with
``--overwrite`` or without, is refused at its start in one line naming the running one. A lock file whose
``flock`` nobody holds was left by a process that died without removing it (``kill -9``, a lost machine): it
is stale, is named in a note, and is taken over. On a file system without ``flock`` the recorded pid decides:
a live process on this host, or any owner on another host, holds the directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.common.errors import LorakitError

NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


class DirectoryInUseError(LorakitError):
    """Another lorakit command is writing the directory; the message names it and what to do."""


def lock_path(target: Path) -> Path:
    """Where the lock of directory ``target`` lives: beside it, in the same parent."""
    return target.with_name(f".{target.name}.lorakit-lock")


def real_path(target: str | os.PathLike[str]) -> Path:
    """``target`` as one absolute name with ``~``, ``..`` and symlinks resolved: a directory reached through
    a symlink has the one lock of the directory it points to, and is replaced there, keeping the link."""
    try:
        path = Path(target).expanduser()
    except RuntimeError as err:  # ~name of no user, or no home directory
        why = str(err).rstrip(".")
        raise LorakitError(f"cannot use {target}: {why}; write the path out in full") from None
    try:
        return path.resolve()
    except RuntimeError as err:  # Python 3.11 raises it for a symlink loop
        raise LorakitError(f"cannot use {target}: {err}; fix or remove the symlink") from None


@contextlib.contextmanager
def exclusive(target: Path, shown: str, command: str) -> Iterator[None]:
    """Hold the lock of directory ``target`` (named ``shown`` in messages) while the block runs; refuse with
    :class:`DirectoryInUseError` if another process holds it. Parent directories made for the lock file are
    removed again afterwards if they are still empty."""
    lock = lock_path(real_path(target))
    created = make_parents(lock.parent)
    try:
        fd = _acquire(lock, shown, command)
    except BaseException:
        remove_empty_parents(lock.parent, created)
        raise
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # unlinked while still locked: a process waiting on this file sees it go
        os.close(fd)
        remove_empty_parents(lock.parent, created)


def held(target: Path) -> bool:
    """Whether a live process holds the lock of directory ``target`` now."""
    try:
        fd = os.open(lock_path(real_path(target)), os.O_RDONLY)
    except OSError:
        return False
    try:
        return _locked(fd)
    finally:
        os.close(fd)


def holder(target: Path) -> str | None:
    """The command holding the lock of directory ``target`` now, as messages name it; None when none does."""
    try:
        fd = os.open(lock_path(real_path(target)), os.O_RDONLY)
    except OSError:
        return None
    try:
        return _describe(_owner(fd)) if _locked(fd) else None
    finally:
        os.close(fd)


def _locked(fd: int) -> bool:
    """Whether a live process holds the lock file open as ``fd`` (a shared lock taken here to test it goes
    with ``fd``'s close)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as err:
        if err.errno not in NO_FLOCK:
            raise
        return _alive(_owner(fd))
    return False


def make_parents(directory: Path) -> Path | None:
    """Make ``directory`` and its missing parents; returns the topmost one made (None: it existed)."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def remove_empty_parents(directory: Path, created: Path | None) -> None:
    """Remove ``directory`` and its parents up to ``created`` while they are empty (what a run made for
    itself and left unused); never anything another process has put there meanwhile."""
    if created is None:
        return
    for parent in (directory, *directory.parents):
        if not parent.is_relative_to(created):
            break
        try:
            parent.rmdir()
        except OSError:
            break


def _acquire(lock: Path, shown: str, command: str) -> int:
    """The locked descriptor of ``lock``, with this process recorded in it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            previous = _lock(fd, lock, shown)
        except BaseException:
            os.close(fd)
            raise
        if previous is None:  # the holder removed the file between our open and our lock: try again
            os.close(fd)
            continue
        if previous:
            print(
                f"lorakit: note: taking over the lock of {shown} left by {_describe(previous)}, which ended "
                "without releasing it",
                file=sys.stderr,
            )
        owner = {"command": command, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        return fd


def _lock(fd: int, lock: Path, shown: str) -> dict[str, Any] | None:
    """Lock ``fd``; returns the owner the file recorded before (empty: none), or None when the file at
    ``lock`` is no longer the one locked. Raises :class:`DirectoryInUseError` when a live process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _refuse(shown, _owner(fd), lock)
    except OSError as err:  # a file system without flock: the recorded owner decides
        if err.errno not in NO_FLOCK:
            raise
        if _alive(_owner(fd)):
            _refuse(shown, _owner(fd), lock)
    try:
        same = os.stat(lock).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    return _owner(fd) if same else None


def _refuse(shown: str, owner: dict[str, Any], lock: Path) -> None:
    raise DirectoryInUseError(
        f"{shown} is being written by another lorakit command ({_describe(owner)}); wait for it to finish or "
        f"choose another directory (if that command is not running, delete {lock})"
    )


def _owner(fd: int) -> dict[str, Any]:
    """What the lock file records (empty when nothing readable)."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the recorded owner may still run: a live pid on this host, or any owner on another host."""
    if not owner:
        return False
    if owner.get("host") != socket.gethostname():
        return True
    try:
        pid = int(owner.get("pid", 0))
        os.kill(pid, 0)  # signal 0: only whether the process exists
    except (OSError, ValueError, TypeError, OverflowError):
        return False
    return pid > 0


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "a process that recorded nothing"
    started = owner.get("started")
    since = ""
    if isinstance(started, (int, float)) and 0 < started < 1e11:
        since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started))
    command, pid, host = owner.get("command", "lorakit"), owner.get("pid", "?"), owner.get("host", "?")
    return f"{command}, pid {pid} on {host}{since}"
