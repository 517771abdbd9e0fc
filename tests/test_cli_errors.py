"""Every failure a user can cause on the command line: one line naming the problem, exit code 2."""

from __future__ import annotations

import json

import pytest

import lorakit
from lorakit.cli import main
from lorakit.common.errors import LorakitError


def test_every_project_error_derives_from_the_one_base() -> None:
    from lorakit.adapters.api import TargetError
    from lorakit.adapters.io import AdapterFileError
    from lorakit.adapters.quantize import QuantizationError
    from lorakit.core.config import ConfigError
    from lorakit.data.datasets import DataError
    from lorakit.jobs.models import ModelError
    from lorakit.privacy.config import PrivacyError

    for cls in (
        lorakit.DirectoryInUseError,
        lorakit.DiskFullError,
        TargetError,
        ConfigError,
        AdapterFileError,
        PrivacyError,
        QuantizationError,
        DataError,
        ModelError,
    ):
        assert issubclass(cls, LorakitError) and issubclass(cls, ValueError), cls


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_shows_the_traceback(where, capsys) -> None:
    argv = ["eval", "--adapter", "/nonexistent"]
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(LorakitError, match="not a lorakit adapter directory"):
        main(["--debug", *argv] if where == "before" else [*argv, "--debug"])


def _train(tiny_bert_dir, out, *extra: str) -> list[str]:
    base = ["train", "--model", str(tiny_bert_dir), "--output-dir", str(out), "--no-progress", "--steps", "2"]
    return [*base, "--batch-size", "4", "--targets", "query", *extra]


@pytest.fixture
def named(tmp_path):
    """A three-class task labelled by name, with evaluation data."""
    lines = [f"it was {w}\t{c}" for w, c in [("good", "pos"), ("bad", "neg"), ("okay", "meh")] * 4]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    (tmp_path / "test.tsv").write_text("sentence\tlabel\n" + "\n".join(lines[:3]) + "\n")
    return tmp_path


def test_named_labels_train_and_evaluate_with_the_saved_vocabulary(named, tiny_bert_dir, capsys) -> None:
    out = named / "run"
    argv = _train(
        tiny_bert_dir, out, "--data", str(named / "train.tsv"), "--eval-data", str(named / "test.tsv")
    )
    assert main(argv) == 0
    job = json.loads((out / "job.json").read_text())
    assert (job["num_labels"], job["labels"]) == (3, ["meh", "neg", "pos"])
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0
    assert f"accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}" in capsys.readouterr().out
    (named / "unseen.tsv").write_text("sentence\tlabel\nit was good\tpos\nit was odd\tweird\n")
    assert main(["eval", "--adapter", str(out), "--data", str(named / "unseen.tsv")]) == 2
    err = capsys.readouterr().err
    assert "unseen.tsv row 2: label 'weird' is not one of the classes" in err and err.count("\n") == 1


def test_label_problems_stop_the_run_before_anything_is_written(named, tiny_bert_dir, capsys) -> None:
    (named / "bad.tsv").write_text("sentence\tlabel\nit was good\tpos\nit was odd\tweird\n")
    out = named / "run"
    argv = _train(
        tiny_bert_dir, out, "--data", str(named / "train.tsv"), "--eval-data", str(named / "bad.tsv")
    )
    assert main(argv) == 2
    assert "bad.tsv row 2: label 'weird'" in capsys.readouterr().err
    assert not out.exists()


def _one_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("lorakit: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    return captured.err


def test_corrupt_adapter_files_are_one_line_errors(named, tiny_bert_dir, capsys) -> None:
    out = named / "run"
    assert main(_train(tiny_bert_dir, out, "--data", str(named / "train.tsv"))) == 0
    capsys.readouterr()
    data = ["--data", str(named / "test.tsv")]
    saved = {name: (out / name).read_bytes() for name in ("adapter.json", "adapter.safetensors", "job.json")}
    for name, damage, message in [
        ("adapter.json", b"{not json", "cannot read"),
        ("adapter.json", b"[1, 2]", "is not a lorakit adapter file"),
        ("adapter.json", b'{"\xff": 1}', "adapter.json: it is not UTF-8 text (byte 2); re-save the adapter"),
        (
            "adapter.json",
            saved["adapter.json"].replace(b'"variant"', b'"variant_"'),
            "field 'variant' is missing",
        ),
        ("adapter.safetensors", saved["adapter.safetensors"][:50], "adapter.safetensors"),
        ("job.json", b"{", "cannot read"),
        ("job.json", b'{"rank": "x"}', "job.json"),
    ]:
        (out / name).write_bytes(damage)
        assert message in _one_error(["eval", "--adapter", str(out), *data], capsys), name
        (out / name).write_bytes(saved[name])
    assert main(["eval", "--adapter", str(out), *data]) == 0
    # held-out data with other column names: named for eval, as for train
    rows = (named / "test.tsv").read_text().splitlines()[1:]
    (named / "other.tsv").write_text("text\tclass\n" + "\n".join(rows) + "\n")
    other = ["eval", "--adapter", str(out), "--data", str(named / "other.tsv")]
    assert main([*other, "--text-column", "text", "--label-column", "class"]) == 0
    assert "accuracy" in capsys.readouterr().out
    missing = "has no column 'label'; its columns are ['class', 'text'] (set --text-column"
    assert missing in _one_error(other, capsys)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "/no/such/model"], "model path /no/such/model does not exist"),
        (["--output-dir", "/proc/lorakit-run"], "cannot use /proc/"),
        (["--targets", "query("], "not a valid regular expression"),
        (["--rank", "10000"], "rank 10000 is above what layer"),
        (["--max-length", "0"], "max_length=0"),
        (["--num-labels", "1"], "num_labels=1"),
        (["--rank", "x"], "argument --rank: invalid value 'x': it must be an integer or none"),
        (["--warmup-ratio", "2"], "warmup_ratio=2.0: it must be a number in [0, 1); warmup_ratio: fraction"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--set", "targets=query"], "options (--set) sets 'targets', which is also set elsewhere"),
        (["--rank", "8", "--set", "rank=4"], "sets 'rank', which is also set elsewhere: set it once"),
        (["--adapter-dtype", "float16"], "'adapter_dtype' = 'float16' is invalid: it must be one of float32"),
        (
            ["--output-dir", "~no-such-user-here/run"],
            "cannot use ~no-such-user-here/run: Could not determine "
            "home directory; write the path out in full",
        ),
    ],
)
def test_user_mistakes_are_one_line_errors(extra, message, tmp_path, tiny_bert_dir, capsys) -> None:
    argv = _train(tiny_bert_dir, tmp_path / "run", *extra)
    if "--output-dir" in extra:  # the last --output-dir wins
        argv = [a for a in argv if a != str(tmp_path / "run")]
        argv.remove("--output-dir")
    assert message in _one_error(argv, capsys)


def test_a_file_where_the_output_directory_should_be(tmp_path, tiny_bert_dir, capsys) -> None:
    (tmp_path / "file").write_text("x")
    err = _one_error(_train(tiny_bert_dir, tmp_path / "file" / "run"), capsys)
    assert "is a file, not a directory" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "16"], "batch of 16 (--batch-size 16); lower --batch-size, or use more data"),
        (["--grad-accum", "4"], "batch of 16 (--batch-size 4 x --grad-accum 4); lower --batch-size or"),
    ],
)
def test_a_batch_larger_than_the_training_data_is_refused_before_anything_is_written(
    named, tiny_bert_dir, capsys, extra, message
) -> None:
    out = named / "run"
    assert main([*_train(tiny_bert_dir, out, "--data", str(named / "train.tsv")), *extra]) == 2
    err = capsys.readouterr().err
    assert f"the training data has 12 examples, fewer than one optimizer step's {message}" in err
    assert err.count("\n") == 1 and not out.exists()
    assert main([*_train(tiny_bert_dir, out, "--data", str(named / "train.tsv")), "--batch-size", "12"]) == 0


def test_a_commands_own_warning_is_one_line(tiny_bert_dir, tmp_path, capsys) -> None:
    import warnings

    shown = warnings.showwarning
    argv = ["train", "--model", str(tiny_bert_dir), "--targets", "query,nonexist", "--steps", "1"]
    assert main([*argv, "--batch-size", "4", "--no-progress", "--output-dir", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "nonexist" in line]
    assert len(lines) == 1 and lines[0].startswith("lorakit: warning: no layer matches targets ['nonexist']")
    assert ".py:" not in err and "warnings.warn" not in err  # no source location and line, as Python shows
    assert warnings.showwarning is shown  # put back when the command ended


def test_a_prompt_that_is_not_valid_utf8_is_one_line_before_any_model_loads(capsys) -> None:
    # bytes the terminal's locale cannot decode reach Python as lone surrogates, which no tokenizer encodes
    err = _one_error(["generate", "--adapter", "/nonexistent", "ok", "caf\udce9?"], capsys)
    assert "prompt 2 is not valid UTF-8 text" in err


def test_a_bench_never_writes_over_files_it_did_not_write(tmp_path) -> None:
    from lorakit.bench.run import Bench, BenchError, check_own_out

    spec = Bench(defaults={}, runs=[{"name": "a"}], generate=None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    check_own_out(spec, out)  # other files are left alone
    for name in ("results.md", "a.log"):
        (out / name).write_text("mine")
    with pytest.raises(BenchError, match=r"holds results.md, a.log, which the bench writes, but no bench"):
        check_own_out(spec, out)
    (out / ".lorakit-bench").touch()  # a bench's own directory: its files are its own
    check_own_out(spec, out)
