"""Side-by-side report of finished runs: a markdown table and a plot of quality against the costs.

Classification runs are read by test accuracy; causal-LM runs by the completion loss on the evaluation data
(and its perplexity), with exact match of the generated final answers where the bench evaluated generation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def collect(out: Path, names: list[str]) -> list[dict[str, Any]]:
    """Each finished run's ``metrics.json`` and its task (from ``job.json``), with its generation evaluation
    (``eval/metrics.json``) under ``generation``; a run that only evaluated (the base model) has that alone.
    Where a run was evaluated by generation, its loss and perplexity are that evaluation's, so every row of
    the table is read on the same rows (``generate: limit`` may take fewer than training evaluated)."""
    rows = []
    for name in names:
        path, evaluated = out / name / "metrics.json", out / name / "eval" / "metrics.json"
        row: dict[str, Any] = {"name": name, **json.loads(path.read_text())} if path.exists() else {}
        if row and (out / name / "job.json").exists():
            row["task"] = json.loads((out / name / "job.json").read_text()).get("task")
        if evaluated.exists():
            generation = json.loads(evaluated.read_text())
            row = row or {"name": name, "task": "causal-lm"}
            row["metrics"] = {k: generation[k] for k in ("loss", "perplexity")}
            row["generation"] = generation
        if row:
            rows.append(row)
    return rows


def _causal(rows: list[dict[str, Any]]) -> bool:
    return any(r.get("task") == "causal-lm" or "perplexity" in r["metrics"] for r in rows)


def _last_cell(name: str, notes: dict[str, str], failed: list[str]) -> str:
    """A finished run's note, and that its evaluation failed where it did."""
    parts = [notes.get(name, ""), f"evaluation failed: see {name}.log" if name in failed else ""]
    return "; ".join(part for part in parts if part)


def markdown(rows: list[dict[str, Any]], notes: dict[str, str], failed: list[str] = ()) -> str:
    shown = {r["name"] for r in rows}
    if _causal(rows):
        return _causal_markdown(rows, notes, failed, shown)
    lines = [
        "| run | test accuracy | trainable params | train seconds | peak memory MB | beyond the budget |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        acc = f"{m['accuracy']:.4f}" if "accuracy" in m else "not evaluated"  # a run without eval data
        memory = f"{r['peak_memory_mb']:.0f}" if r.get("peak_memory_mb") else "not recorded"
        lines.append(
            f"| {r['name']} | {acc} | {r['trainable']:,} | {r['seconds']:.0f} | {memory} | "
            f"{_last_cell(r['name'], notes, failed)} |"
        )
    lines += [
        f"| {name} | failed: see {name}.log | | | | {notes.get(name, '')} |"
        for name in failed
        if name not in shown
    ]
    return "\n".join(lines) + "\n"


def _causal_markdown(
    rows: list[dict[str, Any]], notes: dict[str, str], failed: list[str], shown: set[str]
) -> str:
    lines = [
        "| run | dev loss | perplexity | exact match | trainable params | tokens/s | train seconds "
        "| peak memory MB | beyond the budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, g = r["metrics"], r.get("generation")
        exact = f"{g['exact_match']:.4f} ({g['exact_match_correct']}/{g['exact_match_total']})" if g else ""
        trained = "trainable" in r
        loss = f"{m['loss']:.4f}" if "loss" in m else "not evaluated"  # a run without eval_data
        perplexity = f"{m['perplexity']:.3f}" if "perplexity" in m else ""
        cells = [
            r["name"], loss, perplexity, exact,
            f"{r['trainable']:,}" if trained else "0",
            f"{r['extra'].get('tokens_per_second', 0):.0f}" if trained else "",
            f"{r['seconds']:.0f}" if trained else "",
            f"{r['peak_memory_mb']:.0f}" if trained and r.get("peak_memory_mb") else "",
            _last_cell(r["name"], notes, failed),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        f"| {name} | failed: see {name}.log | | | | | | | {notes.get(name, '')} |"
        for name in failed
        if name not in shown
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy against trainable parameters, train seconds and peak memory; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from matplotlib.ticker import NullFormatter

    colours = plt.get_cmap("tab20")
    metric, ylabel = ("loss", "dev completion loss") if _causal(rows) else ("accuracy", "test accuracy")
    done = [r for r in rows if r["metrics"].get(metric) is not None and r.get("trainable")]
    axes_x = [("trainable", "trainable parameters", True), ("seconds", "train seconds", False)]
    if any(r.get("peak_memory_mb") for r in done):
        axes_x.append(("peak_memory_mb", "peak memory MB", False))
    fig, axes = plt.subplots(1, len(axes_x), figsize=(5 * len(axes_x), 4.2), sharey=True)
    for ax, (key, label, log) in zip(axes, axes_x, strict=True):
        for i, r in enumerate(done):
            if r.get(key):  # one colour per run across the panels
                ax.scatter(r[key], r["metrics"][metric], s=36, color=colours(i % 20))
                ax.annotate(r["name"], (r[key], r["metrics"][metric]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)  # fmt: skip
        ax.set_xscale("log" if log else "linear")
        ax.xaxis.set_minor_formatter(NullFormatter())  # only the decades are labelled
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    fig.suptitle("lorakit variants, same budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(out: Path, names: list[str], notes: dict[str, str], failed: list[str] = ()) -> str:
    rows = collect(out, names)
    table = markdown(rows, notes, failed)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    if plot(rows, out / "results.png"):
        print(f"[bench] plot: {out / 'results.png'}")
    print(table)
    return table
