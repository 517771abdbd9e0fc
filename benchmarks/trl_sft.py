"""The reference for the GSM8K bench: TRL's ``SFTTrainer`` with PEFT's LoRA at the bench's own budget.

Reads the budget from the bench file's ``defaults`` (model, data, columns, max length, steps, batch, learning
rate, schedule, warmup, clipping, seed, rank, alpha, dropout, targets), so both sides train the same way:
conversational prompt/completion examples in the model's chat template with the loss on the completion (TRL's
``completion_only_loss``), length-grouped batches. The tuned model is merged and evaluated by the same
``lorakit eval --generate`` as every lorakit run, and the row is written in lorakit's ``metrics.json`` format
beside the bench's, whose report is then rewritten with it::

    pip install -e ".[bench]"   # trl, peft, matplotlib
    python benchmarks/trl_sft.py benchmarks/gsm8k.yaml --out runs/gsm8k
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from lorakit.bench.report import write_report
from lorakit.bench.run import read_bench
from lorakit.data.datasets import read_rows
from lorakit.jobs.cliargs import job_values
from lorakit.jobs.job import measure_peak_memory_mb, reset_peak_memory
from lorakit.jobs.models import load_model

NAME = "trl_peft_lora"


def conversational(path: str, prompt: str, response: str) -> list[dict[str, list[dict[str, str]]]]:
    """Rows as TRL's conversational prompt/completion examples."""
    return [
        {
            "prompt": [{"role": "user", "content": r[prompt]}],
            "completion": [{"role": "assistant", "content": r[response]}],
        }
        for r in read_rows(path)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="the bench file whose defaults are the budget")
    parser.add_argument("--out", type=Path, required=True, help="the bench's output directory")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    bench = read_bench(args.bench)
    d = job_values(bench.defaults, "defaults")  # sections flattened, as every run reads them
    run = args.out / NAME
    run.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(d["model"], "causal-lm")
    train = Dataset.from_list(conversational(d["data"], d["prompt_column"], d["response_column"]))
    config = SFTConfig(
        output_dir=str(run / "trainer"), max_steps=d["steps"], per_device_train_batch_size=d["batch_size"],
        learning_rate=float(d["lr"]), lr_scheduler_type=d.get("schedule", "linear"),
        warmup_steps=int(d.get("warmup_ratio", 0.1) * d["steps"]), weight_decay=d.get("weight_decay", 0.0),
        max_grad_norm=d.get("clip", 1.0), seed=d.get("seed", 0), max_length=d["max_length"],
        completion_only_loss=True, train_sampling_strategy="group_by_length", packing=False, bf16=False,
        use_cpu=True, include_num_input_tokens_seen="non_padding", logging_steps=10, save_strategy="no",
        report_to="none", dataloader_num_workers=0,
    )  # fmt: skip
    lora = LoraConfig(
        r=d.get("rank", 8), lora_alpha=d.get("alpha", 16), lora_dropout=d.get("dropout", 0.05),
        target_modules=d.get("targets", "all-linear"), task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=lora
    )
    reset_peak_memory()  # the training's peak, measured as lorakit measures its own
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    peak = measure_peak_memory_mb()
    tuned = trainer.model
    trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    total = sum(p.numel() for p in tuned.parameters())
    tokens = trainer.state.num_input_tokens_seen or 0
    merged_dir = run / "merged"
    tuned.merge_and_unload().save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.save_pretrained(merged_dir)
    cmd = [
        sys.executable, "-m", "lorakit.cli", "eval", "--model", str(merged_dir), "--data", d["eval_data"],
        "--prompt-column", d["prompt_column"], "--response-column", d["response_column"],
        "--max-length", str(d["max_length"]), "--generate", "--overwrite", "--out", str(run / "eval"),
    ]  # fmt: skip
    for key, value in (bench.generate or {}).items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    subprocess.run(cmd, check=True)
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    record = {
        "metrics": {"loss": evaluated["loss"], "perplexity": evaluated["perplexity"]},
        "trainable": trainable,
        "total": total,
        "seconds": round(seconds, 1),
        "steps": output.global_step,
        "final_loss": output.training_loss,
        "adapter_dir": str(run),
        "peak_memory_mb": peak,
        "extra": {"tokens_per_second": round(tokens / seconds, 1) if tokens else 0.0},
    }
    (run / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    names = [r["name"] for r in bench.runs] + [NAME]
    notes = {r["name"]: r.get("note", "") for r in bench.runs}
    notes[NAME] = "reference: TRL SFTTrainer + PEFT LoRA"
    write_report(args.out, names, notes)


if __name__ == "__main__":
    main()
