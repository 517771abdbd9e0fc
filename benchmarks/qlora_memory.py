"""QLoRA's 4-bit base: weight bytes of NF4 + double quantisation vs fp32 and bf16, quantise time, step time.

Base-weight bytes count the weights of the layers ``lorakit.quantize`` stores in 4 bits (every nn.Linear
except the output head; biases, embeddings and norms stay as they are and are left out of both sides):
packed 4-bit codes + 8-bit block scales + fp32 nested scales + the fp32 offset, read from the quantised
layers' buffers. QLoRA (arXiv:2305.14314) gives 4 + 8/64 + 32/(64*256) = 4.127 bits per weight, 0.129 of fp32.

Models: ``minilm`` (the embedded 6-layer BERT) and a 1B-parameter-shaped Llama stack (TinyLlama-1.1B's shape:
hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads), built and quantised one decoder layer at a
time so the fp32 stack (3.9 GB) never exists at once. Step time: one LoRA training step (forward, backward,
AdamW) on minilm, batch 32, length 64, rank 8 on query/key/value/dense, fp32 base vs NF4 base (bf16 compute),
median of interleaved repeats.

    python benchmarks/qlora_memory.py --out runs/qlora_memory.json
    python benchmarks/qlora_memory.py --smollm2 --out runs/qlora_memory_smollm2.json

``--smollm2``: the real LLM (SmolLM2-135M-Instruct): its base-weight bytes stored in fp32, bf16 and NF4 +
double quantisation (every linear layer of the blocks; the tied embedding and head stay as they are), the peak
resident memory of LoRA training steps on each (batch 4 x 256 GSM8K tokens, rank 8, all-linear), each base
in its own process so the peaks are its own: LoRA on the fp32 base, LoRA on the bf16 base, QLoRA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lorakit
from lorakit.core.nf4_linear import NF4Linear
from lorakit.data.datasets import read_rows
from lorakit.jobs.models import load_model

MIB = 2**20
TARGETS = ["query", "key", "value", "dense"]
SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


def linear_weight_numel(model: nn.Module) -> int:
    return sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, NF4Linear))


def nf4_weight_bytes(model: nn.Module) -> int:
    """Bytes of the quantised weights: every NF4Linear buffer (the bias is a parameter, not counted)."""
    return sum(
        b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Linear) for b in m.buffers()
    )


def memory_row(name: str, numel: int, nf4_bytes: int, seconds: float) -> dict:
    return {
        "model": name,
        "quantised_weights": numel,
        "fp32_mib": numel * 4 / MIB,
        "bf16_mib": numel * 2 / MIB,
        "nf4_dq_mib": nf4_bytes / MIB,
        "nf4_dq_over_fp32": nf4_bytes / (numel * 4),
        "bits_per_weight": nf4_bytes * 8 / numel,
        "quantise_seconds": seconds,
    }


def minilm_memory() -> dict:
    model, _ = load_model("minilm", "classification")
    start = time.perf_counter()
    lorakit.quantize(model)
    seconds = time.perf_counter() - start
    return memory_row("minilm (BERT, 6 layers)", linear_weight_numel(model), nf4_weight_bytes(model), seconds)


def llama_1b_memory(layers: int) -> dict:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    stack = nn.ModuleList()
    numel = nbytes = 0
    seconds = 0.0
    torch.manual_seed(0)
    for i in range(layers):
        layer = LlamaDecoderLayer(config, layer_idx=i)  # fp32, about 176 MB
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=config.initializer_range)
        start = time.perf_counter()
        lorakit.quantize(layer)
        seconds += time.perf_counter() - start
        numel += linear_weight_numel(layer)
        nbytes += nf4_weight_bytes(layer)
        stack.append(layer)  # only the 4-bit layer is kept
    return memory_row(f"Llama 1B shape ({layers} layers)", numel, nbytes, seconds)


def minilm_batch(tokenizer, batch_size: int, length: int) -> dict[str, torch.Tensor]:
    """A batch padded to ``length`` (the worst case of the reference budget)."""
    rows = (read_rows(str(SST2)) if SST2.exists() else read_rows("demo"))[:batch_size]
    enc = tokenizer(
        [str(r["sentence"]) for r in rows],
        padding="max_length",
        truncation=True,
        max_length=length,
        return_tensors="pt",
    )
    labels = torch.tensor([int(r["label"]) for r in rows])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def step_times(batch_size: int, length: int, repeats: int) -> list[dict]:
    contenders = {}
    tokenizer = None
    for name, quantise in (("fp32 base", False), ("NF4 base (bf16 compute)", True)):
        torch.manual_seed(0)
        model, tokenizer = load_model("minilm", "classification")
        if quantise:
            lorakit.quantize(model)
        lorakit.apply(model, "lora", targets=TARGETS, train_modules=["classifier"], rank=8, alpha=16.0)
        model.train()
        opt = torch.optim.AdamW(lorakit.param_groups(model, 5e-4))
        contenders[name] = (model, opt)
    batch = minilm_batch(tokenizer, batch_size, length)

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for model, opt in contenders.values():
        step(model, opt)  # warm-up
    for _ in range(repeats):  # interleaved, so machine load hits both alike
        for name, (model, opt) in contenders.items():
            times[name].append(step(model, opt))
    base = statistics.median(times["fp32 base"])
    return [
        {
            "base": name,
            "median_ms": statistics.median(t) * 1000,
            "vs_fp32": statistics.median(t) / base,
            "repeats": repeats,
        }
        for name, t in times.items()
    ]


def markdown(memory: list[dict], steps: list[dict], batch_size: int, length: int) -> str:
    lines = [
        "| model | quantised weights | fp32 MiB | bf16 MiB | NF4+DQ MiB | NF4+DQ / fp32 | bits/weight "
        "| quantise s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in memory:
        lines.append(
            f"| {r['model']} | {r['quantised_weights']:,} | {r['fp32_mib']:.1f} | {r['bf16_mib']:.1f} | "
            f"{r['nf4_dq_mib']:.1f} | {r['nf4_dq_over_fp32']:.4f} | {r['bits_per_weight']:.3f} | "
            f"{r['quantise_seconds']:.2f} |"
        )
    lines += [
        "",
        f"LoRA step on minilm (batch {batch_size}, length {length}, rank 8, query/key/value/dense):",
        "",
        "| base | median step ms | vs fp32 base |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r['base']} | {r['median_ms']:.0f} | {r['vs_fp32']:.2f}x |" for r in steps]
    return "\n".join(lines)


def smollm2_peak(storage: str, steps: int = 3) -> dict:
    """LoRA training steps on SmolLM2 with its base stored as ``storage`` (fp32, bf16 or nf4): the base-weight
    bytes and the peak resident memory of the steps (measured from after loading), in this process."""
    sys.path.insert(0, str(Path(__file__).parent))
    from step_cost import rss_mb, smollm2_batch

    from lorakit.distributed.memory import base_weight_bytes
    from lorakit.engine.token_loss import TokenLoss
    from lorakit.jobs.job import reset_peak_memory

    model, tokenizer = load_model("smollm2", "causal-lm")
    batch = smollm2_batch(tokenizer, 4, 256)
    config = {"rank": 8, "alpha": 16.0, "dropout": 0.05, "targets": "all-linear"}
    if storage == "bf16":
        model.to(torch.bfloat16)
    variant = "qlora" if storage == "nf4" else "lora"
    extra = {"compute_dtype": "float32"} if storage == "nf4" else {}
    lorakit.apply(model, variant, **config, **extra)
    opt = torch.optim.AdamW(lorakit.param_groups(model, 1e-4))
    before = rss_mb("VmRSS")
    reset_peak_memory()
    for _ in range(steps):
        summed, count = TokenLoss.of(model)(**batch)
        (summed / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    weights = base_weight_bytes(model)
    return {
        "storage": storage,
        "base_weight_mib": weights["per_rank"] / MIB,
        "base_over_fp32": weights["ratio"],
        "resident_before_steps_mib": before,
        "peak_mib": rss_mb("VmHWM"),
    }


def smollm2_table(rows: list[dict]) -> str:
    lines = [
        "| SmolLM2-135M base | base weights MiB | vs fp32 | resident before the steps MiB | peak during the "
        "steps MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"fp32": "fp32, LoRA", "bf16": "bf16, LoRA", "nf4": "NF4 + DQ, QLoRA"}
    for r in rows:
        lines.append(
            f"| {names[r['storage']]} | {r['base_weight_mib']:.1f} | {r['base_over_fp32']:.3f}x | "
            f"{r['resident_before_steps_mib']:.0f} | {r['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--smollm2", action="store_true", help="the real LLM: fp32, bf16 and NF4 bases")
    # one child process per base storage (its own peak)
    parser.add_argument("--peak", choices=["fp32", "bf16", "nf4"], help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=22, help="decoder layers of the 1B-shaped Llama stack")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed LoRA steps per base")
    args = parser.parse_args()
    if args.peak:  # a child: one base, its own peak
        Path(args.out).write_text(json.dumps(smollm2_peak(args.peak)) + "\n")
        return
    if args.smollm2:
        rows = []
        for storage in ("fp32", "bf16", "nf4"):
            child = Path(args.out).with_suffix(f".{storage}.json")
            cmd = [sys.executable, __file__, "--peak", storage, "--out", str(child)]
            subprocess.run(cmd, check=True)
            rows.append(json.loads(child.read_text()))
            child.unlink()
        print(smollm2_table(rows))
        Path(args.out).write_text(json.dumps({"smollm2": rows}, indent=2) + "\n")
        return
    memory = [minilm_memory(), llama_1b_memory(args.layers)]
    steps = step_times(args.batch_size, args.length, args.repeats)
    print(markdown(memory, steps, args.batch_size, args.length))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"memory": memory, "step_time": steps, "env": env}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
