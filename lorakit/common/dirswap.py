"""Replace a directory by a complete new one so that a kill at any moment leaves a complete copy.

The new directory is built beside the target as ``.NAME.lorakit-new`` (same parent, so renames stay on one
file system). :func:`swap_in` renames the target to ``.NAME.lorakit-old``, the new one to the target, and
deletes the old one. Between the two renames the target is missing while both copies are complete;
:func:`finish_swap`, run before the next write (and by readers that find the target missing), moves a complete
copy back into place, preferring the new one, and deletes the leftover.

:func:`building` is the whole protocol for a command that writes a new directory in one go (``merge``,
``export``): it builds beside the target and swaps in only a complete result, so a failure, a full disk
included, leaves the target as it was and nothing that makes a rerun refuse.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from lorakit.common.errors import DiskFullError, OutputExistsError, is_disk_full


def siblings(target: Path) -> tuple[Path, Path]:
    """``(new, old)``: where the replacement is built, and where the replaced copy waits to be deleted."""
    return target.with_name(f".{target.name}.lorakit-new"), target.with_name(f".{target.name}.lorakit-old")


def staged_for(path: Path) -> Path | None:
    """The target that ``path`` is the replacement being built for (``.NAME.lorakit-new`` -> ``NAME``), or
    None when it is not one."""
    name = path.name[1:].removesuffix(".lorakit-new")
    if name in ("", ".", "..") or siblings(path.with_name(name))[0] != path:
        return None
    return path.with_name(name)


def swap_in(target: Path) -> None:
    """Replace ``target`` (if any) by its complete sibling ``new``: target -> old, new -> target, drop old."""
    new, old = siblings(target)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def finish_swap(target: Path, complete: Callable[[Path], bool]) -> None:
    """Complete a :func:`swap_in` that a kill interrupted; does nothing if none was."""
    new, old = siblings(target)
    if not target.exists():
        for copy in (new, old):
            if complete(copy):
                os.replace(copy, target)
                break
    if old.exists() and complete(target):
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def building(target: Path, shown: str, what: str) -> Iterator[Path]:
    """Yield an empty directory beside ``target`` to write ``what`` into; swap it in for ``target`` when the
    block ends, or remove it when the block fails (a full disk is named as such). A file in ``target`` that
    the new directory would not hold is never deleted: the swap is refused instead. Call it while holding
    ``target``'s lock (:mod:`lorakit.common.dirlock`)."""
    new, old = siblings(target)
    if not target.exists() and old.exists():  # a kill between the two renames of an earlier swap
        os.replace(old, target)
    for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    new.mkdir()
    try:
        yield new
        kept = {p.name for p in target.iterdir()} if target.is_dir() else set()
        others = sorted(kept - {p.name for p in new.iterdir()})
        if others:
            raise OutputExistsError(
                f"{shown} holds files that {what} does not include ({', '.join(others[:5])}); they would be "
                "deleted with the old copy, so choose an empty or new directory"
            )
    except BaseException as err:
        shutil.rmtree(new, ignore_errors=True)
        if isinstance(err, Exception) and is_disk_full(err):
            raise DiskFullError(
                f"no space left on {target.parent}: {what} was not written and {shown} is as it was; free "
                "space and run the command again"
            ) from None
        raise
    swap_in(target)
