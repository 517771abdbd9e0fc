"""Final rank per adapted layer of a saved adapter, as a table and a heatmap (layers x module names).

Each variant reads its own rank from a layer's saved tensors (``Variant.saved_rank``): AdaLoRA's saved adapter
holds only live triplets, so its rank is the length of ``E``; the others report their configured rank.
Tensors stored once for several layers (VeRA's projections, LoRA-drop's shared pairs) count for each::

    python -m lorakit.bench.ranks runs/bench/adalora --out runs/bench/adalora_ranks.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from safetensors import safe_open

from lorakit.adapters.io import WEIGHTS_FILE, read_meta
from lorakit.variants import get_variant


def saved_ranks(adapter_dir: str | Path) -> dict[str, int]:
    """Rank per adapted layer of the adapter saved in ``adapter_dir``."""
    meta = read_meta(adapter_dir)
    variant = get_variant(meta["variant"])
    config = variant.config_class.from_dict(meta["config"], meta["variant"])
    with safe_open(str(Path(adapter_dir) / WEIGHTS_FILE), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    shapes |= {alias: shapes[key] for alias, key in meta.get("tied", {}).items()}
    ranks = {}
    for target in meta["targets"]:
        prefix = target + "."
        own = {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}
        ranks[target] = variant.saved_rank(config, own)
    return ranks


def grid(ranks: dict[str, int]) -> tuple[list[str], list[str], list[list[int]]]:
    """Rows = block index (the number in the layer name), columns = the rest of the name."""
    cells: dict[tuple[str, str], int] = {}
    for name, rank in ranks.items():
        match = re.search(r"\.(\d+)\.", name)
        row, col = (match.group(1), name[match.end() :]) if match else ("-", name)
        cells[(row, col)] = rank
    rows = sorted({r for r, _ in cells}, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0))
    cols = sorted({c for _, c in cells})
    return rows, cols, [[cells.get((r, c), 0) for c in cols] for r in rows]


def markdown(ranks: dict[str, int]) -> str:
    rows, cols, values = grid(ranks)
    lines = ["| block | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [
        f"| {r} | " + " | ".join(str(v) for v in vals) + " |" for r, vals in zip(rows, values, strict=True)
    ]
    return "\n".join(lines) + "\n"


def heatmap(ranks: dict[str, int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols, values = grid(ranks)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.45 * len(rows)))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, vals in enumerate(values):
        for j, v in enumerate(vals):
            ax.text(j, i, str(v), ha="center", va="center", color="white", fontsize=7)
    ax.set_ylabel("block")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Final rank per layer of a saved adapter.")
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--out", type=Path, help="heatmap PNG path")
    args = parser.parse_args(argv)
    ranks = saved_ranks(args.adapter)
    print(markdown(ranks))
    print(f"total rank {sum(ranks.values())} over {len(ranks)} layers")
    if args.out:
        heatmap(ranks, args.out, f"final rank per layer: {read_meta(args.adapter)['variant']}")
        print(f"heatmap: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
