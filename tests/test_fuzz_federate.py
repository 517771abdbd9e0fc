"""Property-based fuzzing of ``lorakit federate``: random flags and random data files end in a trained adapter
or in one line naming the problem (exit 2): never a traceback, an internal error, or a run that says
"adapter saved" although no client trained.

The ServerApp and ClientApp run as they are; a LocalGrid stands in for Flower's Ray engine (see
``fed_harness.py``), so each case costs a few tiny-model steps instead of a simulation.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

pytest.importorskip("flwr", reason="federated tests need lorakit[federated]")

from fed_harness import use_local_engine  # noqa: E402
from test_fuzz import FUZZ  # noqa: E402  (the same settings: derandomized, 40 cases)

from lorakit.cli import main  # noqa: E402

# Values near and past each setting's limits; the counts stay small so that a case that trains stays cheap.
COUNTS = st.sampled_from([-1, 0, 1, 2, 3])
FLOATS = st.sampled_from([-1.0, 0.0, 1e-3, 0.5, 1.0, 3.0, 1e4, math.nan, math.inf, -math.inf])
FLAGS: dict[str, st.SearchStrategy[Any]] = {
    "--clients": st.sampled_from([-1, 0, 1, 2, 3, 4, 50]),
    "--cohort": st.sampled_from([-1, 0, 1, 2, 3, 4, 50]),
    "--rounds": COUNTS,
    "--local-steps": COUNTS,
    "--batch-size": st.sampled_from([-1, 0, 1, 4, 1000]),
    "--rank": st.sampled_from([-1, 0, 1, 4]),
    "--num-labels": st.sampled_from([-1, 0, 1, 2, 3, 5]),
    "--max-length": st.sampled_from([-1, 0, 1, 8]),
    "--eval-examples": st.sampled_from([-1, 0, 1, 5]),
    "--eval-every": COUNTS,
    "--seed": st.sampled_from([-1, 0, 7]),
    "--alpha": FLOATS,
    "--dropout": st.sampled_from([-0.5, 0.0, 0.1, 1.0, 2.0, math.nan]),
    "--lr": FLOATS,
    "--server-lr": FLOATS,
    "--noise-multiplier": FLOATS,
    "--clip-norm": FLOATS,
    "--target-epsilon": FLOATS,
    "--delta": st.sampled_from([-1.0, 0.0, 1e-5, 0.5, 1.0, math.nan]),
    "--skew": FLOATS,
    "--round-timeout": st.sampled_from([-1.0, 0.0, 5.0, math.nan]),
    "--variant": st.sampled_from(
        ["lora", "dp_dylora", "dora", "vera", "lora_drop", "adalora", "delta_lora", "no-such", ""]
    ),
    "--targets": st.sampled_from(["query,value", "query", "nothing", "", ",", "all-linear"]),
    "--options": st.sampled_from(["", '{"min_rank": 1}', '{"min_rank": 9}', '{"x": 1}', "[1]", "{bad"]),
    "--set": st.sampled_from(["min_rank=1", "min_rank=0", "min_rank", "=3", "nope=1"]),
    "--sampling": st.sampled_from(["poisson", "fixed", "random"]),
    "--partition": st.sampled_from(["iid", "label-skew", "shards"]),
    "--accountant": st.sampled_from(["rdp", "prv", "gdp"]),
    "--text-column": st.sampled_from(["sentence", "text", ""]),
    "--label-column": st.sampled_from(["label", "y", ""]),
    "--num-cpus": st.sampled_from([-1, 0, 1]),
    "--dp-insecure-seed": st.just(None),
    "--eval-data": st.sampled_from(["clients", "DATA", "MISSING", "demo", ""]),
}
# a value of the wrong kind (for a number) or a stray one (for a name)
GARBAGE = st.sampled_from(["abc", "1.5.2", "", "1e", "0x10", "-"])

LABELS = st.sampled_from([0, 1, 2, 7, -1, "pos", "neg", "", " ", "1.0", "1.5", "nan", True, None, [1]])
TEXTS = st.sampled_from(["a good film", "bad", "", "x\ty", "ünïcödé", 3, None])


def table(suffix: str, rows: list[dict[str, Any]]) -> str:
    """``rows`` as the text of a ``suffix`` file (a header line for TSV and CSV)."""
    if suffix == ".jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows)
    sep = "\t" if suffix == ".tsv" else ","
    lines = [sep.join(["sentence", "label"])]
    lines += [sep.join(str(row[k]) for k in ("sentence", "label")) for row in rows]
    return "\n".join(lines) + "\n"


def clean_rows(count: int, names: list[Any]) -> list[dict[str, Any]]:
    return [
        {"sentence": f"a {'good' if i % 2 else 'bad'} film {i}", "label": names[i % 2]} for i in range(count)
    ]


@st.composite
def data_files(draw: st.DrawFn) -> tuple[str, str]:
    """A data file: a clean two-class task (class ids or names) or rows of random texts and labels, as TSV,
    CSV or JSON lines; returns its suffix and text."""
    suffix = draw(st.sampled_from([".tsv", ".csv", ".jsonl"]))
    kind = draw(st.sampled_from(["ids", "names", "ids", "names", "random"]))
    count = draw(st.integers(0, 12))
    if kind == "random":
        rows = [{"sentence": draw(TEXTS), "label": draw(LABELS)} for _ in range(count)]
    else:
        rows = clean_rows(count, ["neg", "pos"] if kind == "names" else [0, 1])
    return suffix, table(suffix, rows)


CLEAN = (".tsv", table(".tsv", clean_rows(8, [0, 1])))
NAMED = (".jsonl", table(".jsonl", clean_rows(8, ["neg", "pos"])))


@st.composite
def flag_sets(draw: st.DrawFn) -> list[str]:
    """A handful of flags with values near or past their limits (sometimes a value of the wrong kind)."""
    chosen = draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=4, unique=True))
    args: list[str] = []
    for flag in chosen:
        value = draw(FLAGS[flag])
        if value is None:
            args.append(flag)
            continue
        if draw(st.integers(0, 9)) == 0:
            value = draw(GARBAGE)
        args += [flag, str(value)]
    return args


@pytest.fixture
def local_engine(monkeypatch) -> list:
    return use_local_engine(monkeypatch)


@FUZZ
@given(data=data_files(), flags=flag_sets())
# Cases that once ended silently or ran past their limits, kept whatever the generator draws.
@example(data=CLEAN, flags=["--lr", "1e4"])  # every client diverges
@example(data=CLEAN, flags=["--lr", "1e4", "--clip-norm", "1", "--noise-multiplier", "0.5"])
@example(data=CLEAN, flags=["--lr", "inf"])
@example(data=CLEAN, flags=["--server-lr", "inf"])
@example(data=CLEAN, flags=["--server-lr", "1e30", "--rounds", "2"])
@example(data=CLEAN, flags=["--clip-norm", "1", "--target-epsilon", "1e-3", "--sampling", "poisson"])
@example(data=CLEAN, flags=["--clip-norm", "1", "--noise-multiplier", "1", "--eval-data", "clients"])
@example(data=CLEAN, flags=["--cohort", "1", "--sampling", "poisson", "--seed", "3"])
@example(data=CLEAN, flags=["--clients", "50"])
@example(data=CLEAN, flags=["--num-labels", "1"])
@example(data=NAMED, flags=["--num-labels", "5"])
@example(data=NAMED, flags=["--eval-data", "demo"])
@example(data=NAMED, flags=["--partition", "label-skew", "--skew", "1e-3"])
@example(data=CLEAN, flags=["--variant", "lora_drop"])
@example(data=CLEAN, flags=["--variant", "adalora"])
@example(data=CLEAN, flags=["--variant", "delta_lora", "--set", "start_step=1"])
@example(data=CLEAN, flags=["--targets", "nothing"])
@example(data=CLEAN, flags=["--set", "min_rank=9"])
@example(data=CLEAN, flags=["--alpha", "inf"])
@example(data=CLEAN, flags=["--eval-data", "MISSING"])
@example(data=(".tsv", "sentence\tlabel\n"), flags=[])
def test_any_federate_flags_and_data_train_or_end_in_one_clear_line(
    data: tuple[str, str], flags: list[str], tiny_bert_dir: Path, local_engine: list, capsys
) -> None:
    suffix, text = data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"train{suffix}"
        path.write_text(text, encoding="utf-8")
        out = Path(tmp) / "out"
        places = {"DATA": str(path), "MISSING": str(Path(tmp) / "missing.tsv")}
        flags = [places.get(value, value) for value in flags]
        base = [
            "federate",
            "--model",
            str(tiny_bert_dir),
            "--data",
            str(path),
            "--clients",
            "2",
            "--cohort",
            "2",
        ]
        base += ["--sampling", "fixed", "--rounds", "1", "--local-steps", "1", "--max-length", "16"]
        base += ["--targets", "query,value", "--rank", "2", "--output-dir", str(out)]
        local_engine.clear()
        code = main([*base, *flags])
        printed = capsys.readouterr()
        assert "Traceback" not in printed.out + printed.err
        if code == 2:
            lines = printed.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("lorakit: error: "), printed.err
            assert not out.exists()  # nothing saved
            return
        assert code == 0, printed.err  # not an internal error (exit 1)
        assert f"adapter saved to {out}" in printed.out
        trained = [
            m
            for grid in local_engine
            for m in grid.replies
            if m.metadata.message_type == "train" and not m.has_error()
        ]
        assert trained, "exit 0 although no client trained"
        assert (out / "adapter.safetensors").is_file() and json.loads((out / "metrics.json").read_text())[
            "rounds"
        ]
