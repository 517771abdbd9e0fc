"""`lorakit train` loses nothing: a failed run never touches a saved adapter, a finished run is never thrown
away, an interrupted run resumes to the same adapter, and a resume with other settings is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.common.errors import DiskFullError
from lorakit.jobs import job as J
from lorakit.jobs.config import JobConfig
from lorakit.train.loop import TrainConfig


def argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model),
        "--output-dir",
        str(out),
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--rank",
        "2",
        "--no-progress",
        *extra,
    ]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def adapter_still_works(out: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["merge", "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", "--adapter", str(out), "--out", str(tmp_path / "peft")]) == 0


def killed_at_batch(batch: int, train_argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``lorakit train`` until it draws its ``batch``-th batch, then kill it (no handler can catch it)."""

    class Killed(BaseException):
        pass

    real_next, drawn = J.D.BatchSampler.__next__, []

    def killed(self):
        drawn.append(1)
        if len(drawn) == batch:
            raise Killed
        return real_next(self)

    with monkeypatch.context() as m, pytest.raises(Killed):
        m.setattr(J.D.BatchSampler, "__next__", killed)
        main(train_argv)


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, tmp_path_factory) -> Path:
    """One good adapter that every failing run below tries, and fails, to replace."""
    out = tmp_path_factory.mktemp("jobs") / "run"
    assert main(argv(tiny_bert_dir, out, "--checkpoint-every", "3")) == 0
    return out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--overwrite", "--alpha", "inf"], "'alpha' = inf is invalid"),
        (["--overwrite", "--lr", "1e6"], "(diverged)"),
        (["--overwrite", "--text-column", "nope"], "no column 'nope'"),
        (["--overwrite", "--eval-batch-size", "0"], "eval_batch_size=0"),
        (["--resume"], "nothing to resume"),
        (["--overwrite", "--lr", "inf"], "invalid training setting lr=inf"),
    ],
)
def test_a_failed_run_leaves_the_saved_adapter_byte_identical(
    trained, tiny_bert_dir, capsys, flags, message
) -> None:
    before = snapshot(trained)
    capsys.readouterr()
    assert main(argv(tiny_bert_dir, trained, *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert snapshot(trained) == before
    assert leftovers(trained) == []  # and no half-made directory beside it


def test_a_run_that_fails_while_saving_leaves_the_old_adapter(
    trained, tiny_bert_dir, monkeypatch, capsys
) -> None:
    before = snapshot(trained)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(J.lorakit, "save", disk_full)
    with pytest.raises(
        DiskFullError,
        match="trained adapter was not saved; no checkpoint is kept: free space and train again; the adapter",
    ):
        cfg = TrainConfig(steps=2, batch_size=8, progress=False)
        J.run_job(JobConfig(model=str(tiny_bert_dir), output_dir=str(trained), overwrite=True, train=cfg))
    assert snapshot(trained) == before and leftovers(trained) == []


def test_eval_merge_and_export_of_the_adapter_work_after_the_failed_runs(trained, tmp_path, capsys) -> None:
    adapter_still_works(trained, tmp_path, capsys)


def test_overwrite_replaces_the_whole_directory_once_the_new_adapter_is_complete(
    tiny_bert_dir, tmp_path
) -> None:
    trained = tmp_path / "run"
    assert main(argv(tiny_bert_dir, trained, "--checkpoint-every", "3")) == 0
    old = snapshot(trained)
    assert main(argv(tiny_bert_dir, trained, "--overwrite", "--rank", "3")) == 0
    new = snapshot(trained)
    assert json.loads(new["job.json"])["rank"] == 3 and json.loads(new["adapter.json"])["config"]["rank"] == 3
    assert new["adapter.safetensors"] != old["adapter.safetensors"]
    assert not any(name.startswith("checkpoint") for name in new)  # the old run's checkpoint went with it
    assert leftovers(trained) == []


def test_a_failed_final_evaluation_keeps_the_saved_adapter(
    tiny_bert_dir, tmp_path, monkeypatch, capsys
) -> None:
    real, calls = J.evaluate, []

    def fails_after_training(model, data, batch_size=128):
        calls.append(len(data))
        if len(calls) > 1:  # the check before training passes; the final evaluation fails
            raise RuntimeError("out of memory")
        return real(model, data, batch_size)

    monkeypatch.setattr(J, "evaluate", fails_after_training)
    out = tmp_path / "run"
    assert main(argv(tiny_bert_dir, out)) == 2
    err = capsys.readouterr().err
    assert f"the adapter is saved in {out}, but the final evaluation failed" in err
    assert (out / "adapter.json").is_file() and (out / "job.json").is_file()
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(J, "evaluate", real)
    adapter_still_works(out, tmp_path, capsys)


def test_evaluation_data_the_model_cannot_evaluate_is_refused_before_training(
    tiny_bert_dir, tmp_path, capsys
) -> None:
    bad = tmp_path / "eval.jsonl"
    bad.write_text("\n".join(json.dumps({"sentence": "fine", "label": 7}) for _ in range(3)) + "\n")
    out = tmp_path / "run"
    assert main(argv(tiny_bert_dir, out, "--eval-data", str(bad))) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1
    assert not out.exists() and leftovers(out) == []


def test_an_interrupted_run_resumes_to_the_identical_adapter_and_a_changed_setting_is_refused(
    tiny_bert_dir, tmp_path, monkeypatch, capsys
) -> None:
    reference = tmp_path / "reference"
    assert main(argv(tiny_bert_dir, reference, "--checkpoint-every", "2")) == 0

    out = tmp_path / "run"
    killed_at_batch(6, argv(tiny_bert_dir, out, "--checkpoint-every", "2"), monkeypatch)
    assert not out.exists() and leftovers(out) == [".run.lorakit-new"]  # the resume point, beside
    capsys.readouterr()
    assert main(argv(tiny_bert_dir, out)) == 2  # neither --resume nor --overwrite: refused, nothing lost
    assert "has an interrupted run with a checkpoint" in capsys.readouterr().err
    for flags, setting in [
        (["--lr", "0.01"], "setting lr is 0.01 but the checkpoint was trained with 0.0005"),
        (["--batch-size", "4"], "setting batch_size is 4 but the checkpoint was trained with 8"),
        (["--rank", "4"], "setting rank is 4 but the checkpoint was trained with 2"),
        (
            ["--max-length", "8"],
            "the training examples (--data, its columns, --max-length, --chat-template) differ",
        ),
    ]:
        assert main([*argv(tiny_bert_dir, out, "--resume"), *flags]) == 2
        err = capsys.readouterr().err
        assert setting in err and err.count("\n") == 1, err
    weights = next((tmp_path / ".run.lorakit-new").rglob("adapter.safetensors"))
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])  # a damaged checkpoint: only a new run helps
    assert main(argv(tiny_bert_dir, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "the checkpoint cannot be used: start a new run (--overwrite" in err and "re-save" not in err, err
    weights.write_bytes(intact)
    assert main(argv(tiny_bert_dir, out, "--resume", "--eval-every", "2")) == 0  # observation may change
    assert leftovers(out) == []
    for name in ("adapter.safetensors",):
        ref, got = load_file(reference / name), load_file(out / name)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert json.loads((out / "job.json").read_text())["train"]["eval_every"] == 2  # what actually ran


def test_an_output_dir_with_other_files_or_the_current_directory_is_refused(
    tiny_bert_dir, tmp_path, monkeypatch, capsys
) -> None:
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(argv(tiny_bert_dir, out)) == 2
    assert "holds files that are not from a lorakit run (notes.txt)" in capsys.readouterr().err
    assert snapshot(out) == {"notes.txt": b"mine"} and leftovers(out) == []
    # Files named as a run's, without a run's adapter.json or job.json, may be the user's own: refused too.
    own = tmp_path / "own"
    (own / "eval").mkdir(parents=True)
    (own / "metrics.json").write_text('{"my": "results"}')
    (own / "eval" / "generations.jsonl").write_text("mine\n")
    for flags in ([], ["--overwrite"]):
        assert main([*argv(tiny_bert_dir, own), *flags]) == 2
        assert "holds eval, metrics.json but no adapter.json or job.json" in capsys.readouterr().err
    assert snapshot(own) == {"metrics.json": b'{"my": "results"}', "eval/generations.jsonl": b"mine\n"}
    monkeypatch.chdir(out)
    assert main(argv(tiny_bert_dir, Path("."))) == 2
    assert "is the current directory or contains it" in capsys.readouterr().err
    assert main(argv(tiny_bert_dir, Path("/"))) == 2
    assert "cannot hold a run" in capsys.readouterr().err


def test_files_of_ones_own_named_after_a_runs_files_are_kept_and_block_overwrite(
    tiny_bert_dir, tmp_path, capsys
) -> None:
    """A run's leftovers are ``.NAME.`` plus tempfile's eight characters or a swap suffix; an editor's swap
    file or notes named after a run file are the user's: ``--overwrite`` refuses rather than deletes them."""
    out = tmp_path / "run"
    assert main(argv(tiny_bert_dir, out)) == 0
    (out / ".job.json.swp").write_text("vim")
    (out / ".adapter.json.my-notes").write_text("mine")
    capsys.readouterr()
    assert main([*argv(tiny_bert_dir, out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "not from a lorakit run (.adapter.json.my-notes, .job.json.swp)" in err
    assert (out / ".job.json.swp").read_text() == "vim"
    assert (out / ".adapter.json.my-notes").read_text() == "mine"


def test_an_evaluation_is_never_written_into_the_part_of_a_run_a_rerun_replaces(trained) -> None:
    from lorakit.eval.run import GenerationReport

    for inside in (trained / "checkpoint", trained / "checkpoint" / "mine"):
        with pytest.raises(lorakit.OutputExistsError, match=f"is part of the lorakit run {trained}"):
            GenerationReport.check_out(inside, overwrite=False)
    GenerationReport.check_out(trained / "eval", overwrite=True)  # the run's own evaluation: its place
    GenerationReport.check_out(trained / "my-eval", overwrite=False)  # a new folder: a re-run refuses it


def test_lorakit_save_and_load_of_a_job_adapter_round_trip(trained, tiny_bert_dir) -> None:
    from lorakit.jobs.models import load_model

    model, _ = load_model(str(tiny_bert_dir), "classification")
    lorakit.load(model, trained)
    saved = load_file(trained / "adapter.safetensors")
    for name, layer in lorakit.adapted_layers(model):
        for key, tensor in layer.variant.adapter_state().items():
            assert torch.equal(tensor, saved[f"{name}.{key}"])
