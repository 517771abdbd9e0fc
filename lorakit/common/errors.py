"""The one base class of every error a user can cause and fix.

Anything raised because of what the user passed (a setting, a file, a path, a model name) derives from
``LorakitError``; the command line turns it into one line naming the problem and the fix, exit code 2
(``--debug`` shows the traceback). Anything else that escapes is a bug in lorakit. It derives from
``ValueError`` so code that caught ``ValueError`` before keeps working.
"""

from __future__ import annotations

import errno


class LorakitError(ValueError):
    """A user-caused problem; the message names what is wrong and how to fix it."""


class SettingError(LorakitError):
    """A setting (flag, config-file value, function argument) is out of range or of the wrong type."""


class AdapterStateError(LorakitError):
    """The call does not fit the model's adapter state: no adapter yet, one already, or one that is merged."""


class OutputExistsError(LorakitError, FileExistsError):
    """Writing would replace something the user saved; the message names it and how to replace it on purpose.

    Also a ``FileExistsError``, so code that caught that before keeps working."""


class DiskFullError(LorakitError):
    """No space was left where lorakit was writing; the message names the place and what was kept."""


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` reports a full file system or an exhausted quota: an ``OSError`` with ENOSPC or EDQUOT,
    or the same reported in text by a library that raises its own error type (safetensors' "os error 28")."""
    if isinstance(err, DiskFullError):
        return True
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(mark in text for mark in ("No space left on device", "Disk quota exceeded", "os error 28"))
