"""Data-parallel training here: throughput of 1 vs 2 processes, and peak memory per rank, FSDP2 vs DDP.

Throughput: ``lorakit train`` on ``minilm`` (LoRA rank 8 on query/key/value/dense, SST-2 rows, length 64) with
the same global batch (32) in one process and under ``torchrun --nproc_per_node 2`` (16 per rank, gloo, one
thread per process); samples per second of training time (``metrics.json`` ``seconds``, loading excluded).

Memory: a Llama-style causal LM configured here (hidden 1024, intermediate 2816, 8 layers, vocab 32000, about
170M parameters, fp32), LoRA rank 8 on every linear layer, 2 ranks, batch 2 x 64 tokens per rank. Per rank:
bytes of the adapted layers' base weights held after wrapping, all parameter and buffer bytes held, and the
peak resident memory during 3 training steps (Linux ``VmHWM`` reset after wrapping: the model is built whole
on each rank before FSDP2 shards it, so loading itself still peaks at the full model; glibc's mmap
threshold is fixed so that freed tensors leave resident memory). Rows: DDP and FSDP2, each with a dense
fp32 base (LoRA) and an NF4 base (QLoRA: packed; FSDP2 shards it too).

    python benchmarks/distributed.py --out runs/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
MIB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- throughput ----------------------------------------------------------------------------------------
def train_minilm(processes: int, steps: int, data: Path, out: Path) -> dict:
    flags = ["train", "--model", "minilm", "--data", str(data), "--steps", str(steps), "--no-progress"]
    flags += ["--batch-size", str(32 // processes), "--max-length", "64"]
    flags += ["--output-dir", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, "-m", "lorakit", *flags]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
        command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "lorakit"]
        command += [*flags, "--distributed", "ddp"]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "processes": processes,
        "seconds": metrics["seconds"],
        "samples_per_s": 32 * steps / metrics["seconds"],
    }


# --- memory --------------------------------------------------------------------------------------------
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def held_bytes(model: torch.nn.Module) -> int:
    from lorakit.distributed.memory import _local

    tensors = list(model.parameters()) + list(model.buffers())
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def _memory_rank(rank: int, port: int, mode: str, variant: str, results: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    import lorakit
    from lorakit.distributed import join
    from lorakit.distributed.memory import base_weight_bytes
    from lorakit.engine.token_loss import TokenLoss, takes_token_loss
    from lorakit.train.loop import TrainConfig, train

    group = join(mode)
    model = llama()
    options = {"compute_dtype": "float32"} if variant == "qlora" else {}
    lorakit.apply(model, variant, targets="all-linear", rank=8, dropout=0.0, **options)
    # Wrapped (as train() wraps it: the module that runs the model to its token loss) before the memory is
    # read; train() below reuses this wrapping.
    group.begin(model)
    group.attach(TokenLoss.of(model) if takes_token_loss(model) else model)
    base, held = base_weight_bytes(model), held_bytes(model)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the training steps only

    def batches():
        gen = torch.Generator().manual_seed(rank)
        while True:
            ids = torch.randint(0, 32000, (2, 64), generator=gen)
            yield {"input_ids": ids, "labels": ids}

    cfg = TrainConfig(steps=3, batch_size=2, progress=False, warmup_ratio=0.0)
    result = train(model, batches(), cfg, placement=group)
    results[rank] = {
        "mode": mode,
        "variant": variant,
        "base_mib_per_rank": round(base["per_rank"] / MIB, 1),
        "base_over_fp32": base["ratio"],
        "held_mib_per_rank": round(held / MIB, 1),
        "peak_rss_mib_training": round(vm_hwm_mib(), 1),
        "loss": round(result.losses[-1], 4),
    }


def memory_run(mode: str, variant: str) -> list[dict]:
    """Both ranks' rows for one wrapping of the Llama-style model."""
    results = mp.Manager().dict()
    # A fixed mmap threshold: freed tensors go back to the system, so resident memory follows live tensors
    # (glibc's adaptive threshold would keep the freed unsharded weights resident, hiding FSDP2's saving).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**16)
    mp.start_processes(
        _memory_rank, args=(free_port(), mode, variant, results), nprocs=2, start_method="spawn"
    )
    return [results[rank] for rank in range(2)]


def throughput(steps: int, report: dict) -> None:
    """minilm samples per second with 1 and 2 processes at the same global batch, and their ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            row = train_minilm(processes, steps, SST2, Path(tmp) / f"p{processes}")
            report["throughput"].append(row)
            print(f"minilm, {processes} process(es): {row['samples_per_s']:.1f} samples/s", flush=True)
    one, two = report["throughput"]
    report["throughput_ratio_2_over_1"] = round(two["samples_per_s"] / one["samples_per_s"], 3)
    print(f"2 processes / 1 process: {report['throughput_ratio_2_over_1']:.2f}x")


def memory(report: dict) -> None:
    """Per-rank bytes and peak memory of the Llama-style model under DDP and FSDP2, dense and NF4 base."""
    rows = {}
    for mode, variant in (("ddp", "lora"), ("fsdp", "lora"), ("ddp", "qlora"), ("fsdp", "qlora")):
        rows[mode, variant] = memory_run(mode, variant)
        report["memory"] += rows[mode, variant]
        print(json.dumps(rows[mode, variant][0]), flush=True)
    for variant in ("lora", "qlora"):
        ddp, fsdp = rows["ddp", variant][0], rows["fsdp", variant][0]
        for what in ("base_mib_per_rank", "peak_rss_mib_training"):
            ratio = round(fsdp[what] / ddp[what], 3)
            report[f"{variant}_{what}_fsdp_over_ddp"] = ratio
            print(f"{variant}, {what}, FSDP2 / DDP: {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/distributed.json")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of the throughput runs")
    parser.add_argument("--only", choices=["throughput", "memory"], help="run one of the two parts")
    args = parser.parse_args()
    report: dict = {"throughput": [], "memory": []}
    if args.only != "memory":
        throughput(args.steps, report)
    if args.only != "throughput":
        memory(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
