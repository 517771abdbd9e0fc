"""Command-line flags generated from the job dataclasses, and YAML configs checked against them.

Each field's ``help`` metadata (:func:`lorakit.common.settings.setting`) is its ``--help`` text, so settings
are documented once.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lorakit.common.errors import SettingError
from lorakit.common.settings import coerce_field, field_help, flag_type, parse_assignments
from lorakit.jobs.config import DataConfig, JobConfig
from lorakit.privacy.config import DPConfig
from lorakit.train.loop import TrainConfig

# Job fields ("") and the nested sections; a section's fields are flags too, and a YAML key of its own.
SECTIONS: dict[str, type] = {"": JobConfig, "data": DataConfig, "train": TrainConfig, "privacy": DPConfig}


def _leaf_fields() -> dict[str, tuple[str, dataclasses.Field, type]]:
    """Flag name -> (section, field, annotated type) for every non-nested field."""
    leaves = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in SECTIONS.values():
                continue
            leaves[f.name] = (section, f, hints[f.name])
    return leaves


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per job setting; unset flags stay absent so YAML values and defaults show through."""
    parser.add_argument("--config", help="YAML file with job settings (flags given here override it)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a variant config field, e.g. --set ratio=16 (repeatable)",
    )
    for name, (section, f, hint) in _leaf_fields().items():
        if name == "options":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{field_help(f)} (default: {default})"
        flag = "--" + name.replace("_", "-")
        if hint is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
        elif name == "targets":
            parser.add_argument(flag, dest=name, type=_flag(_targets), default=argparse.SUPPRESS, help=text)
        elif name == "resume":  # --resume, --resume auto, --no-resume
            parser.add_argument(
                flag, dest=name, nargs="?", const=True, type=_flag(_resume), default=argparse.SUPPRESS,
                metavar="auto", help=text,
            )  # fmt: skip
            parser.add_argument(
                "--no-resume", dest=name, action="store_false", default=argparse.SUPPRESS, help="start anew"
            )
        elif name == "labels":
            parser.add_argument(
                flag, dest=name, type=_names, default=argparse.SUPPRESS, help=f"{text}; comma-separated"
            )
        else:
            parse = flag_type(SECTIONS[section], name)
            parser.add_argument(flag, dest=name, type=parse, default=argparse.SUPPRESS, help=text)


def _flag(parse: Any) -> Any:
    """``parse`` as an argparse type: its own message instead of argparse's 'invalid value'."""

    def parse_flag(text: str) -> Any:
        try:
            return parse(text)
        except SettingError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse_flag


def _targets(text: str) -> str | list[str]:
    """'all-linear', a regex (contains regex syntax), or comma-separated module-name suffixes."""
    if text == "all-linear":
        return text
    if re.search(r"[\\^$*+?()\[\]|{}]", text):
        try:
            re.compile(text)
        except re.error as err:
            raise SettingError(
                f"targets {text!r} is not a valid regular expression ({err}); fix it, or pass "
                "comma-separated module-name suffixes like query,value"
            ) from None
        return text
    names = _names(text)
    if not names:
        raise SettingError(
            "targets is empty; pass module-name suffixes like query,value, a regex or all-linear"
        )
    return names


def _resume(text: str) -> str:
    if text != "auto":
        raise SettingError(f"--resume takes no value or 'auto', got {text!r}")
    return text


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def job_from_args(args: argparse.Namespace) -> JobConfig:
    """Defaults, then the YAML file, then the flags given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(_read_yaml(Path(args.config)))
    leaves = _leaf_fields()
    values.update({k: v for k, v in vars(args).items() if k in leaves})
    return job_from_values(values, getattr(args, "set", []) or [])


def job_from_values(values: dict[str, Any], assignments: list[str] | None = None) -> JobConfig:
    """A job from flat setting values (as :func:`job_values` gives them) and ``--set`` assignments, each value
    read as its field's type and range-checked (:mod:`lorakit.common.settings`)."""
    values = dict(values)
    leaves = _leaf_fields()
    options = values.pop("options", None) or {}
    if not isinstance(options, dict):
        raise SettingError(f"options must be a mapping of variant config fields, got {options!r}")
    if any(not isinstance(key, str) for key in options):
        raise SettingError(f"options must map field names (text) to values, got keys {list(options)}")
    options = dict(options)
    options.update(parse_assignments(assignments or []))
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, value in values.items():
        section = leaves[name][0]
        what = {"": "job", "train": "training"}.get(section, section)  # as the settings classes say
        sections[section][name] = coerce_field(SECTIONS[section], name, value, what)
    job = JobConfig(
        **sections[""],
        options=options,
        **{name: SECTIONS[name](**values) for name, values in sections.items() if name},
    )
    job.privacy.check_used(name for name in values if leaves[name][0] == "privacy")
    if job.train.eval_every and job.data.eval_source() is None:  # it would train without evaluating
        raise SettingError(
            f"--eval-every {job.train.eval_every} evaluates on the evaluation data, and there is none: add "
            "--eval-data PATH (eval_data), or drop --eval-every"
        )
    return job


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the second would silently win) and a
    key that is no plain value (a list or mapping as a key names no setting)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain name, not a list or mapping", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"setting {key!r} is given twice; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _refused(what: str, fix: str) -> Callable[[yaml.SafeLoader, yaml.Node], Any]:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        problem = f"{what} is no setting value; {fix}"
        raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark)

    return construct


# Values the safe loader builds beyond JSON's (dates, sets, bytes, ordered pairs): no setting takes one, and
# each would pass for "some object" until a run had trained and wrote its settings down.
for _tag, _what, _fix in (
    ("timestamp", "a date or time", "quote it to give text"),
    ("set", "a set (!!set)", "write a list"),
    ("binary", "bytes (!!binary)", "write text"),
    ("omap", "an ordered mapping (!!omap)", "write a mapping"),
    ("pairs", "a list of pairs (!!pairs)", "write a mapping"),
):
    _UniqueKeys.add_constructor(f"tag:yaml.org,2002:{_tag}", _refused(_what, _fix))


def load_yaml(text: str) -> Any:
    """YAML ``text`` read with the safe loader, each key given once (:class:`_UniqueKeys`)."""
    return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a subclass of the safe loader


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise SettingError(f"cannot read config {path}: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise SettingError(f"config {path} must be a mapping of settings (name: value lines)")
    return job_values(raw, f"config {path}")


def job_values(raw: dict[Any, Any], where: str) -> dict[str, Any]:
    """Job settings written as a mapping (a config file, a bench run), sections (``train:``...) flattened;
    an unknown name is refused, naming ``where`` and the known ones."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        pairs = value.items() if key and key in SECTIONS and isinstance(value, dict) else [(key, value)]
        for name, setting in pairs:
            if name in flat:  # at the top and in a section: the later one would silently win
                raise SettingError(f"{where}: setting {name!r} is given twice (once in a section); keep one")
            flat[name] = setting
    known = set(_leaf_fields())
    unknown = sorted(set(flat) - known, key=str)
    if unknown:
        raise SettingError(
            f"{where}: unknown setting(s) {unknown}; known settings: {', '.join(sorted(known))}"
        )
    if isinstance(flat.get("targets"), str):
        flat["targets"] = _targets(flat["targets"])
    if isinstance(flat.get("labels"), str):
        flat["labels"] = _names(flat["labels"])
    return flat
