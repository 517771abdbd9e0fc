"""Cost of one training step: lorakit LoRA vs PEFT LoRA vs full fine-tuning, in one process on one machine.

Memory is counted exactly rather than sampled: parameters + gradients + optimizer state + the tensors autograd
saves for backward (measured with ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once).
Time is the median over interleaved repeats, so machine load affects every contender alike.

    python benchmarks/step_cost.py --out runs/step_cost.json

Reference budget: minilm, batch 32, max length 64, rank 8, alpha 16, dropout 0.05,
targets query/key/value/dense.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import lorakit
from lorakit.train.data import BatchSampler, read_rows, tokenize_classification
from lorakit.train.models import load_model

TARGETS = ["query", "key", "value", "dense"]
SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


def full_batch(tokenizer, batch_size: int, max_length: int) -> dict[str, torch.Tensor]:
    """A batch padded to ``max_length`` (the worst case of the reference budget)."""
    rows = read_rows(str(SST2)) if SST2.exists() else read_rows("demo")
    data = tokenize_classification(rows[:2000], tokenizer, "sentence", "label", max_length, "sst2")
    batch = next(BatchSampler(data, batch_size, seed=0))
    pad = max_length - batch["input_ids"].shape[1]
    if pad > 0:
        batch["input_ids"] = nn.functional.pad(batch["input_ids"], (0, pad), value=tokenizer.pad_token_id)
        batch["attention_mask"] = nn.functional.pad(batch["attention_mask"], (0, pad), value=0)
    return batch


def contenders(base: nn.Module) -> dict[str, Callable[[], nn.Module]]:
    def ours(dropout: float = 0.05) -> nn.Module:
        model = copy.deepcopy(base)
        return lorakit.apply(
            model, "lora", targets=TARGETS, train_modules=["classifier"], rank=8, alpha=16, dropout=dropout
        )

    def peft_lora() -> nn.Module:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, modules_to_save=["classifier"]
        )
        return get_peft_model(copy.deepcopy(base), config)

    def full() -> nn.Module:
        return copy.deepcopy(base).requires_grad_(True)

    return {
        "full fine-tuning": full,
        "peft lora": peft_lora,
        "lorakit lora": ours,
        "lorakit lora, bf16 autocast": ours,
        # what the adapter-input dropout costs (not the budget: the budget's dropout is 0.05)
        "lorakit lora, dropout 0": lambda: ours(dropout=0.0),
    }


def autocast(name: str) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in name)


def saved_activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor], name: str) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(name):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in storages.items() if ptr not in params)  # weights are not activations


def state_bytes(model: nn.Module) -> int:
    """Parameters, plus gradient and two AdamW moments for each trainable one."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(3 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def time_steps(model: nn.Module, batch: dict[str, torch.Tensor], steps: int, name: str) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with autocast(name):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/step_cost.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_model("minilm", "classification")
    batch = full_batch(tokenizer, 32, 64)
    models = {name: build().train() for name, build in contenders(base).items()}
    for name, model in models.items():
        time_steps(model, batch, 1, name)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name] += time_steps(model, batch, args.steps, name)
    rows = {}
    for name, model in models.items():
        act = saved_activation_bytes(model, batch, name)
        rows[name] = {
            "step_seconds": statistics.median(times[name]),
            "activation_mb": act / 2**20,
            "state_mb": state_bytes(model) / 2**20,
            "memory_mb": (act + state_bytes(model)) / 2**20,
        }
    ref = rows["full fine-tuning"]
    print("| contender | step s | vs full FT | memory MB (states + activations) | vs full FT |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        r["time_ratio"] = r["step_seconds"] / ref["step_seconds"]
        r["memory_ratio"] = r["memory_mb"] / ref["memory_mb"]
        print(
            f"| {name} | {r['step_seconds']:.3f} | {r['time_ratio']:.2f}x | {r['memory_mb']:.0f} "
            f"({r['state_mb']:.0f} + {r['activation_mb']:.0f}) | {r['memory_ratio']:.2f}x |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
