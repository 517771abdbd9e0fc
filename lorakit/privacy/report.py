"""What a DP run records about its guarantee, in ``metrics.json`` and in the adapter's ``adapter.json``.

Whoever receives an adapter should see whether it was trained privately without reading the run's logs: the
``privacy`` entry of ``adapter.json`` says ``"private": false`` for a run whose noise came from the run's seed
(``--dp-insecure-seed``) or that added no noise, and names what was not released.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lorakit.adapters.io import CONFIG_FILE, atomic_write

SECURE_SOURCE = "os.urandom (seed never stored)"
INSECURE_SOURCE = (
    "derived from the run's seed (--dp-insecure-seed): whoever has the seed can remove the noise"
)


def privacy_record(mechanism: str, epsilon: float, delta: float, insecure: bool) -> dict[str, Any]:
    """``private`` is true only for secure randomness and a finite epsilon; ``randomness`` says where the
    noise and the sampling came from."""
    return {
        "private": not insecure and math.isfinite(epsilon),
        "mechanism": mechanism,
        "epsilon": epsilon,
        "delta": delta,
        "randomness": INSECURE_SOURCE if insecure else SECURE_SOURCE,
    }


def mark_adapter(directory: str | Path, record: dict[str, Any]) -> None:
    """Add ``record`` as the ``privacy`` entry of the ``adapter.json`` that :func:`lorakit.save` wrote."""
    path = Path(directory) / CONFIG_FILE
    meta = json.loads(path.read_text())
    meta["privacy"] = record
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
