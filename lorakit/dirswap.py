"""Replace a directory by a complete new one so that a kill at any moment leaves a complete copy.

The new directory is built beside the target as ``.NAME.lorakit-new`` (same parent, so renames stay on one
file system). :func:`swap_in` renames the target to ``.NAME.lorakit-old``, the new one to the target, and
deletes the old one. Between the two renames the target is missing while both copies are complete;
:func:`finish_swap`, run before the next write (and by readers that find the target missing), moves a complete
copy back into place, preferring the new one, and deletes the leftover.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def siblings(target: Path) -> tuple[Path, Path]:
    """``(new, old)``: where the replacement is built, and where the replaced copy waits to be deleted."""
    return target.with_name(f".{target.name}.lorakit-new"), target.with_name(f".{target.name}.lorakit-old")


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
