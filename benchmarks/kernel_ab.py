"""In-process A/B of the kernels: one variant's training step with some kernels held back, interleaved.

Each arm is the registry with the named kernels removed (``all``: every kernel, i.e. the plain forms). One
model steps through every arm in each repeat, the arms' order rotating and reversing from repeat to repeat
(both orders), so machine load and the model's slow drift hit all arms alike. Reported per arm: the median
step, and the median (with quartiles) of the per-repeat ratios against the first arm, the robust number on a
loaded machine.

    python benchmarks/kernel_ab.py --variant lora --arms - lowrank_positions lowrank_positions,gap_mask \\
        --repeats 20 --out runs/kernel_ab_lora.json

``minilm``, batch 32 padded to 64 tokens, rank 8, alpha 16, dropout 0.05, targets query/key/value/dense: the
step-cost benchmark's setting (``benchmarks/step_cost.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import lorakit
from lorakit.kernels import KERNELS

sys.path.insert(0, str(Path(__file__).parent))
import step_cost  # noqa: E402  (the benchmark next to this one)


@contextlib.contextmanager
def held_back(names: list[str]) -> Iterator[None]:
    """The registry without ``names`` (``all``: every kernel)."""
    registered = dict(KERNELS)
    KERNELS.clear()
    KERNELS.update({n: k for n, k in registered.items() if n not in names and "all" not in names})
    try:
        yield
    finally:
        KERNELS.clear()
        KERNELS.update(registered)


def measure(variant: str, arms: list[list[str]], repeats: int) -> dict[str, dict]:
    torch.manual_seed(0)
    base, tokenizer = step_cost.load_model("minilm", "classification")
    batch = step_cost.minilm_batch(tokenizer, 32, 64)
    config = {"rank": 8, "alpha": 16, "dropout": 0.05}
    contender = step_cost.ours(base, variant, step_cost.MINILM_TARGETS, "classifier", **config)
    contender.model.train()
    labels = [",".join(arm) or "-" for arm in arms]
    for arm in arms:  # warm-up
        with held_back(arm):
            contender.train_step(batch)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(repeats):
        order = list(range(len(arms)))
        order = order[i % len(arms) :] + order[: i % len(arms)]
        order = order[::-1] if (i // len(arms)) % 2 else order
        for j in order:
            with held_back(arms[j]):
                start = time.perf_counter()
                contender.train_step(batch)
                times[labels[j]].append(time.perf_counter() - start)
    first = times[labels[0]]
    result = {}
    for label in labels:
        ratios = sorted(a / b for a, b in zip(times[label], first, strict=True))
        quartiles = [ratios[round(f * (len(ratios) - 1))] for f in (0.25, 0.75)]
        result[label] = {
            "median_step_s": statistics.median(times[label]),
            "ratio_to_first_median": statistics.median(ratios),
            "ratio_to_first_quartiles": quartiles,
            "steps_s": times[label],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="lora", choices=list(lorakit.VARIANTS))
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["-", "all"],
        help="kernels held back per arm, comma-separated ('-': none; 'all')",
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/kernel_ab.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arms = [[n for n in arm.split(",") if n and n != "-"] for arm in args.arms]
    unknown = sorted({n for arm in arms for n in arm} - set(KERNELS) - {"all"})
    if unknown:
        raise SystemExit(f"unknown kernels {unknown}; registered: {', '.join(KERNELS)}")
    rows = measure(args.variant, arms, args.repeats)
    for label, row in rows.items():
        q, ratio = row["ratio_to_first_quartiles"], row["ratio_to_first_median"]
        print(
            f"{args.variant} without [{label}]: {row['median_step_s']:.3f} s, {ratio:.3f}x the first arm "
            f"(quartiles {q[0]:.3f}-{q[1]:.3f})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = {"variant": args.variant, "threads": args.threads, "repeats": args.repeats}
    args.out.write_text(json.dumps(info | {"arms": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
