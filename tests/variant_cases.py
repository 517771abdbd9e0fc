"""Config each variant uses in the generated tests, chosen so its special behaviour really happens."""

from __future__ import annotations

from typing import Any

# Variants not listed here use {"rank": 4}. Keep these small and fast.
CASES: dict[str, dict[str, Any]] = {
    "lora": {"rank": 4, "alpha": 8.0},
}


def case_config(name: str) -> dict[str, Any]:
    return dict(CASES.get(name, {"rank": 4}))
