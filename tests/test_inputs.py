"""Bad inputs caught up front: labels (ids or names, counted from the data), every numeric setting, ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch
from layer_zoo import MLP
from variant_cases import case_config

import lorakit
from lorakit.adapters.api import TargetError
from lorakit.cli import build_parser
from lorakit.common.errors import LorakitError, SettingError
from lorakit.core.config import ConfigError
from lorakit.data.datasets import ClassLabels, DataError, read_rows, tokenize_classification
from lorakit.jobs.cliargs import job_from_args
from lorakit.jobs.config import DataConfig, JobConfig
from lorakit.jobs.job import resolve_classes
from lorakit.privacy.config import PrivacyError
from lorakit.train.loop import TrainConfig


def rows(*labels: object) -> list[dict[str, object]]:
    return [{"sentence": f"text {i}", "label": v} for i, v in enumerate(labels)]


def test_class_ids_count_from_the_data_and_names_become_a_sorted_vocabulary() -> None:
    assert ClassLabels.from_rows(rows(0, 2, 1, "2"), "label", "d") == ClassLabels(3)
    assert ClassLabels.from_rows(rows(1, 0), "label", "d", count=4) == ClassLabels(4)
    assert ClassLabels.from_rows(rows(1.0, 0.0), "label", "d") == ClassLabels(2)  # whole floats are ids
    named = ClassLabels.from_rows(rows("pos", "neg", "neutral", "pos"), "label", "d")
    assert named == ClassLabels(3, ("neg", "neutral", "pos"))
    assert named.ids(rows("pos", "neg", "neutral"), "label", "d") == [2, 0, 1]


@pytest.mark.parametrize(
    ("labels", "expected", "ids"),
    [
        (("1.0", "0.0", "+1", " 0 "), ClassLabels(2), [1, 0, 1, 0]),  # whole numbers written as text are ids
        ((1.0, 0, "1"), ClassLabels(2), [1, 0, 1]),
        (("nan", "inf", "nan"), ClassLabels(2, ("inf", "nan")), [1, 0, 1]),  # text that is no decimal: a name
        ((" pos", "neg ", "1e3"), ClassLabels(3, ("1e3", "neg", "pos")), [2, 1, 0]),  # stripped
    ],
)
def test_the_label_rules_read_ids_and_names_the_same_from_every_value(labels, expected, ids) -> None:
    classes = ClassLabels.from_rows(rows(*labels), "label", "d")
    assert classes == expected and classes.ids(rows(*labels), "label", "d") == ids


def test_every_file_format_reads_the_same_labels_the_same_way(tmp_path) -> None:
    labels = ["1.0", " 0", "2", "1"]
    (tmp_path / "a.tsv").write_text("sentence\tlabel\n" + "".join(f"t\t{v}\n" for v in labels))
    (tmp_path / "a.csv").write_text("sentence,label\n" + "".join(f"t,{v}\n" for v in labels))
    (tmp_path / "a.jsonl").write_text("".join(f'{{"sentence": "t", "label": {float(v)}}}\n' for v in labels))
    (tmp_path / "b.jsonl").write_text("".join(f'{{"sentence": "t", "label": "{v}"}}\n' for v in labels))
    for name in ("a.tsv", "a.csv", "a.jsonl", "b.jsonl"):
        job = resolve_classes(JobConfig(data=DataConfig(data=str(tmp_path / name))))
        assert (job.num_labels, job.labels) == (3, None), name
        assert ClassLabels(3).ids(read_rows(str(tmp_path / name)), "label", name) == [1, 0, 2, 1], name
    (tmp_path / "bad.tsv").write_text("sentence\tlabel\na\t0\nb\t1\nc\t-1\n")
    (tmp_path / "bad.jsonl").write_text('{"sentence": "a", "label": 0}\n{"sentence": "b", "label": -1}\n')
    for name, row in (("bad.tsv", 3), ("bad.jsonl", 2)):
        with pytest.raises(DataError, match=f"{name} row {row}: label .* is negative"):
            resolve_classes(JobConfig(data=DataConfig(data=str(tmp_path / name))))


def test_class_names_given_on_the_command_line_follow_the_same_rules() -> None:
    assert _job(["--labels", " neg , pos"]).labels == ["neg", "pos"]
    with pytest.raises(DataError, match="1 is a class id, not a name"):
        _job(["--labels", "a,1"])
    with pytest.raises(DataError, match="holds the control character"):
        JobConfig(labels=["a", "b\x00"])


@pytest.mark.parametrize(
    ("labels", "count", "message"),
    [
        ((1.9, 0), None, r"row 1: label 1.9 in column 'label' is not a whole number"),
        (("1.9", "0"), None, r"row 1: label '1.9' .* is not a whole number"),
        ((0, 0, 0), None, "needs at least 2 classes, got 1"),
        ((0, 1), 1, "needs at least 2 classes, got 1"),
        ((0, 5), 2, r"label 5 is outside the 2 classes 0..1 num_labels allows; set --num-labels 6"),
        ((0, "pos"), None, r"mix class ids \(\[0\]\) and class names \(\['pos'\]\)"),
        (("a", "b"), 3, "has 2 classes .* but num_labels is 3"),
        ((0, -1), None, "row 2: label -1 .* is negative"),
        ((0, True), None, "row 2: label True .* is not a class"),
        ((0, [1]), None, r"row 2: label \[1\] .* is not a class"),
        ((0, " "), None, "row 2 has an empty label"),
        ((0, None), None, "row 2 has no 'label' value"),
        ((0, "-1"), None, r"row 2: label '-1' .* is negative: class ids count from 0"),
        ((0, " -2 "), None, r"row 2: label ' -2 ' .* is negative"),
        (("0\x00", "1"), None, r"row 1: label '0\\x00' .* holds the control character '\\x00'"),
        (("pos", "ne\ng"), None, r"row 2: .* holds the control character '\\n'"),
        ((0, float("nan")), None, r"row 2: label nan .* is not a whole number"),
        ((0, float("inf")), None, r"row 2: label inf .* is not a whole number"),
        ((0, "2.5"), None, r"row 2: label '2.5' .* is not a whole number"),
        ((0, 1000), None, r"run up to 1000 but 1, 2, 3, 4, 5 and 994 more never occur; .* --num-labels 1001"),
        ((0, "2"), None, r"run up to 2 but 1 never occur"),
        ((0, 10**30), None, r"row 2: label 10{30} .* is above 999999, the largest class id lorakit takes"),
        ((0, 1), 10**12, r"num_labels is 1000000000000: lorakit takes at most 1000000 classes"),
        # past Python's 4300-digit conversion limit: refused by the same rule, the label quoted cut short
        ((0, "9" * 5000), None, r"row 2: label '9{29}\.\.\. \(5002 characters\) .* is above 999999"),
        ((0, "-" + "9" * 5000 + ".0"), None, r"row 2: label '-9{28}\.\.\. .* is negative"),
        ((0, 10**5000), None, r"row 2: label \(an integer of 16610 bits\) .* is above 999999"),
    ],
)
def test_bad_labels_are_refused_naming_the_row_and_the_fix(labels, count, message) -> None:
    with pytest.raises(DataError, match=message):
        ClassLabels.from_rows(rows(*labels), "label", "d", count)


def test_a_json_number_past_the_digit_limit_is_a_data_error(tmp_path) -> None:
    big = "9" * 5000
    lines, array = tmp_path / "d.jsonl", tmp_path / "d.json"
    lines.write_text(f'{{"sentence": "a", "label": 0}}\n{{"sentence": "b", "label": {big}}}\n')
    array.write_text(f'[{{"sentence": "a", "label": 0}}, {{"sentence": "b", "label": {big}}}]')
    with pytest.raises(DataError, match=r"d.jsonl line 2 is not valid JSON \(a number too long to read"):
        read_rows(str(lines))
    with pytest.raises(DataError, match=r"d.json: not valid JSON \(a number too long to read"):
        read_rows(str(array))
    deep = "[" * 100_000 + "]" * 100_000
    lines.write_text(f'{{"sentence": "a", "label": {deep}}}\n')
    array.write_text(deep)
    with pytest.raises(DataError, match=r"d.jsonl line 1 is not valid JSON \(values nested too deeply"):
        read_rows(str(lines))
    with pytest.raises(DataError, match=r"d.json: not valid JSON \(values nested too deeply"):
        read_rows(str(array))


def test_evaluation_labels_outside_the_training_classes_are_refused() -> None:
    with pytest.raises(DataError, match=r"row 2: label 2 is outside the model's 2 classes 0..1"):
        ClassLabels(2).ids(rows(0, 2), "label", "eval")
    with pytest.raises(DataError, match=r"row 1: label 'meh' is not one of the classes .* \(neg, pos\)"):
        ClassLabels(2, ("neg", "pos")).ids(rows("meh"), "label", "eval")
    with pytest.raises(DataError, match="is a name but the model's classes are the ids"):
        ClassLabels(2).ids(rows("pos"), "label", "eval")


def test_tokenize_without_classes_takes_ids_only() -> None:
    class Tok:
        pad_token_id = 0

        def __call__(self, texts, truncation, max_length):
            return {"input_ids": [[1] * min(len(t), max_length) for t in texts]}

    assert tokenize_classification(rows(1, 0), Tok(), "sentence", "label", 4, "d").labels == [1, 0]
    with pytest.raises(
        DataError, match="is a class name, but no class names are known for this model; give class ids"
    ):
        tokenize_classification(rows("pos"), Tok(), "sentence", "label", 4, "d")
    named = ClassLabels(2, ("neg", "pos"))
    data = tokenize_classification(rows("pos", "neg"), Tok(), "sentence", "label", 4, "d", classes=named)
    assert data.labels == [1, 0]


def test_a_job_reads_its_classes_from_training_data_and_checks_evaluation_data_first(tmp_path) -> None:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\tpos\nb\tneg\nc\tmeh\n")
    (tmp_path / "test.tsv").write_text("sentence\tlabel\na\tpos\nb\tugh\n")
    job = JobConfig(data=DataConfig(data=str(tmp_path / "train.tsv")))
    resolved = resolve_classes(job)
    assert (resolved.num_labels, resolved.labels) == (3, ["meh", "neg", "pos"])
    assert resolve_classes(resolved) == resolved  # recorded classes are kept (eval reads them back)
    bad = dataclasses.replace(
        job, data=DataConfig(data=str(tmp_path / "train.tsv"), eval_data=str(tmp_path / "test.tsv"))
    )
    with pytest.raises(DataError, match="test.tsv row 2: label 'ugh' is not one of the classes"):
        resolve_classes(bad)
    causal = JobConfig(task="causal-lm", data=DataConfig(data=str(tmp_path / "nope.tsv")))
    assert resolve_classes(causal) is causal


def _job(argv: list[str]) -> JobConfig:
    return job_from_args(build_parser().parse_args(["train", *argv]))


def test_config_file_values_are_read_like_set_values(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "lr: 1e-3\nsteps: '20'\nalpha: 32\nmax_length: 1e2\nlabels: neg, pos\noptions: {rslora: true}\n"
    )
    job = _job(["--config", str(config)])
    assert job.train.lr == 0.001 and job.train.steps == 20 and job.alpha == 32.0
    assert job.data.max_length == 100 and job.labels == ["neg", "pos"] and job.options == {"rslora": True}


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("steps: abc\n", r"steps='abc': it must be an integer"),
        ("lr: [1]\n", r"lr=\[1\]: it must be a number"),
        ("max_length: 2.5\n", r"max_length=2.5: it must be an integer"),
        ("progress: maybe\n", "progress='maybe': it must be true or false"),
        ("model: 3\n", "model=3: it must be text"),
        ("options: 3\n", "options must be a mapping"),
        ("- a\n", "must be a mapping of settings"),
        ("a: [\n", "cannot read config"),
        ("bogus: 1\n", r"unknown setting\(s\) \['bogus'\]"),
        ("rank: abc\n", "rank='abc': it must be an integer"),
        # values YAML's safe loader builds beyond JSON's: each passed for an object until a run had trained
        ("dp: 2024-01-01\n", "a date or time is no setting value; quote it"),
        ("targets: !!set {q, v}\n", r"a set \(!!set\) is no setting value; write a list"),
        ("options: {rslora: !!binary aGVsbG8=}\n", r"bytes \(!!binary\) is no setting value"),
    ],
)
def test_bad_config_values_name_the_setting(tmp_path, yaml_text, message) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    with pytest.raises(SettingError, match=message):
        _job(["--config", str(config)])


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--max-length", "0"], "max_length=0"),
        (["--max-length", "-3"], "max_length=-3"),
        (["--eval-batch-size", "0"], "eval_batch_size=0"),
        (["--batch-size", "0"], "batch_size=0"),
        (["--steps", "0"], "steps=0"),
        (["--grad-accum", "0"], "grad_accum=0"),
        (["--lr=-1e-3"], "lr=-0.001"),
        (["--lr", "0"], "lr=0.0"),
        (["--lr", "nan"], "lr=nan"),
        (["--weight-decay", "-1"], "weight_decay=-1.0"),
        (["--warmup-ratio", "1.5"], "warmup_ratio=1.5"),
        (["--clip", "-1"], "clip=-1.0"),
        (["--eval-every", "-1"], "eval_every=-1"),
        (["--checkpoint-every", "-2"], "checkpoint_every=-2"),
        (["--seed=-1"], "seed=-1"),
        (["--seed", "4294967296"], "seed=4294967296"),
        (["--num-labels", "1"], "num_labels=1"),
        (["--num-labels", "0"], "num_labels=0"),
        (["--task", "regression"], "task='regression'"),
        (["--quantize", "int3"], "unknown quant type 'int3'"),
        (["--text-column", " "], "text_column=' '"),
        (["--output-dir", ""], "output_dir=''"),
        (["--rank", "0"], "'rank' = 0"),
        (["--alpha", "-1"], "'alpha' = -1.0"),
        (["--dropout", "1"], "'dropout' = 1.0"),
        (["--variant", "nope"], "unknown variant 'nope'"),
        (["--set", "rank=abc"], "rank='abc'"),
        (["--labels", "a"], "labels=\\['a'\\]"),
    ],
)
def test_every_numeric_setting_out_of_range_is_refused_before_anything_runs(argv, field) -> None:
    with pytest.raises(LorakitError, match=field):
        _job(argv)


def test_evaluating_every_n_steps_without_evaluation_data_is_refused() -> None:
    with pytest.raises(SettingError, match=r"--eval-every 5 evaluates on the evaluation data, and there is"):
        _job(["--data", "train.tsv", "--eval-every", "5"])  # it trained without evaluating, silently
    assert _job(["--data", "train.tsv", "--eval-data", "dev.tsv", "--eval-every", "5"]).train.eval_every == 5
    assert _job(["--eval-every", "5"]).data.eval_source() == "demo"  # the demo's own test split


def test_settings_classes_check_types_from_python_too() -> None:
    with pytest.raises(SettingError, match="max_length='64x'"):
        DataConfig(max_length="64x")
    assert DataConfig(max_length="64").max_length == 64  # text that is a number is read as one
    with pytest.raises(LorakitError):
        TrainConfig(steps=0)


def test_a_rank_above_a_layer_is_refused_for_every_variant_naming_the_layer() -> None:
    for name, cls in lorakit.VARIANTS.items():
        config = {**case_config(name), "rank": 13}
        if "init_r" in {f.name for f in dataclasses.fields(cls.config_class)}:
            config |= {"init_r": 13, "target_r": 2}
        config.pop("projection_shape", None)
        limit = cls.config_class.from_dict({k: v for k, v in config.items()}, name).max_rank(20, 12)
        if limit is None:  # a rank that is not a factor size (VeRA's shared projections)
            lorakit.apply(MLP(), name, targets=["fc1"], **config)
            continue
        model = MLP()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(
            TargetError, match=r"rank 13 is above what layer fc1 \(20 x 12\) can use \(at most 12\)"
        ):
            lorakit.apply(model, name, targets=["fc1"], **config)
        assert not hasattr(model, "lorakit") and all(p.requires_grad for p in model.parameters()), name
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), name
        fits = {**config, "rank": 12} | ({"init_r": 12} if "init_r" in config else {})
        assert lorakit.info(lorakit.apply(MLP(), name, targets=["fc1"], **fits)).config.rank == 12


class Gated(torch.nn.Module):
    """A block with a (1 x d) gate, as a mixture of experts' shared-expert gate."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.gate = torch.nn.Linear(12, 12), torch.nn.Linear(12, 1)

    def forward(self, x):
        return self.up(x) * torch.sigmoid(self.gate(x))


def test_all_linear_leaves_out_layers_too_narrow_for_the_rank_and_names_them(tmp_path) -> None:
    left_out = r"'all-linear' leaves out gate \(1 x 12\): rank 4 is above .* \(at most 1\)"
    with pytest.warns(UserWarning, match=left_out):
        model = lorakit.apply(Gated(), "lora", rank=4)
    assert [n for n, _ in lorakit.adapted_layers(model)] == ["up"]
    lorakit.save(model, tmp_path / "a")
    with pytest.warns(UserWarning, match="leaves out gate"):
        assert [n for n, _ in lorakit.adapted_layers(lorakit.load(Gated(), tmp_path / "a"))] == ["up"]
    with pytest.raises(TargetError, match=r"rank 4 is above what layer gate \(1 x 12\) can use"):
        lorakit.apply(Gated(), "lora", targets=["up", "gate"], rank=4)  # named: refused
    with pytest.raises(TargetError, match=r"rank 13 is above what layer up \(12 x 12\)"):  # none fits
        lorakit.apply(Gated(), "lora", rank=13)


def test_a_bad_targets_regex_is_a_target_error() -> None:
    with pytest.raises(TargetError, match="not a valid regular expression"):
        lorakit.apply(MLP(), "lora", targets="fc(")


def test_a_json_line_holding_unicode_line_separators_is_one_row(tmp_path) -> None:
    """U+2028, U+2029 and U+0085 are text inside a JSON string, not line breaks of JSON Lines."""
    rows = [{"question": f"a{c}b", "answer": "3"} for c in ("\u2028", "\u2029", "\u0085")]
    path = tmp_path / "d.jsonl"
    path.write_bytes("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode())
    assert read_rows(str(path)) == rows


def test_long_fields_and_all_file_types_read(tmp_path) -> None:
    long = "word " * 300_000  # 1.5 MB, above the csv module's default field limit
    (tmp_path / "a.tsv").write_text(f"sentence\tlabel\n{long}\t1\n")
    (tmp_path / "a.json").write_text('[{"sentence": "x", "label": 0}]')
    assert read_rows(str(tmp_path / "a.tsv"))[0]["sentence"] == long
    assert read_rows(str(tmp_path / "a.json")) == [{"sentence": "x", "label": 0}]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.jsonl", '{"sentence": "a", "label": 1}\n{bad\n', "line 2 is not valid JSON"),
        ("a.jsonl", '{"sentence": "a", "label": 1}\n[1, 2]\n', "line 2 is a JSON list, not an object"),
        ("a.tsv", "sentence\tlabel\na\t1\nb\n", "line 3 has 1 field.* where the header has 2"),
        ("a.tsv", "sentence\tlabel\na\t1\tx\n", "line 2 has 3 field.* where the header has 2"),
        ("a.csv", 'sentence,label\n"a,1\n', "line"),
        # a stray or unclosed quote: read leniently, the rows after it ran into one field, or lost a quote
        ("a.csv", 'sentence,label\n"Great, 10/10,1\nbad,0\nit was "ok",0\n', "line 4: ',' expected after"),
        ("a.csv", 'sentence,label\n"What is 1" plus 2?,1\n', "line 2: ',' expected after"),
        (
            "a.jsonl",
            '{"sentence": "a", "label": 1}\n{"sentence": "x\\ud800", "label": 0}\n',
            "line 2 holds text that is not valid Unicode",
        ),
        ("a.jsonl", '{"sentence": "a", "label": 1, "meta": {"\\udc80": 1}}\n', "line 1 holds text that"),
        ("a.tsv", "", "has no rows"),
        ("a.tsv", "sentence\tlabel\n", "has no rows"),
        ("a.jsonl", "\n\n", "has no rows"),
        ("a.tsv", "sentence\tsentence\na\tb\n", "must name each column once"),
        ("a.txt", "hello", "unknown data file type"),
        ("a.jsonl", '["a", 1]\n["b", 0]\n', "line 1 is a JSON list, not an object"),
        ("a.json", '[["a", 1],\n["b", 0]]\n', "item 1 is a JSON list, not an object"),
        ("a.json", '[{"a": 1}\n', "not valid JSON"),
    ],
)
def test_malformed_data_files_name_the_line(tmp_path, name, text, message) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        read_rows(str(tmp_path / name))


def test_a_valid_surrogate_pair_reads_and_a_pipe_is_named_as_no_regular_file(tmp_path) -> None:
    (tmp_path / "a.jsonl").write_text('{"sentence": "smile \\ud83d\\ude00", "label": 1}\n')
    assert read_rows(str(tmp_path / "a.jsonl"))[0]["sentence"] == "smile \U0001f600"
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(DataError, match=r"pipe.jsonl is not a regular file \(a pipe or a device\)"):
        read_rows(str(tmp_path / "pipe.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_a_byte_order_mark_is_dropped_and_a_directory_is_named(tmp_path) -> None:
    (tmp_path / "a.tsv").write_bytes("\ufeffsentence\tlabel\na\t1\n".encode())
    (tmp_path / "a.jsonl").write_bytes('\ufeff{"sentence": "a", "label": 1}\n'.encode())
    for name in ("a.tsv", "a.jsonl"):
        assert list(read_rows(str(tmp_path / name))[0]) == ["sentence", "label"]
    (tmp_path / "data.tsv").mkdir()
    for name in ("data.tsv", "."):
        with pytest.raises(DataError, match="is a directory; pass a data file"):
            read_rows(str(tmp_path / name))


def test_a_row_without_the_label_names_the_row(tmp_path) -> None:
    (tmp_path / "a.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": "b"}\n')
    with pytest.raises(DataError, match="row 2 has no 'label' value"):
        ClassLabels.from_rows(read_rows(str(tmp_path / "a.jsonl")), "label", "a.jsonl")
    (tmp_path / "b.tsv").write_bytes(b"sentence\tlabel\n\xff\xfe\t1\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_rows(str(tmp_path / "b.tsv"))


def test_given_class_names_fix_the_order_and_must_cover_the_data(tmp_path) -> None:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\tpos\nb\tneg\n")
    job = JobConfig(labels=["pos", "neg", "meh"], data=DataConfig(data=str(tmp_path / "train.tsv")))
    resolved = resolve_classes(job)
    assert (resolved.num_labels, resolved.labels) == (3, ["pos", "neg", "meh"])
    with pytest.raises(DataError, match="row 1: label 'pos' is not one of the classes"):
        resolve_classes(dataclasses.replace(job, labels=["neg", "meh"]))
    with pytest.raises(DataError, match=r"3 class names \(pos, neg, meh\) but num_labels is 2"):
        resolve_classes(dataclasses.replace(job, num_labels=2))


# --- one parser for every numeric setting: train, federate, bench and job files -----------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--warmup-ratio", "2"], r"warmup_ratio=2.0: it must be a number in \[0, 1\); warmup_ratio: fract"),
        (["--lr", "inf"], r"lr=inf: it must be a finite number > 0"),
        (["--steps", "0"], r"steps=0: it must be an integer >= 1"),
        (["--num-labels", "0"], r"num_labels=0: it must be an integer in \[2, 1000000\]"),
        (["--clip", "-0.5"], r"clip=-0.5: it must be a finite number >= 0"),
    ],
)
def test_a_number_out_of_range_names_its_range_and_meaning(argv, message) -> None:
    with pytest.raises(SettingError, match=message):
        _job(argv)


def test_an_optional_number_is_unset_only_when_none_and_zero_is_checked() -> None:
    assert _job([]).num_labels is None and _job(["--num-labels", "none"]).num_labels is None
    with pytest.raises(SettingError, match="num_labels=0"):
        _job(["--num-labels", "0"])


def test_a_variant_runs_on_the_command_lines_defaults_and_a_given_value_is_never_replaced() -> None:
    assert _job(["--variant", "adalora"]).variant_config() == {"alpha": 16.0, "dropout": 0.05}  # rank: init_r
    assert _job(["--variant", "delta_lora"]).variant_config() == {"rank": 8, "alpha": 16.0}  # no dropout
    assert _job([]).variant_config() == {"rank": 8, "alpha": 16.0, "dropout": 0.05}
    assert _job(["--variant", "adalora", "--set", "init_r=4", "--set", "target_r=2"]).variant_config()
    with pytest.raises(ConfigError, match="'rank' = 8 is invalid: it must be unset or init_r = 12"):
        _job(["--variant", "adalora", "--rank", "8"])
    with pytest.raises(ConfigError, match="'dropout' = 0.05 is invalid"):
        _job(["--variant", "delta_lora", "--dropout", "0.05"])


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (
            ["--max-grad-norm", "inf", "--noise-multiplier", "1"],
            PrivacyError,
            "max_grad_norm = inf is invalid",
        ),
        (
            ["--noise-multiplier", "inf"],
            PrivacyError,
            "noise_multiplier = inf is invalid: it must be 0 \\(no noise\\) or between",
        ),
        (["--noise-multiplier", "1", "--checkpoint-every", "5"], SettingError, "drop --checkpoint-every"),
    ],
)
def test_dp_sgd_settings_it_cannot_honour_are_refused_before_anything_runs(argv, error, message) -> None:
    with pytest.raises(error, match=message):
        _job(["--dp", *argv])


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (["--target-epsilon", "0", "--clip-norm", "1"], PrivacyError, "target_epsilon = 0.0 is invalid"),
        (["--noise-multiplier", "0", "--target-epsilon", "3", "--clip-norm", "1"], PrivacyError, "no noise"),
        (["--eval-examples", "0"], SettingError, r"eval_examples=0: it must be an integer >= 1"),
        (["--rounds", "0"], SettingError, r"rounds=0: it must be an integer >= 1"),
        (["--skew", "0"], SettingError, r"skew=0.0: it must be a finite number > 0"),
        (["--lr", "nan"], SettingError, r"lr=nan: it must be a finite number > 0"),
        (["--num-labels", "1"], SettingError, r"num_labels=1: it must be an integer in \[2, 1000000\]"),
        # DP-FedAvg's own settings without it (clip norm 0): the run would not be private
        (["--delta", "1e-3"], PrivacyError, r"--delta \(delta\) applies to client-level DP, which is off"),
        (["--accountant", "prv"], PrivacyError, r"--accountant \(accountant\) applies to client-level DP"),
        (["--dp-insecure-seed"], PrivacyError, r"--dp-insecure-seed \(dp_insecure_seed\) applies to"),
    ],
)
def test_federate_reads_numbers_with_the_same_parser(argv, error, message) -> None:
    from lorakit.federated.config import from_args

    with pytest.raises(error, match=message):
        from_args(build_parser().parse_args(["federate", *argv]))


def test_federate_tells_unset_from_zero_in_flags_and_in_flowers_run_config() -> None:
    from lorakit.federated.config import FedConfig, from_args

    cfg = from_args(build_parser().parse_args(["federate", "--clip-norm", "1", "--target-epsilon", "2"]))
    assert (cfg.target_epsilon, cfg.noise_multiplier, cfg.accounted) == (2.0, None, True)
    assert FedConfig.from_run_config(cfg.to_run_config()) == cfg  # unset travels as "" and comes back
    assert FedConfig().to_run_config()["target_epsilon"] == "" and not FedConfig().private
    with pytest.raises(PrivacyError, match="target_epsilon = 0.0 is invalid"):
        FedConfig.from_run_config({"target_epsilon": 0, "clip_norm": 1})
    assert FedConfig.from_run_config({"rounds": "3", "lr": 1}).rounds == 3  # Flower may give text or ints


def test_a_bench_file_is_checked_whole_before_any_run(tmp_path) -> None:
    from lorakit.bench.run import BenchError, load_bench

    bench = tmp_path / "bench.yaml"
    bench.write_text("defaults: {steps: 10}\nruns:\n  - {name: a}\n  - {name: b, warmup_ratio: 2}\n")
    with pytest.raises(BenchError, match=r"run b: invalid training setting warmup_ratio=2.0"):
        load_bench(bench)
    bench.write_text("runs:\n  - {name: a, lr: abc}\n")
    with pytest.raises(BenchError, match="run a: invalid training setting lr='abc': it must be a number"):
        load_bench(bench)
    bench.write_text("runs:\n  - {name: a, variant: adalora, epochs: 3}\n")
    with pytest.raises(BenchError, match=r"run a: unknown setting\(s\) \['epochs'\]"):
        load_bench(bench)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # names of the bench's own files in --out: a run's log, the report
        ("runs: [{name: a.log}, {name: a}]", "run name 'a.log' is not allowed"),
        ("runs: [{name: results.md}]", "run name 'results.md' is not allowed"),
        # what `eval --generate` refuses, refused before the first run trains
        ("generate: {max_new_tokens: 0}\nruns: [{name: a}]", "max_new_tokens must be a whole number"),
        ("generate: {limit: 2.5}\nruns: [{name: a}]", "generate: limit must be a whole number of at least 1"),
        ("generate: {answer_pattern: '('}\nruns: [{name: a}]", "is not a valid regular expression"),
        ("generate: {answer_pattern: 'x*'}\nruns: [{name: a}]", "matches empty text"),
        ("generate: {limit: 2}\nruns: [{name: base, train: false}]", "eval_data, which is not set"),
        # a key given twice, or one that names nothing
        ("defaults: {steps: 1, steps: 3}\nruns: [{name: a}]", "setting 'steps' is given twice"),
        ("runs: [{name: a, variant: lora, variant: dora}]", "setting 'variant' is given twice"),
        ("defaults: {[a, b]: 1}\nruns: [{name: a}]", "a key must be a plain name"),
    ],
)
def test_a_bench_file_is_refused_whole_for_what_would_fail_or_collide_later(tmp_path, text, message) -> None:
    from lorakit.bench.run import BenchError, read_bench

    (tmp_path / "bench.yaml").write_text(text + "\n")
    with pytest.raises(BenchError, match=re.escape(message)):
        read_bench(tmp_path / "bench.yaml")


def test_a_config_key_that_is_no_name_is_one_line(tmp_path) -> None:
    (tmp_path / "job.yaml").write_text("? [a, b]\n: 1\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "job.yaml")])
    with pytest.raises(SettingError, match="a key must be a plain name, not a list or mapping"):
        job_from_args(args)


def test_train_modules_and_set_rank_refusals_name_the_problem() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    no_weights = r"train_modules entry '1' names 1 \(ReLU\), which has no parameters"
    with pytest.raises(TargetError, match=no_weights):
        lorakit.apply(model, "lora", targets=["0"], rank=2, train_modules=["1"])
    typo = r"train_modules entry 'gat' matches no module; did you mean \['gate'\]"
    with pytest.raises(TargetError, match=typo):
        lorakit.apply(Gated(), "lora", targets=["up"], rank=2, train_modules=["gat"])
    assert not hasattr(model, "lorakit") and all(p.requires_grad for p in model.parameters())
    dylora = lorakit.apply(torch.nn.Sequential(torch.nn.Linear(8, 8)), "dylora", targets=["0"], rank=4)
    with pytest.raises(LorakitError, match=r"rank 2.0 is not an integer: choose an integer in \[1, 4\]"):
        lorakit.set_rank(dylora, 2.0)
    with pytest.raises(LorakitError, match=r"rank 5 is out of range: choose an integer in \[1, 4\]"):
        lorakit.set_rank(dylora, 5)


def test_a_key_given_twice_is_refused_not_resolved_silently(tmp_path) -> None:
    (tmp_path / "d.jsonl").write_text('{"question": "a", "question": "b", "answer": "3"}\n')
    with pytest.raises(DataError, match="line 1 is not valid JSON \\(key 'question' is given twice"):
        read_rows(str(tmp_path / "d.jsonl"))
    for text, message in [
        ("steps: 2\nsteps: 3\n", "setting 'steps' is given twice; keep one"),
        ("steps: 2\ntrain:\n  steps: 3\n", "setting 'steps' is given twice \\(once in a section\\)"),
    ]:
        (tmp_path / "job.yaml").write_text(text)
        args = build_parser().parse_args(["train", "--config", str(tmp_path / "job.yaml")])
        with pytest.raises(SettingError, match=message):
            job_from_args(args)


def test_a_roberta_classifiers_default_targets_leave_its_head_to_train_in_full() -> None:
    """RoBERTa's head holds a `dense` layer too: the default targets named it, and the job refused its own
    defaults (the head is trained in full)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from lorakit.jobs.job import head_modules, targets

    config = RobertaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = RobertaForSequenceClassification(config)
    job = _job(["--data", "train.tsv"])
    job.task = "classification"
    names = targets(job, model)
    assert head_modules(model, "classification") == ["classifier"] and "classifier.dense" not in names
    assert len(names) == 2 * 6  # query, key, value and three dense layers in each of the two blocks
    lorakit.apply(model, "lora", targets=names, train_modules=["classifier"], rank=2)
