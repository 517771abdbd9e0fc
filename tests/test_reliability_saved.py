"""What `eval`, `merge` and `export` read and write: a directory that is no finished adapter is named for what
it is (a checkpoint, an interrupted run) with the fix, never evaluated on other data or blamed on labels or
sizes; class names, tokenizer, chat template and generation config reach the merged and exported models; and
the one-line messages of adapter files name the real cause."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from test_reliability_jobs import argv, killed_at_batch, leftovers

import lorakit
import lorakit.common.dirlock as dirlock
from lorakit.adapters.io import AdapterFileError
from lorakit.cli import main

CHAT = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def one_error(argv_: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv_) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def named(tiny_bert_dir, tmp_path_factory) -> Path:
    """A three-class adapter trained on class names, with a checkpoint."""
    root = tmp_path_factory.mktemp("named")
    rows = [f"it was {w}\t{c}" for w, c in [("good", "pos"), ("bad", "neg"), ("okay", "meh")] * 8]
    (root / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    out = root / "run"
    assert main(argv(tiny_bert_dir, out, "--data", str(root / "train.tsv"), "--checkpoint-every", "3")) == 0
    return out


def test_an_adapter_without_its_job_needs_data_and_never_falls_back_to_the_demo(
    named, tmp_path, capsys
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(named, bare)
    (bare / "job.json").unlink()
    err = one_error(["eval", "--adapter", str(bare)], capsys)
    assert "has no job.json" in err and "pass --data PATH" in err
    (tmp_path / "ids.tsv").write_text("sentence\tlabel\nit was good\t2\nit was bad\t1\n")
    assert main(["eval", "--adapter", str(bare), "--data", str(tmp_path / "ids.tsv")]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["merge", "--adapter", str(bare), "--out", str(tmp_path / "merged")]) == 0  # 3 classes, read
    assert len(json.loads((tmp_path / "merged" / "config.json").read_text())["id2label"]) == 3  # off the head


def test_a_checkpoint_or_an_interrupted_run_is_named_with_the_fix_by_every_command(
    named, tiny_bert_dir, tmp_path, monkeypatch, capsys
) -> None:
    err = one_error(["eval", "--adapter", str(named / "checkpoint")], capsys)
    assert f"is a training checkpoint, not a finished adapter: the run's adapter is {named}" in err

    out = tmp_path / "run"
    killed_at_batch(5, argv(tiny_bert_dir, out, "--checkpoint-every", "2"), monkeypatch)
    staging = tmp_path / ".run.lorakit-new"
    interrupted = f"the run into {out} was interrupted at the checkpoint of step 4; `lorakit train ... "
    resume = f"--output-dir {out} --resume` continues it"
    for adapter, what in [
        (out, "holds no adapter yet"),
        (staging, "is an unfinished run, not a finished adapter"),
        (staging / "checkpoint", "is a training checkpoint, not a finished adapter"),
    ]:
        for command in (
            ["eval"],
            ["merge", "--out", str(tmp_path / "m")],
            ["export", "--out", str(tmp_path / "p")],
        ):
            err = one_error([*command, "--adapter", str(adapter)], capsys)
            assert f"{adapter} {what}: {interrupted}{resume}" in err, err
    fresh = tmp_path / "fresh"  # a run that has written no checkpoint yet
    for locked, adapters in [(out, [out, staging, staging / "checkpoint"]), (fresh, [fresh])]:
        with dirlock.exclusive(locked, str(locked), "lorakit test"):  # a run writing it now
            for adapter in adapters:
                err = one_error(["eval", "--adapter", str(adapter)], capsys)
                assert f"is being written by a running command (lorakit test, pid {os.getpid()}" in err, err
                assert "wait for it to finish" in err and "--resume" not in err, err
    assert main([*argv(tiny_bert_dir, out, "--checkpoint-every", "2"), "--resume"]) == 0  # as it said
    assert leftovers(out) == [] and not (tmp_path / "m").exists() and not (tmp_path / "p").exists()


def test_class_names_reach_the_merged_model_and_it_predicts_as_the_adapter(named, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from lorakit.jobs.saved import load_adapted

    assert main(["merge", "--adapter", str(named), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {0: "meh", 1: "neg", 2: "pos"}
    assert merged.config.label2id == {"meh": 0, "neg": 1, "pos": 2}
    _, adapted, tokenizer = load_adapted(str(named))
    batch = tokenizer(["it was good", "it was okay"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**batch).logits, adapted.eval()(**batch).logits, atol=1e-5, rtol=1e-5
        )


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory) -> Path:
    """A tiny Llama directory whose tokenizer has a chat template and whose generation config is its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", *"0123456789+=:", "user", "assistant"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT
    model = tiny_llama()
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=7
    )
    out = tmp_path_factory.mktemp("chat-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_causal_lm_keeps_its_chat_template_tokenizer_and_generation_config_when_merged_and_exported(
    chat_llama, tmp_path
) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    rows = [{"prompt": f"{a} + {b} =", "response": str((a + b) % 10)} for a in range(5) for b in range(5)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    train = [*argv(chat_llama, run), "--task", "causal-lm", "--targets", "q_proj,v_proj"]
    assert main([*train, "--data", str(tmp_path / "sums.jsonl")]) == 0
    for command in ("merge", "export"):
        out = tmp_path / command
        assert main([command, "--adapter", str(run), "--out", str(out)]) == 0
        assert AutoTokenizer.from_pretrained(out).chat_template == CHAT, command
        assert GenerationConfig.from_pretrained(out).max_new_tokens == 7, command
    base = lorakit.load_peft(tiny_llama(), tmp_path / "export")  # the extra files do not disturb a reader
    assert lorakit.info(base).variant == "lora"


def test_adapter_files_name_the_real_cause(named, tmp_path) -> None:
    from lorakit.jobs.models import load_model

    def fresh():
        return load_model(
            json.loads((named / "adapter.json").read_text())["base_model"], "classification", 3
        )[0]

    assert main(["export", "--adapter", str(named), "--out", str(tmp_path / "peft")]) == 0
    with pytest.raises(
        AdapterFileError, match=r"holds a PEFT adapter \(adapter_config.json\).*lorakit.load_peft"
    ):
        lorakit.load(fresh(), tmp_path / "peft")
    edited = tmp_path / "edited"
    for change, message in [
        (lambda m: {**m, "format_version": 2}, "saved in format version 2 by lorakit .*: upgrade lorakit"),
        (lambda m: {**m, "format_version": "1"}, "format_version '1' is not a version number"),
        (lambda m: {k: v for k, v in m.items() if k != "format_version"}, "format_version None is not"),
        (
            lambda m: {**m, "targets": m["targets"][1:]},
            "adapter.json: its config.s targets select .* not the base it was trained on, or the file was",
        ),
        (
            lambda m: {**m, "targets": ["no.such.layer"], "config": {**m["config"], "targets": ["query"]}},
            r"adapts layers this model does not have \(no.such.layer\)",
        ),
    ]:
        shutil.rmtree(edited, ignore_errors=True)
        shutil.copytree(named, edited)
        meta = json.loads((edited / "adapter.json").read_text())
        (edited / "adapter.json").write_text(json.dumps(change(meta)))
        model = fresh()
        with pytest.raises(AdapterFileError, match=message):
            lorakit.load(model, edited)
        assert not hasattr(model, "lorakit")


def test_a_second_export_names_the_flag_and_a_resume_names_the_changed_setting(
    named, tiny_bert_dir, tmp_path, capsys
) -> None:
    export = ["export", "--adapter", str(named), "--out", str(tmp_path / "peft")]
    assert main(export) == 0
    err = one_error(export, capsys)
    assert "already holds a PEFT adapter (adapter_config.json); pass --overwrite to replace it" in err
    assert main([*export, "--overwrite"]) == 0
    staging = tmp_path / ".run.lorakit-new"
    run = tmp_path / "run"
    assert main(argv(tiny_bert_dir, run, "--checkpoint-every", "3")) == 0
    staging.mkdir()
    (run / "checkpoint").rename(staging / "checkpoint")  # a run interrupted after its last checkpoint
    shutil.rmtree(run)
    err = one_error([*argv(tiny_bert_dir, run, "--resume", "--quantize", "nf4")], capsys)
    assert "is 'nf4' but the checkpoint was trained with quantize unset; resume with quantize unset" in err


def test_merge_and_export_never_write_over_a_run_or_its_checkpoint(
    named, tiny_bert_dir, tmp_path, capsys
) -> None:
    """A run's directory and the entries it writes (the checkpoint a resume reads) are refused as outputs
    before anything is written; a new folder inside the run is an output like any other, and a re-run then
    refuses to replace the directory holding it."""
    before = sorted(p.relative_to(named) for p in named.rglob("*"))
    for command in ("export", "merge"):
        for out in (named, named / "checkpoint", named / "checkpoint" / "deeper"):
            err = one_error([command, "--adapter", str(named), "--out", str(out)], capsys)
            assert (
                f"{named} is a lorakit run directory" in err or f"is part of the lorakit run {named}" in err
            )
            assert f"to a new directory, e.g. {named.parent / 'run-'}" in err, err
    assert sorted(p.relative_to(named) for p in named.rglob("*")) == before
    run = tmp_path / "run"
    shutil.copytree(named, run)
    assert main(["export", "--adapter", str(run), "--out", str(run / "peft")]) == 0
    assert (run / "peft" / "adapter_config.json").is_file()
    err = one_error(argv(tiny_bert_dir, run, "--overwrite"), capsys)
    assert "holds files that are not from a lorakit run (peft)" in err
    assert (run / "peft" / "adapter_config.json").is_file()


def test_a_run_evaluated_into_its_own_folder_can_be_trained_again_over(
    named, tiny_bert_dir, tmp_path, capsys
) -> None:
    """`lorakit eval --generate` writes into ADAPTER/eval by default: that folder is the run's own, so
    `train --overwrite` (and a bench run again) replaces it with the run, and no export goes there."""
    run = tmp_path / "run"
    shutil.copytree(named, run)
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text('{"loss": 1.0}')
    err = one_error(["export", "--adapter", str(run), "--out", str(run / "eval")], capsys)
    assert f"is part of the lorakit run {run}" in err
    assert main(argv(tiny_bert_dir, run, "--overwrite")) == 0
    assert (run / "adapter.json").is_file() and not (run / "eval").exists()


@pytest.mark.parametrize("foreign", ["other-model/metrics.json", "notes.txt"])
def test_a_runs_eval_folder_holding_anything_else_is_never_replaced(
    named, tiny_bert_dir, tmp_path, capsys, foreign
) -> None:
    """Only what `lorakit eval` writes into ADAPTER/eval is the run's own: another adapter's evaluation
    written there (`eval --out RUN/eval/NAME`) or a file of the user's keeps the run from being replaced."""
    run = tmp_path / "run"
    shutil.copytree(named, run)
    (run / "eval").mkdir()
    (run / "eval" / "generations.jsonl").write_text("{}\n")
    (run / "eval" / foreign).parent.mkdir(parents=True, exist_ok=True)
    (run / "eval" / foreign).write_text("kept")
    err = one_error(argv(tiny_bert_dir, run, "--overwrite"), capsys)
    top = foreign.split("/")[0]
    assert f"holds files that are not from a lorakit run (eval/{top})" in err
    assert (run / "eval" / foreign).read_text() == "kept" and (run / "eval" / "generations.jsonl").is_file()
