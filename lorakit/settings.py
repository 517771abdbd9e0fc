"""Shared pieces of the settings dataclasses: validation that names the first invalid field, and ``--set``."""

from __future__ import annotations

from typing import Any

import yaml

from lorakit.errors import SettingError


def check_settings(settings: object, checks: dict[str, bool], what: str, rules: str) -> None:
    """Raise ``SettingError`` naming the first field of ``settings`` whose check in ``checks`` is False."""
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise SettingError(f"invalid {what} setting {bad[0]}={getattr(settings, bad[0])!r} ({rules})")


def parse_assignments(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """``["ratio=16", "init=gaussian"]`` -> ``{"ratio": 16, "init": "gaussian"}``; values are read as YAML."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SettingError(f"{flag} expects FIELD=VALUE, got '{item}'")
        value = yaml.safe_load(raw)
        if isinstance(value, str):
            try:  # YAML 1.1 reads '1e-3' (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        elif not isinstance(value, (int, float, bool, list, dict, type(None))):
            value = raw  # dates and the like stay as written
        values[key.strip()] = value
    return values
