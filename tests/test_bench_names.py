"""`lorakit bench` writes only inside --out and never replaces an adapter it did not train."""

from __future__ import annotations

import pytest
import yaml
from test_loop import adapted

import lorakit
from lorakit.bench.run import BenchError, load_bench
from lorakit.cli import main


def bench_file(tmp_path, runs, defaults=None):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({"defaults": defaults or {}, "runs": runs}))
    return path


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "", ".hidden", "..", "a\\b", "results", 3, "a..b"])
def test_run_names_that_are_not_one_plain_directory_are_refused(tmp_path, name) -> None:
    with pytest.raises(BenchError, match="is not allowed; a name is one directory inside --out"):
        load_bench(bench_file(tmp_path, [{"name": name}]))


@pytest.mark.parametrize(
    ("runs", "defaults", "message"),
    [
        ([{"name": "a"}, {"name": "a"}], {}, r"run names \['a'\] are used more than once"),
        ([{"name": "a", "output_dir": "/elsewhere"}], {}, r"run a sets \['output_dir'\]"),
        ([{"name": "a"}], {"overwrite": True}, r"defaults sets \['overwrite'\]"),
        (["a"], {}, "'runs' must be a list of mappings"),
        (
            [{"name": "a", "train": "false"}],
            {},
            r"run a: train must be true or false \(or a section of training settings\), not 'false'",
        ),
        ([{"name": "base", "train": False}], {}, "run base does not train, .* add a 'generate' mapping"),
        ([{"name": "a"}], {"bogus_key": 1}, r"bench.yaml: defaults: unknown setting\(s\) \['bogus_key'\]"),
        ([{"name": "a", "rnak": 2}], {}, r"bench.yaml: run a: unknown setting\(s\) \['rnak'\]"),
    ],
)
def test_bench_files_that_would_write_elsewhere_or_twice_are_refused(
    tmp_path, runs, defaults, message
) -> None:
    with pytest.raises(BenchError, match=message):
        load_bench(bench_file(tmp_path, runs, defaults))


def test_a_bench_with_an_escaping_name_writes_nothing_and_exits_2(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    assert main(["bench", str(bench_file(tmp_path, [{"name": "../victim"}])), "--out", str(out)]) == 2
    assert "run name '../victim' is not allowed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.yaml"]


def test_a_bench_never_replaces_an_adapter_it_did_not_train(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    lorakit.save(adapted(), out / "lora")  # trained elsewhere, no metrics.json, no bench log
    before = {p.name: p.read_bytes() for p in (out / "lora").iterdir()}
    bench = str(bench_file(tmp_path, [{"name": "lora"}]))
    assert main(["bench", bench, "--out", str(out)]) == 2  # no bench wrote there: refused before any run
    assert "holds lora, which the bench writes, but no bench wrote them there" in capsys.readouterr().err
    (out / ".lorakit-bench").touch()  # a bench's own directory, where someone put the adapter since
    assert main(["bench", bench, "--out", str(out)]) == 1
    assert "holds an adapter this bench did not train; not replacing it" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (out / "lora").iterdir()} == before
    assert not (out / "lora.log").exists()
