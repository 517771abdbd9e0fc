"""Shared pieces of the settings dataclasses: one value parser for flags, ``--set`` and config files, type and
range checks against each field's annotation and declared interval, and validation that names the first
invalid field.

Every numeric setting goes through the same steps wherever it comes from (a command-line flag, a YAML job or
bench file, Flower's run config, a Python argument): text is read by :func:`parse_value`, converted to the
field's type by :func:`coerce_field`, and checked against the interval its :func:`setting` declares by
:func:`check_fields`. An optional setting (``int | None``) is unset only when it is None: 0 is a number like
any other and must lie in the interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from lorakit.common.errors import SettingError


def setting(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    within: str | None = None,
) -> Any:
    """A settings dataclass field whose ``doc`` is its ``--help`` text (``factory`` for mutable defaults).

    ``within``: the interval a numeric value must lie in, written as in mathematics: ``"[1, inf)"`` (at least
    1), ``"(0, inf)"`` (positive and finite), ``"[0, 1)"``; checked by :func:`check_fields`.
    """
    metadata = {"help": doc} | ({"within": Interval.parse(within)} if within is not None else {})
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Interval:
    """A range of numbers, each end open or closed; an open end at ``inf`` refuses infinity (and NaN lies in
    no interval)."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        """``"[0, 1)"`` -> ``Interval(0, 1, True, False)``."""
        match = re.fullmatch(r"\s*([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])\s*", text)
        if match is None:
            raise ValueError(f"not an interval: {text!r} (write it as [low, high), (0, inf), ...)")
        left, low, high, right = match.groups()
        return cls(float(low), float(high), left == "[", right == "]")

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def describe(self, integer: bool) -> str:
        """What a value must be, in words: ``an integer >= 1``, ``a number in [0, 1)``, or ``a finite number
        > 0`` (an open end at infinity)."""
        kind = "an integer" if integer else "a number"
        if self.high == math.inf and not self.high_closed:
            low = _number(self.low)
            return f"{kind if integer else 'a finite number'} {'>=' if self.low_closed else '>'} {low}"
        left, right = "[" if self.low_closed else "(", "]" if self.high_closed else ")"
        return f"{kind} in {left}{_number(self.low)}, {_number(self.high)}{right}"


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else str(value)


def field_help(f: dataclasses.Field) -> str:
    """The ``--help`` text of a settings field (its name when it has none)."""
    return f.metadata.get("help", f.name)


def check_settings(settings: object, checks: dict[str, bool], what: str, rules: str | dict[str, str]) -> None:
    """Raise ``SettingError`` naming the first field of ``settings`` whose check in ``checks`` is False, with
    ``rules`` (one text for all fields, or one per field: what the field must be)."""
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        rule = rules if isinstance(rules, str) else f"it must be {rules[bad[0]]}"
        raise SettingError(f"invalid {what} setting {bad[0]}={getattr(settings, bad[0])!r} ({rule})")


def parse_value(raw: str) -> Any:
    """A setting written as text: a number, a boolean, a list or mapping (YAML), or the text itself.

    YAML 1.1 reads ``1e-3`` (no dot) as text; such numbers are read as numbers here, so ``lr: 1e-3`` in a
    config file and ``--set lr=1e-3`` mean the same.
    """
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if not isinstance(value, (int, float, bool, list, dict, type(None))):
        return raw  # dates and the like stay as written
    return value


def parse_assignments(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """``["ratio=16", "init=gaussian"]`` -> ``{"ratio": 16, "init": "gaussian"}`` via parse_value."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SettingError(f"{flag} expects FIELD=VALUE, got '{item}'")
        values[key.strip()] = parse_value(raw)
    return values


def _options(hint: Any) -> list[Any]:
    """The alternatives of a union annotation (``int | None`` -> ``[int, NoneType]``), else ``[hint]``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return list(typing.get_args(hint))
    return [hint]


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """``(fits, value)``: whether ``value`` can be read as ``hint``, and the value so read (text given for a
    number is parsed like ``--set``; a whole float given for an int becomes the int)."""
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True, value
    if isinstance(value, os.PathLike) and hint is str:
        return True, os.fspath(value)
    if not isinstance(value, (str, int, float, list, tuple, dict, type(None))):
        return True, value  # an object from Python code (a torch dtype): the field's own validation judges it
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint in (int, float):
        if isinstance(value, str):
            value = parse_value(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        if hint is int:
            whole = isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())
            return whole, int(value) if whole else value
        return True, float(value)
    if hint is str:
        return isinstance(value, str), value
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        converted = [_convert(v, inner) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    if origin is dict:
        return isinstance(value, dict), value
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint), value
    return True, value  # an annotation this check does not know: leave it to the field's own validation


def _describe(hint: Any, unset: str = "null") -> str:
    names = []
    for option in _options(hint):
        if option is type(None):
            names.append(unset)
        elif option in (int, float):
            names.append({int: "an integer", float: "a number"}[option])
        elif option is str:
            names.append("text")
        elif option is bool:
            names.append("true or false")
        elif typing.get_origin(option) in (list, tuple):
            names.append("a list")
        elif typing.get_origin(option) is dict:
            names.append("a mapping")
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(names)


def coerce_field(cls: type, name: str, value: Any, what: str) -> Any:
    """``value`` read as the type of dataclass field ``cls.name``; ``SettingError`` if it is not one."""
    hint = typing.get_type_hints(cls)[name]
    for option in _options(hint):
        ok, converted = _convert(value, option)
        if ok:
            return converted
    raise SettingError(f"invalid {what} setting {name}={value!r}: it must be {_describe(hint)}")


def check_fields(settings: object, what: str) -> None:
    """Raise ``SettingError`` naming the first field whose value is not of its annotated type, or is a number
    outside the interval its :func:`setting` declares; numbers given as text and whole floats given for
    integers are converted in place. None (an optional setting left unset) has no range."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):  # type: ignore[arg-type]
        value = getattr(settings, f.name)
        converted = coerce_field(type(settings), f.name, value, what)
        if converted is not value:
            object.__setattr__(settings, f.name, converted)
        interval = f.metadata.get("within")
        if interval is None or converted is None or isinstance(converted, bool):
            continue
        if not isinstance(converted, (int, float)) or converted not in interval:
            integer = int in _options(hints[f.name])
            raise SettingError(
                f"invalid {what} setting {f.name}={converted!r}: it must be {interval.describe(integer)}; "
                f"{f.name}: {field_help(f)}"
            )


def flag_type(cls: type, name: str) -> Callable[[str], Any]:
    """The argparse ``type`` of field ``cls.name``: the text read like a config-file value and converted to
    the field's type (``none`` unsets an optional setting); the range is checked when the settings are built,
    as for a config file."""
    hint = typing.get_type_hints(cls)[name]
    text_field = str in _options(hint)

    def parse(text: str) -> Any:
        if type(None) in _options(hint) and text.strip().lower() in ("none", "null"):
            return None
        value = text if text_field else parse_value(text)
        try:
            return coerce_field(cls, name, value, "")
        except SettingError:
            described = _describe(hint, unset="none")
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: it must be {described}") from None

    parse.__name__ = _describe(hint, unset="none")  # argparse names the type in its own messages
    return parse
