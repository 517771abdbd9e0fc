"""Differential privacy: DP-SGD for any variant on one machine, and privacy accounting.

Opacus supplies the mechanics (per-example gradient hooks, clipping and noise, Poisson sampling, RDP/PRV
accountants); lorakit adds a per-example gradient rule for its adapter modules and a training loop that runs
the variants' hooks on the privatised gradient. Install with ``pip install 'lorakit[privacy]'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lorakit.privacy.config import DPConfig, PrivacyError


def require(module: str, extra: str = "privacy") -> ModuleType:
    """Import an optional dependency, or raise an ImportError naming the lorakit extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{module.split('.')[0]} is needed here but not installed: pip install 'lorakit[{extra}]'"
        ) from None


__all__ = ["DPConfig", "PrivacyError", "require"]
