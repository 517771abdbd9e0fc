"""Run a list of fine-tuning jobs one after another, each in its own process, and report them side by side.

A bench file is YAML: shared ``defaults`` (any ``lorakit train`` setting) and ``runs``, each a name plus the
settings it changes. Finished runs (with ``metrics.json``) are skipped, so an interrupted bench resumes::

    python -m lorakit.bench.run benchmarks/sst2.yaml --out runs/bench

Each run is ``lorakit train`` in a fresh process, so its peak memory is its own. ``lorakit bench`` is the same
command.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from lorakit.bench.report import write_report


def load_bench(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    spec = yaml.safe_load(path.read_text()) or {}
    runs = spec.get("runs") or []
    if not runs or any("name" not in r for r in runs):
        raise ValueError(f"{path}: 'runs' must be a list of mappings, each with a 'name'")
    return spec.get("defaults") or {}, runs


def run_one(name: str, settings: dict[str, Any], out: Path) -> int:
    """``lorakit train`` with ``settings`` into ``out/name``; returns its exit code."""
    run_dir = out / name
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(settings, f)
    cmd = [
        sys.executable,
        "-m",
        "lorakit.cli",
        "train",
        "--config",
        f.name,
        "--output-dir",
        str(run_dir),
        "--overwrite",
    ]
    print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
    try:
        with (out / f"{name}.log").open("w") as log:
            return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    finally:
        os.remove(f.name)


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bench", type=Path, help="bench YAML file: 'defaults' and a list of 'runs'")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench"), help="one directory per run, and the report"
    )
    parser.add_argument("--only", help="comma-separated run names to run (default: all)")


def run_bench(bench: Path, out: Path, only: str | None = None) -> int:
    """Run the bench's unfinished runs in order, then report every finished one; 1 if any run failed."""
    defaults, runs = load_bench(bench)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(only.split(",")) if only else None
    unknown = sorted((wanted or set()) - {r["name"] for r in runs})
    if unknown:
        raise ValueError(f"--only names {unknown} are not runs of {bench}")
    failed = []
    for run in runs:
        name = run["name"]
        if (wanted and name not in wanted) or (out / name / "metrics.json").exists():
            continue
        settings = {**defaults, **{k: v for k, v in run.items() if k not in ("name", "note")}}
        code = run_one(name, settings, out)
        print(f"[bench] {name}: {'done' if code == 0 else f'failed ({code}), see {name}.log'}", flush=True)
        if code != 0:
            failed.append(name)
    notes = {r["name"]: r.get("note", "") for r in runs}
    write_report(out, [r["name"] for r in runs], notes, failed=failed)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run and compare fine-tuning jobs.")
    add_bench_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_bench(args.bench, args.out, args.only)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
