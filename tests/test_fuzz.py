"""Property-based fuzzing of everything that reads user input: config and job files (through the command
line), bench files, data files, and both adapter formats. Random and mutated inputs give a result or a clear
:class:`lorakit.common.errors.LorakitError`, never another exception; a failed adapter load leaves the model
exactly as it was."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_zoo import MLP, perturb
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.bench.run import read_bench
from lorakit.cli import build_parser, main
from lorakit.common.errors import LorakitError
from lorakit.data.datasets import ClassLabels, read_rows, texts
from lorakit.interop import load_peft, save_peft
from lorakit.jobs.cliargs import _leaf_fields, job_from_args, job_from_values, job_values

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


# --- config files ----------------------------------------------------------------------------------------
@FUZZ
@given(
    st.dictionaries(st.sampled_from(sorted(_leaf_fields())) | st.text(max_size=8), json_values, max_size=6)
)
def test_any_config_mapping_is_a_job_or_a_lorakit_error(values: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(values))
        try:
            job = job_from_args(build_parser().parse_args(["train", "--config", str(path)]))
        except LorakitError:
            return
    assert isinstance(job.train.lr, float) and job.train.lr > 0 and job.data.max_length > 0


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("abc: -[]{}'\"\n\t#&*!|>%@`0123456789.e")), max_size=60))
def test_any_config_text_is_a_job_or_a_lorakit_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(text)
        try:
            job_from_args(build_parser().parse_args(["train", "--config", str(path)]))
        except LorakitError:
            pass


# --- job files through the command line, and bench files ----------------------------------------------------
EDGES = st.sampled_from(
    [
        0,
        -1,
        1,
        2,
        0.5,
        -0.0,
        1e308,
        2**40,
        math.nan,
        math.inf,
        "0",
        "1e-3",
        "1.0",
        "none",
        "",
        "abc",
        None,
        True,
    ]
)
JOB_KEYS = (
    st.sampled_from(sorted(_leaf_fields()))
    | st.sampled_from(["data", "train", "privacy"])
    | st.text(max_size=6)
)
NUMERIC = sorted(
    name for name, (_, _, hint) in _leaf_fields().items() if {int, float} & {hint, *typing.get_args(hint)}
)
JOB_FILES = st.dictionaries(  # mostly numbers, near and across their ranges: most become jobs
    st.sampled_from(NUMERIC), EDGES | st.integers(-3, 700) | st.floats(-1, 2), max_size=5
) | st.dictionaries(
    JOB_KEYS,
    EDGES | json_values | st.dictionaries(st.sampled_from(sorted(_leaf_fields())), EDGES, max_size=3),
    max_size=6,
)


class Reached(BaseException):
    """The job file became a job and training would start now."""


def within_ranges(job: Any) -> None:
    """Every number of a built job lies in the interval its setting declares, and the variant takes it."""
    for section in (job, job.data, job.train, job.privacy):
        for f in dataclasses.fields(section):
            value, interval = getattr(section, f.name), f.metadata.get("within")
            if interval is not None and value is not None:
                assert value in interval, (f.name, value)
    job.variant_config()


@FUZZ
@given(values=JOB_FILES)
def test_any_job_file_becomes_a_checked_job_or_one_line(values: dict[Any, Any], monkeypatch, capsys) -> None:
    """``lorakit train --config FILE``: a job whose every number is in range, or exit 2 with one line."""

    def reached(job: Any) -> None:
        within_ranges(job)
        raise Reached

    with tempfile.TemporaryDirectory() as tmp, monkeypatch.context() as m:
        m.setattr("lorakit.jobs.job.run_job", reached)
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump(values))
        capsys.readouterr()
        try:
            code = main(["train", "--config", str(path), "--output-dir", str(Path(tmp) / "out")])
        except Reached:
            return
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lorakit: error: ") and err.count("\n") == 1, err
    assert "internal error" not in err


@FUZZ
@given(JOB_FILES, st.lists(JOB_FILES, max_size=3))
def test_any_bench_file_is_runs_of_checked_jobs_or_a_lorakit_error(defaults: dict, runs: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        spec = {"defaults": defaults, "runs": [{"name": f"r{i}", **run} for i, run in enumerate(runs)]}
        path.write_text(yaml.safe_dump(spec))
        try:
            bench = read_bench(path)
        except LorakitError:
            return
    for run in bench.runs:
        within_ranges(job_from_values(job_values(bench.settings[run["name"]], run["name"])))


# --- data files ------------------------------------------------------------------------------------------
PIECES = [*'ab1.9-, \t\n"{}[]:\\é', "label", "sentence", "\r\n"]
ROW_TEXT = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


@FUZZ
@given(st.sampled_from([".tsv", ".csv", ".jsonl", ".json"]), ROW_TEXT | st.binary(max_size=60).map(repr))
def test_any_data_file_is_rows_or_a_lorakit_error(suffix: str, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d{suffix}"
        path.write_text(text, encoding="utf-8")
        try:
            rows = read_rows(str(path))
            for name in rows[0]:
                texts(rows, name, "d")
                classes = ClassLabels.from_rows(rows, name, "d")
                ids = classes.ids(rows, name, "d")
                assert all(0 <= i < classes.count for i in ids) and len(ids) == len(rows)
        except LorakitError:
            pass


@FUZZ
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["sentence", "label", "x"]), json_values, max_size=3), max_size=5
    )
)
def test_any_json_rows_are_classes_or_a_lorakit_error(rows: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        try:
            classes = ClassLabels.from_rows(read_rows(str(path)), "label", "d")
            assert classes.count >= 2
        except LorakitError:
            pass


# --- adapter files ---------------------------------------------------------------------------------------
def mutate_json(data: Any, draw: st.DrawFn) -> Any:
    """One random edit somewhere in a JSON document: drop a key, or replace a value with a random one."""
    if isinstance(data, dict) and data and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(data)))
        if draw(st.booleans()):
            return {k: v for k, v in data.items() if k != key}
        return {**data, key: mutate_json(data[key], draw)}
    if isinstance(data, list) and data and draw(st.booleans()):
        i = draw(st.integers(0, len(data) - 1))
        return [*data[:i], mutate_json(data[i], draw), *data[i + 1 :]]
    return draw(json_values)


def mutate_tensors(tensors: dict[str, torch.Tensor], draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """One random edit of a tensor file: drop, add, transpose, reshape, retype or poison a tensor."""
    tensors = dict(tensors)
    key = draw(st.sampled_from(sorted(tensors)))
    edit = draw(st.sampled_from(["drop", "add", "transpose", "reshape", "int", "nan", "rename"]))
    t = tensors[key]
    if edit == "drop":
        del tensors[key]
    elif edit == "add":
        shape = tuple(draw(st.lists(st.integers(1, 20), min_size=1, max_size=2)))
        name = draw(st.sampled_from([key + "x", "fc1.weight", "fc2.bias", "base_model.model.fc1.weight"]))
        tensors[name] = torch.ones(shape)
    elif edit == "transpose" and t.dim() == 2:
        tensors[key] = t.T.contiguous()
    elif edit == "reshape":
        tensors[key] = t.reshape(-1).contiguous()
    elif edit == "int":
        tensors[key] = t.to(torch.int64)
    elif edit == "nan":
        tensors[key] = torch.full_like(t, float("nan"))
    else:
        tensors[key.replace(".", "_", 1)] = tensors.pop(key)
    return tensors


def check_load(load, directory: Path) -> None:
    """``load(model, directory)`` succeeds and the model runs, or raises a LorakitError leaving the model
    exactly as it was."""
    torch.manual_seed(0)
    model = MLP()  # the base the adapter was trained on
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        load(model, directory)
    except LorakitError:
        assert not hasattr(model, "lorakit")
        assert not any(isinstance(m, lorakit.AdaptedLayer) for m in model.modules())
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(p.requires_grad for p in model.parameters())
        return
    with torch.no_grad():  # a loaded adapter runs (non-finite values are the finite checks' concern)
        assert model(torch.ones(2, 12)).shape == (2, 7)


def adapter_dir(tmp: Path, variant: str, save) -> Path:
    torch.manual_seed(0)
    if save is lorakit.save:  # a fully trained module too
        model = lorakit.apply(MLP(), variant, targets=["fc1"], rank=3, train_modules=["fc2"])
    else:
        model = lorakit.apply(MLP(), variant, targets=["fc1", "fc2"], rank=3)
    perturb(model)
    save(model, tmp)
    return tmp


LOADERS = {
    "lorakit": (lorakit.save, lorakit.load, "adapter.json", "adapter.safetensors"),
    "peft": (save_peft, load_peft, "adapter_config.json", "adapter_model.safetensors"),
}


@pytest.mark.parametrize("fmt", sorted(LOADERS))
@FUZZ
@given(data=st.data())
def test_a_mutated_config_file_loads_or_is_refused_untouched(fmt: str, data: st.DataObject) -> None:
    save, load, config_file, _ = LOADERS[fmt]
    with tempfile.TemporaryDirectory() as tmp:
        path = adapter_dir(Path(tmp), "lora", save)
        config = json.loads((path / config_file).read_text())
        (path / config_file).write_text(json.dumps(mutate_json(config, data.draw)))
        check_load(load, path)


@pytest.mark.parametrize("fmt", sorted(LOADERS))
@FUZZ
@given(data=st.data())
def test_a_mutated_weights_file_loads_or_is_refused_untouched(fmt: str, data: st.DataObject) -> None:
    save, load, _, weights_file = LOADERS[fmt]
    with tempfile.TemporaryDirectory() as tmp:
        path = adapter_dir(Path(tmp), data.draw(st.sampled_from(["lora", "dora", "loha"])), save)
        weights = path / weights_file
        if data.draw(st.booleans()):
            save_file(mutate_tensors(load_file(weights), data.draw), weights)
        else:  # damaged bytes: flipped or cut
            raw = bytearray(weights.read_bytes())
            for _ in range(data.draw(st.integers(1, 4))):
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
            weights.write_bytes(bytes(raw[: data.draw(st.integers(1, len(raw)))]))
        check_load(load, path)
