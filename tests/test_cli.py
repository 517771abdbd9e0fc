"""Every CLI command end to end on tiny inputs: list, train (flags and YAML), eval, merge, errors."""

from __future__ import annotations

import json

import pytest

import lorakit
from lorakit.cli import main


def test_list_names_every_variant(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, cls in lorakit.VARIANTS.items():
        assert name in out and cls.paper in out


def test_train_eval_merge_on_the_embedded_model(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text("model: minilm\nrank: 4\ntrain:\n  steps: 30\n  lr: 0.002\n  batch_size: 16\n")
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--output-dir",
                str(run),
                "--no-progress",
                "--targets",
                "query,value",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["metrics"]["accuracy"] > 0.85
    assert metrics["peak_memory_mb"] > 100 and metrics["trainable"] > 0
    assert f"adapter saved to {run}" in out
    assert (run / "adapter.safetensors").exists() and json.loads((run / "adapter.json").read_text())[
        "config"
    ]["rank"] == 4
    assert main(["eval", "--adapter", str(run)]) == 0
    assert f"accuracy {metrics['metrics']['accuracy']:.4f}" in capsys.readouterr().out
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, lorakit.AdaptedLayer) for m in merged.modules())
    # the merged model predicts like the adapter: re-evaluate through the library
    from transformers import AutoTokenizer

    from lorakit.data.datasets import demo_rows, tokenize_classification
    from lorakit.jobs.job import evaluate

    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    data = tokenize_classification(demo_rows("test"), tok, "sentence", "label", 64, "demo")
    assert evaluate(merged, data)["accuracy"] == pytest.approx(metrics["metrics"]["accuracy"], abs=1e-3)
    # exported in PEFT's format, the adapter (and the trained head) predicts the same through PEFT
    assert main(["export", "--adapter", str(run), "--out", str(tmp_path / "peft")]) == 0
    from peft import PeftModel

    from lorakit.jobs.models import load_model

    base, _ = load_model("minilm", "classification")
    through_peft = PeftModel.from_pretrained(base, tmp_path / "peft")
    assert evaluate(through_peft, data)["accuracy"] == pytest.approx(metrics["metrics"]["accuracy"], abs=1e-3)
    assert main(["export", "--adapter", str(run), "--out", str(tmp_path / "peft")]) == 2
    assert "already holds a PEFT adapter" in capsys.readouterr().err
    own = tmp_path / "own"  # a tokenizer of the user's is never replaced without --overwrite
    own.mkdir()
    (own / "tokenizer.json").write_text('{"my": "own"}')
    assert main(["export", "--adapter", str(run), "--out", str(own)]) == 2
    assert "is not empty; pass --overwrite to replace its files" in capsys.readouterr().err
    assert [p.name for p in own.iterdir()] == ["tokenizer.json"]
    assert (own / "tokenizer.json").read_text() == '{"my": "own"}'
    (tmp_path / "a-file").write_text("x")
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "a-file")]) == 2
    assert "a-file is a file; choose a new directory" in capsys.readouterr().err
    # a second run into the same directory is refused instead of overwriting the saved adapter
    assert main(["train", "--config", str(config), "--output-dir", str(run), "--no-progress"]) == 2
    assert "already holds a trained adapter" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--variant", "nope", "--no-progress"], "unknown variant 'nope'"),
        (["train", "--rank", "0", "--no-progress"], "'rank' = 0 is invalid"),
        (["train", "--data", "missing.tsv", "--no-progress"], "missing.tsv does not exist"),
        (["train", "--text-column", "text", "--no-progress"], "has no column 'text'"),
        (["train", "--set", "bogus=1", "--no-progress"], "unknown config field(s) ['bogus']"),
        (["eval", "--adapter", "/nonexistent"], "not a lorakit adapter directory"),
    ],
)
def test_bad_input_is_one_line_error(argv, message, tiny_bert_dir, tmp_path, capsys) -> None:
    if argv[0] == "train":
        argv = [*argv, "--model", str(tiny_bert_dir), "--output-dir", str(tmp_path / "o"), "--steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_train_a_local_causal_lm_on_prompt_response_jsonl(tmp_path, capsys) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit.jobs.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model_dir = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"q": f"what is {a} plus {a}?", "a": f"{2 * a}"} for a in range(40)]
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = tmp_path / "run"
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--task",
        "causal-lm",
        "--data",
        str(data),
        "--eval-data",
        str(data),
        "--prompt-column",
        "q",
        "--response-column",
        "a",
        "--targets",
        "all-linear",
        "--steps",
        "30",
        "--lr",
        "0.01",
        "--batch-size",
        "8",
        "--output-dir",
        str(run),
        "--no-progress",
    ]
    assert main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"loss", "perplexity"}
    from lorakit.data.datasets import conversations, tokenize_causal
    from lorakit.jobs.job import evaluate

    tokens = tokenize_causal(conversations(rows, "messages", "q", "a", "qa"), tokenizer, None, 64)
    base_loss = evaluate(LlamaForCausalLM.from_pretrained(model_dir), tokens)["loss"]
    assert metrics["metrics"]["loss"] < base_loss - 0.2, (base_loss, metrics["metrics"])
    assert main(["eval", "--adapter", str(run)]) == 0
    assert f"loss {metrics['metrics']['loss']:.4f}" in capsys.readouterr().out


def test_set_values_read_as_numbers_booleans_lists_or_text() -> None:
    from lorakit.common.settings import parse_assignments

    values = parse_assignments(["lr_ratio=1e-3", "ratio=16", "frozen=true", "pair=[1, 2]", "init=gaussian"])
    assert values == {"lr_ratio": 0.001, "ratio": 16, "frozen": True, "pair": [1, 2], "init": "gaussian"}
    assert parse_assignments(["tag=2024-01-01"]) == {"tag": "2024-01-01"}  # YAML would make it a date
    with pytest.raises(ValueError, match="--set expects FIELD=VALUE, got '=3'"):
        parse_assignments(["=3"])
