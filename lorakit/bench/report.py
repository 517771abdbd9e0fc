"""Side-by-side report of finished runs: a markdown table and a plot (accuracy vs trainable parameters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def collect(out: Path, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        path = out / name / "metrics.json"
        if path.exists():
            rows.append({"name": name, **json.loads(path.read_text())})
    return rows


def markdown(rows: list[dict[str, Any]], notes: dict[str, str]) -> str:
    lines = [
        "| run | test accuracy | trainable params | train seconds | peak memory MB | beyond the budget |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = r["metrics"].get("accuracy", float("nan"))
        memory = f"{r['peak_memory_mb']:.0f}" if r.get("peak_memory_mb") else "not recorded"
        lines.append(
            f"| {r['name']} | {acc:.4f} | {r['trainable']:,} | {r['seconds']:.0f} | {memory} | "
            f"{notes.get(r['name'], '')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy against trainable parameters (log scale); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        acc = r["metrics"].get("accuracy")
        if acc is None:
            continue
        ax.scatter(r["trainable"], acc, s=40)
        ax.annotate(r["name"], (r["trainable"], acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title("lorakit variants, same budget")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(out: Path, names: list[str], notes: dict[str, str]) -> str:
    rows = collect(out, names)
    table = markdown(rows, notes)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    if plot(rows, out / "results.png"):
        print(f"[bench] plot: {out / 'results.png'}")
    print(table)
    return table
