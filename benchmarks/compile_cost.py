"""``torch.compile`` on every variant PEFT also has: does the adapted model compile, with ``fullgraph=True``,
what breaks the graph, how long compiling takes, and the compiled training step's time against eager.

    python benchmarks/compile_cost.py --out runs/compile_cost.json

The model is a small BERT classifier configured here (hidden 256, 2 layers, random weights; batch 16 x 64) so
that compiling every variant stays within minutes on a CPU. One thread; eager and compiled steps interleave.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config
from torch import nn

import lorakit

VARIANTS = {
    "lora": {"rank": 8, "alpha": 16},
    "dora": {"rank": 8, "alpha": 16},
    "loha": {"rank": 8, "alpha": 16},
    "lokr": {"rank": 8, "alpha": 16},
    "vera": {"rank": 64},
    "adalora": {"init_r": 12, "target_r": 8, "total_steps": 1000},
    "lora_fa": {"rank": 8, "alpha": 16},
    "lora_plus": {"rank": 8, "alpha": 16},
}
TARGETS = ["query", "key", "value", "dense"]
FULL = "full fine-tuning"  # the base model with every weight trained, no adapter


def small_bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=1024, num_labels=2, attn_implementation="sdpa")  # fmt: skip
    model = BertForSequenceClassification(config)
    ids = torch.randint(1, 1000, (16, 64), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 2}


def step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def graph_breaks(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    """Dynamo's graph breaks in the training forward, with their reasons (deduplicated)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**batch)
    reasons = sorted({str(b.reason).splitlines()[0][:200] for b in explained.break_reasons})
    return explained.graph_break_count, reasons


def fullgraph_compiles(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[bool, str]:
    torch._dynamo.reset()
    try:
        torch.compile(model, fullgraph=True, backend="eager")(**batch).loss.backward()
    except Exception as err:  # the error is the finding: report it
        return False, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return True, ""


def _groups(model: nn.Module) -> list[dict]:
    if lorakit.adapted_layers(model):
        return lorakit.param_groups(model, 1e-5)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-5}]


def measure(variant: str, dropout: float, repeats: int) -> dict[str, object]:
    base, batch = small_bert()
    if variant == FULL:  # the yardstick: what the compiler does for the plain model
        eager = base.requires_grad_(True)
    else:
        config = {"dropout": dropout, **VARIANTS[variant]}
        eager = lorakit.apply(base, variant, targets=TARGETS, train_modules=["classifier"], **config)
    compiled_model = copy.deepcopy(eager).train()
    eager.train()
    breaks, reasons = graph_breaks(compiled_model, batch)
    fullgraph, error = fullgraph_compiles(compiled_model, batch)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model)
    opt_e, opt_c = (torch.optim.AdamW(_groups(m)) for m in (eager, compiled_model))
    compile_s = step(compiled, opt_c, batch)  # the first step compiles forward and backward
    step(eager, opt_e, batch)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):
        times["eager"].append(step(eager, opt_e, batch))
        times["compiled"].append(step(compiled, opt_c, batch))
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {
        "variant": variant, "dropout": dropout, "graph_breaks": breaks, "break_reasons": reasons,
        "fullgraph": fullgraph, "fullgraph_error": error, "first_step_seconds": compile_s,
        "eager_step_seconds": eager_s, "compiled_step_seconds": compiled_s, "ratio": compiled_s / eager_s,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compile_cost.json"))
    parser.add_argument("--variants", nargs="+", default=[FULL, *VARIANTS])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--inductor-random", action="store_true",
        help="let inductor generate dropout's random numbers (default: ATen's, fallback_random)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    # On a CPU inductor's own random-number kernels are slower than ATen's: with them even the plain model's
    # compiled step was 1.09x eager here, with ATen's (fallback_random) 0.98x.
    torch._inductor.config.fallback_random = not args.inductor_random
    rows = []
    print("| variant | dropout | fullgraph=True | graph breaks | first step s | compiled / eager step |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants:
        for dropout in args.dropout if variant != FULL else [0.0]:
            r = measure(variant, dropout, args.repeats)
            rows.append(r)
            print(
                f"| {variant} | {dropout} | {'yes' if r['fullgraph'] else 'no'} | {r['graph_breaks']} | "
                f"{r['first_step_seconds']:.1f} | {r['ratio']:.2f}x |",
                flush=True,
            )
    for r in rows:
        if r["break_reasons"] or r["fullgraph_error"]:
            print(f"{r['variant']} (dropout {r['dropout']}): {r['fullgraph_error']}; {r['break_reasons']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": 1, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
