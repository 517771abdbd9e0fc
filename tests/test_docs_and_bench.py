"""The README's variants table matches the registry; bench files validate; the bench report renders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorakit
from lorakit.bench.docs import render
from lorakit.bench.report import write_report
from lorakit.bench.run import read_bench
from lorakit.jobs.cliargs import _leaf_fields, job_from_values, job_values

ROOT = Path(__file__).resolve().parents[1]


def test_readme_variants_table_is_generated_from_the_registry() -> None:
    readme = (ROOT / "README.md").read_text()
    assert render(readme) == readme, "run `python -m lorakit.bench.docs README.md`"
    for name in lorakit.VARIANTS:
        assert f"| `{name}` |" in readme


def test_every_shipped_bench_file_names_known_settings_and_variants() -> None:
    files = sorted((ROOT / "benchmarks").glob("*.yaml"))
    assert files
    known = set(_leaf_fields()) | {"options"}
    for path in files:
        bench = read_bench(path)
        for run in bench.runs:  # read_bench builds every run's job: each field read and range-checked
            settings = bench.settings[run["name"]]
            assert set(settings) <= known, (path, set(settings) - known)
            job = job_from_values(job_values(settings, run["name"]))
            assert job.variant == settings.get("variant", "lora")


def test_report_writes_a_table_and_a_plot(tmp_path) -> None:
    for name, acc, n in (("a", 0.8, 1000), ("b", 0.9, 50)):
        (tmp_path / name).mkdir()
        metrics = {"metrics": {"accuracy": acc}, "trainable": n, "seconds": 12.0, "peak_memory_mb": 300.0}
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    table = write_report(tmp_path, ["a", "b", "missing"], {"b": "note b"})
    assert (
        "| a | 0.8000 | 1,000 | 12 | 300 |  |" in table and "| b | 0.9000 | 50 | 12 | 300 | note b |" in table
    )
    assert "missing" not in table
    assert json.loads((tmp_path / "results.json").read_text())[1]["name"] == "b"
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert yaml.safe_load((ROOT / "benchmarks" / "sst2.yaml").read_text())["defaults"]["model"] == "minilm"


def test_rank_report_reads_live_ranks_from_a_trained_adalora_adapter(tmp_path) -> None:
    from conftest import tiny_llama

    from lorakit.bench.ranks import heatmap, markdown, saved_ranks
    from lorakit.train.loop import TrainConfig, train
    from lorakit.variants.adalora import rank_pattern

    model = tiny_llama()
    lorakit.apply(
        model,
        "adalora",
        targets=["q_proj", "v_proj"],
        init_r=4,
        target_r=1,
        t_init=1,
        t_final=2,
        delta_t=1,
        dropout=0.0,
    )
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    train(model, iter(lambda: {"input_ids": ids, "labels": ids}, None), TrainConfig(steps=8, progress=False))
    lorakit.save(model, tmp_path / "a")
    ranks = saved_ranks(tmp_path / "a")
    assert ranks == rank_pattern(model) and sum(ranks.values()) == 4  # target_r 1 x 4 matrices
    table = markdown(ranks)
    assert "| block | self_attn.q_proj | self_attn.v_proj |" in table and table.count("\n") == 4
    heatmap(ranks, tmp_path / "h.png", "ranks")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_lorakit_bench_runs_each_job_reports_them_and_resumes(tiny_bert_dir, tmp_path, capsys) -> None:
    from lorakit.cli import main

    bench = tmp_path / "bench.yaml"
    bench.write_text(
        yaml.safe_dump(
            {
                "defaults": {
                    "model": str(tiny_bert_dir),
                    "targets": ["query", "value"],
                    "max_length": 24,
                    "train": {"steps": 3, "batch_size": 8, "eval_every": 0},
                },  # fmt: skip
                "runs": [
                    {"name": "a", "variant": "lora", "rank": 2},
                    {"name": "b", "variant": "dora", "rank": 4, "note": "rank 4"},
                    {"name": "broken", "data": str(tmp_path / "missing.tsv")},  # fails when it runs
                ],
            }
        )
    )
    out = tmp_path / "out"
    spec = yaml.safe_load(bench.read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec, "runs": [*spec["runs"], {"name": "c", "variant": "no_such"}]}))
    assert main(["bench", str(bad), "--out", str(out)]) == 2  # a setting no run can take: nothing runs
    assert "run c: unknown variant 'no_such'" in capsys.readouterr().err and not out.exists()
    assert main(["bench", str(bench), "--out", str(out)]) == 1  # one run failed, the others still ran
    table = (out / "results.md").read_text()
    trainable = {r["name"]: r["trainable"] for r in json.loads((out / "results.json").read_text())}
    assert (
        set(trainable) == {"a", "b"} and trainable["b"] > 2 * trainable["a"] - 2 * 32
    )  # DoRA at twice the rank
    assert "| broken | failed: see broken.log |" in table and "| rank 4 |" in table
    assert "missing.tsv does not exist" in (out / "broken.log").read_text()
    assert (out / "results.png").stat().st_size > 10_000
    capsys.readouterr()
    (out / "broken.log").unlink()
    assert main(["bench", str(bench), "--out", str(out), "--only", "a,b"]) == 0  # finished runs are skipped
    assert "[bench] a:" not in capsys.readouterr().out and not (out / "broken.log").exists()
    assert main(["bench", str(bench), "--out", str(out), "--only", "c"]) == 2
    assert "--only names ['c'] are not runs of" in capsys.readouterr().err


def test_a_causal_lm_bench_evaluates_generation_and_the_base_model(chat_llama_dir, tmp_path, capsys) -> None:
    from lorakit.cli import main

    rows = [{"q": f"What is {a} plus {b}?", "a": f"#### {a + b}"} for a in range(1, 9) for b in range(1, 3)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = tmp_path / "bench.yaml"
    defaults = {
        "model": str(chat_llama_dir), "data": str(data), "eval_data": str(data), "prompt_column": "q",
        "response_column": "a", "max_length": 64, "targets": "all-linear", "steps": 3, "batch_size": 8,
    }  # fmt: skip
    runs = [{"name": "base", "train": False, "note": "as it is"}, {"name": "lora", "variant": "lora"}]
    generate = {"max_new_tokens": 4, "batch_size": 8, "limit": 6}
    bench.write_text(yaml.safe_dump({"defaults": defaults, "generate": generate, "runs": runs}))
    out = tmp_path / "out"
    assert main(["bench", str(bench), "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    assert "| run | dev loss | perplexity | exact match |" in table
    results = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(results) == {"base", "lora"} and "trainable" not in results["base"]
    assert results["lora"]["generation"]["exact_match_total"] == 6
    assert results["base"]["metrics"]["loss"] > results["lora"]["metrics"]["loss"]
    assert "| base |" in table and "| 0 |" in table and "as it is" in table
    # every row's loss on the same 6 rows (training evaluated all 16): the generation evaluation's
    assert all(r["metrics"]["loss"] == r["generation"]["loss"] for r in results.values())
    capsys.readouterr()
    assert main(["bench", str(bench), "--out", str(out)]) == 0  # finished and evaluated: nothing runs again
    assert "lorakit.cli" not in capsys.readouterr().out
    # the bench file edited: its finished runs are not shown under settings they did not run with
    base_trains = [{"name": "base"}, runs[1]]
    for edited, only, message in [
        (
            {"generate": {**generate, "max_new_tokens": 5}},
            [],
            "run base in .* was evaluated with other settings",
        ),
        (
            {"defaults": {**defaults, "steps": 4}},
            [],
            r"run lora in .* was trained with other settings \(steps",
        ),
        (
            {"defaults": {**defaults, "steps": 4}},
            ["--only", "base"],
            r"run lora in .* \(steps changed since\)",
        ),
        (
            {"defaults": {**defaults, "max_length": 48}},
            [],
            r"run base in .* evaluated with other settings \(max",
        ),
        ({"runs": base_trains}, [], r"run base in .* was trained with other settings \(.*train"),
    ]:
        bench.write_text(yaml.safe_dump({"defaults": defaults, "generate": generate, "runs": runs, **edited}))
        assert main(["bench", str(bench), "--out", str(out), *only]) == 2
        assert re.search(message, capsys.readouterr().err)
        assert json.loads((out / "lora" / "job.json").read_text())["train"]["steps"] == 3  # kept as it is


def test_the_report_reads_a_causal_lm_run_without_evaluation_data_and_names_a_failed_evaluation() -> None:
    from lorakit.bench.report import markdown

    trained = {"trainable": 10, "seconds": 3.0, "peak_memory_mb": 5.0, "extra": {"tokens_per_second": 7.0}}
    rows = [
        {"name": "lora", "task": "causal-lm", "metrics": {}, **trained},  # no eval_data
        {"name": "dora", "task": "causal-lm", "metrics": {"loss": 1.5, "perplexity": 4.48}, **trained},
    ]
    table = markdown(rows, {"dora": "rank 4"}, failed=["dora", "qlora"])
    assert "| run | dev loss | perplexity |" in table  # the classification table showed nan accuracy
    assert "| lora | not evaluated |" in table
    assert table.count("| dora |") == 1 and "| rank 4; evaluation failed: see dora.log |" in table
    assert "| qlora | failed: see qlora.log |" in table


def _bench(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_run_replaces_a_default_whether_either_is_in_a_section(
    tiny_bert_dir, chat_llama_dir, tmp_path
) -> None:
    from lorakit.bench.run import read_bench

    defaults = {"model": str(tiny_bert_dir), "train": {"steps": 3, "batch_size": 8}}
    runs = [{"name": "a", "steps": 5}, {"name": "b", "train": {"steps": 7}}, {"name": "c"}]
    bench = read_bench(_bench(tmp_path, {"defaults": defaults, "runs": runs}))
    assert {n: s["steps"] for n, s in bench.settings.items()} == {"a": 5, "b": 7, "c": 3}
    assert all(s["batch_size"] == 8 for s in bench.settings.values())
    # a base run reads its evaluation data and columns from a section as well
    data = {"data": "qa.jsonl", "eval_data": "dev.jsonl", "prompt_column": "q", "response_column": "a"}
    spec = {"defaults": {"model": str(chat_llama_dir), "data": data}, "generate": {"limit": 2}}
    bench = read_bench(_bench(tmp_path, {**spec, "runs": [{"name": "base", "train": False}]}))
    assert bench.recorded(bench.runs[0]) == {
        "model": str(chat_llama_dir), "eval_data": "dev.jsonl", "prompt_column": "q", "response_column": "a",
        "train": False,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"default": {"steps": 3}}, r"unknown key\(s\) \['default'\]; a bench file has defaults, runs"),
        ({"generation": {"limit": 2}}, r"unknown key\(s\) \['generation'\]"),
        ({"runs": [{"name": "x" * 101}]}, "at most 100 characters"),
        ({"runs": [{"name": "base", "train": False, "quantize": "nf4"}], "generate": {"limit": 2}},
         r"run base does not train, so quantize would not apply to it"),
    ],
)  # fmt: skip
def test_a_bench_file_is_checked_whole(tiny_bert_dir, tmp_path, change: dict, message: str) -> None:
    from lorakit.bench.run import BenchError, read_bench

    spec = {"defaults": {"model": str(tiny_bert_dir), "eval_data": "dev.tsv"}, "runs": [{"name": "a"}]}
    with pytest.raises(BenchError, match=message):
        read_bench(_bench(tmp_path, {**spec, **change}))


def test_runs_of_different_tasks_are_refused(tiny_bert_dir, chat_llama_dir, tmp_path) -> None:
    from lorakit.bench.run import BenchError, read_bench

    runs = [{"name": "cls", "model": str(tiny_bert_dir)}, {"name": "lm", "model": str(chat_llama_dir)}]
    with pytest.raises(BenchError, match=r"different tasks \(classification: cls; causal-lm: lm\)"):
        read_bench(_bench(tmp_path, {"runs": runs}))


def test_an_interrupted_bench_run_continues_from_its_checkpoint(
    tiny_bert_dir, tmp_path, capsys, monkeypatch
) -> None:
    from test_reliability_jobs import killed_at_batch

    from lorakit.bench.run import record
    from lorakit.cli import main

    defaults = {"model": str(tiny_bert_dir), "targets": ["query"], "max_length": 24, "steps": 4,
                "batch_size": 8, "eval_every": 0, "checkpoint_every": 1}  # fmt: skip
    bench = _bench(tmp_path, {"defaults": defaults, "runs": [{"name": "a"}]})
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lorakit-bench").touch()
    config = record(out, "a", "config")  # as the bench writes it, then the run is killed at its third step
    config.write_text(yaml.safe_dump(defaults))
    killed_at_batch(3, ["train", "--config", str(config), "--output-dir", str(out / "a")], monkeypatch)
    assert not (out / "a" / "metrics.json").exists()
    capsys.readouterr()
    assert main(["bench", str(bench), "--out", str(out)]) == 0
    assert "--resume auto" in capsys.readouterr().out and (out / "a" / "metrics.json").exists()
    straight = tmp_path / "straight"
    assert main(["train", "--config", str(config), "--output-dir", str(straight)]) == 0
    ours, theirs = (load_file(d / "adapter.safetensors") for d in (out / "a", straight))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_settings_recorded_with_sections_or_text_targets_read_as_the_bench_reads_them_now(tmp_path) -> None:
    from lorakit.bench.run import changed

    record = tmp_path / ".a.config.yaml"
    record.write_text(yaml.safe_dump({"train": {"steps": 3}, "targets": "query,value", "model": "minilm"}))
    assert changed(record, {"steps": 3, "targets": ["query", "value"], "model": "minilm"}) == []
    assert changed(record, {"steps": 4, "targets": ["query", "value"], "model": "minilm"}) == ["steps"]
    record.write_text(yaml.safe_dump({"model": "minilm", "train": False}))  # a base run's record
    assert changed(record, {"model": "minilm", "train": False}) == []
