"""One check for settings dataclasses: the first invalid field is named with its value and the rule."""

from __future__ import annotations


def check_settings(settings: object, checks: dict[str, bool], what: str, rules: str) -> None:
    """Raise ``ValueError`` naming the first field of ``settings`` whose check in ``checks`` is False."""
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"invalid {what} setting {bad[0]}={getattr(settings, bad[0])!r} ({rules})")
