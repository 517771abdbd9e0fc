"""Fast paths behind one seam, each tested against the plain form it replaces.

``LORAKIT_KERNELS=off`` in the environment switches every fast path off: everything then runs in its plain
form (the reference).
"""

from __future__ import annotations

import os


def enabled() -> bool:
    """Whether fast paths may run (``LORAKIT_KERNELS=off`` switches them off)."""
    return os.environ.get("LORAKIT_KERNELS", "on").strip().lower() not in ("off", "0", "false", "no")
