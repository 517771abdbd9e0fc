"""Run a list of fine-tuning jobs one after another, each in its own process, and report them side by side.

A bench file is YAML: shared ``defaults`` (any ``lorakit train`` setting) and ``runs``, each a name plus the
settings it changes (a run's setting replaces the defaults', in a section or not); all runs are of one task.
Finished runs (with ``metrics.json``) are skipped, so an interrupted bench resumes; the
settings each run trained (and was evaluated) with are kept beside it (``--out/.NAME.config.yaml``), and a
finished run the bench file now sets otherwise is refused by name rather than reported as if it were new; an
interrupted run with unchanged settings continues from its checkpoint (``checkpoint_every``)::

    python -m lorakit.bench.run benchmarks/sst2.yaml --out runs/bench

Each run is ``lorakit train`` in a fresh process, so its peak memory is its own. ``lorakit bench`` is the same
command. For a causal LM, a ``generate`` mapping (flags of ``lorakit eval --generate``: ``max_new_tokens``,
``batch_size``, ``answer_pattern``, ``limit``, ``generate_limit``) adds that evaluation after each run (in
its own process, into ``NAME/eval``), and a run with ``train: false`` evaluates the base model as it is, the
row every tuned one is read against.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import lorakit.common.dirlock as dirlock
from lorakit.adapters.io import CONFIG_FILE
from lorakit.bench.report import write_report
from lorakit.common.errors import LorakitError
from lorakit.eval.scoring import compile_pattern
from lorakit.jobs.cliargs import job_from_values, job_values, load_yaml
from lorakit.jobs.models import infer_task
from lorakit.jobs.rundir import EVAL_DIR

# A run name becomes a directory and a log file directly inside --out: one plain path component.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")
REPORT_NAMES = {"results", "results.md", "results.json", "results.png"}  # the report's files
MARKER = ".lorakit-bench"  # in --out: a bench writes there, so the files named as its own are its own
BENCH_SETS = ("output_dir", "overwrite", "resume")  # where each run goes is the bench's to decide
# flags of `lorakit eval --generate` a bench file may set
GENERATE_FLAGS = ("max_new_tokens", "batch_size", "answer_pattern", "limit", "generate_limit")
BENCH_KEYS = ("defaults", "runs", "generate")  # a bench file's own keys
MAX_NAME = 100  # characters of a run name: its directory, log and records must fit a file name
# What evaluating a base model as it is reads (`lorakit eval --model`): all a `train: false` run may set.
BASE_SETTINGS = ("model", "eval_data", "prompt_column", "response_column", "messages_column", "max_length",
                 "chat_template")  # fmt: skip


class BenchError(LorakitError):
    """A bench file is malformed or would write outside --out; the message names the fix."""


@dataclass
class Bench:
    """A bench file: shared settings, the runs, and the generation evaluation after each (None: none)."""

    defaults: dict[str, Any]
    runs: list[dict[str, Any]]
    generate: dict[str, Any] | None = None
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # each run's, sections flattened

    def recorded(self, run: dict[str, Any]) -> dict[str, Any]:
        """What the bench keeps of run ``run``'s settings (see :func:`record`): all it trains with, or for a
        run that does not train, what its evaluation reads, and that it does not train."""
        settings = self.settings[run["name"]]
        if trains(run):
            return settings
        return {**{k: v for k, v in settings.items() if k in BASE_SETTINGS}, "train": False}


def load_bench(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The bench's defaults and runs, with every run name checked (see :data:`RUN_NAME`)."""
    bench = read_bench(path)
    return bench.defaults, bench.runs


def read_bench(path: Path) -> Bench:
    """The bench file, checked: run names (see :data:`RUN_NAME`), settings the bench fixes, generation."""
    try:
        spec = load_yaml(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise BenchError(f"cannot read bench file {path}: {' '.join(str(err).split())}") from None
    unknown = sorted(set(spec) - set(BENCH_KEYS), key=str) if isinstance(spec, dict) else []
    if unknown:
        raise BenchError(
            f"{path}: unknown key(s) {unknown}; a bench file has {', '.join(BENCH_KEYS)} (settings shared by "
            "every run go in defaults)"
        )
    runs = spec.get("runs") if isinstance(spec, dict) else None
    defaults = (spec.get("defaults") if isinstance(spec, dict) else None) or {}
    if (
        not runs
        or not isinstance(runs, list)
        or any(not isinstance(r, dict) or "name" not in r for r in runs)
    ):
        raise BenchError(f"{path}: 'runs' must be a list of mappings, each with a 'name'")
    if not isinstance(defaults, dict):
        raise BenchError(f"{path}: 'defaults' must be a mapping of `lorakit train` settings")
    generation = spec.get("generate")
    if generation is not None and (
        not isinstance(generation, dict) or sorted(set(generation) - set(GENERATE_FLAGS))
    ):
        raise BenchError(f"{path}: 'generate' must be a mapping of {', '.join(GENERATE_FLAGS)}")
    names = [r["name"] for r in runs]
    for name in names:
        if (
            not isinstance(name, str)
            or not RUN_NAME.fullmatch(name)
            or len(name) > MAX_NAME
            or ".." in name
            or name in REPORT_NAMES
            or name.endswith(".log")  # another run's log file
        ):
            raise BenchError(
                f"{path}: run name {name!r} is not allowed; a name is one directory inside --out: letters, "
                f"digits and _ . + = -, at most {MAX_NAME} characters (no path separators, no leading dot, "
                "no '..', not 'results' or 'results.md/json/png', not ending in '.log': the bench writes "
                "those files there)"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BenchError(f"{path}: run names {repeated} are used more than once; give each run its own name")
    for where, settings in [("defaults", defaults), *((f"run {r['name']}", r) for r in runs)]:
        fixed = [key for key in BENCH_SETS if key in settings]
        if fixed:
            raise BenchError(f"{path}: {where} sets {fixed}; the bench writes each run to --out/NAME itself")
    for run in runs:
        train = run.get("train", True)
        if not isinstance(train, (bool, dict)):  # "false" as text would train
            raise BenchError(
                f"{path}: run {run['name']}: train must be true or false (or a section of training "
                f"settings), not {train!r}"
            )
    if generation is not None:
        check_generation(path, generation)
    # Every setting of every run read and range-checked before the first run starts; reading names where
    # a setting is (the defaults, or a run), a value's check names the run. A run's setting replaces the
    # defaults', whether either is written in a section or not.
    try:
        shared = job_values(defaults, "defaults")
        own = {r["name"]: job_values(own_settings(r), f"run {r['name']}") for r in runs}
    except LorakitError as err:
        raise BenchError(f"{path}: {err}") from None
    flat = {name: {**shared, **settings} for name, settings in own.items()}
    for run in runs:
        name = run["name"]
        if not trains(run):
            check_base_run(path, name, own[name], flat[name], generation)
        try:
            job_from_values(flat[name])
        except LorakitError as err:
            raise BenchError(f"{path}: run {name}: {err}") from None
    check_one_task(path, flat)
    return Bench(defaults, runs, generation, flat)


def own_settings(run: dict[str, Any]) -> dict[str, Any]:
    """A run's ``lorakit train`` settings as written in it (``train`` is the bench's switch unless it is a
    section of training settings)."""
    bench_keys = ("name", "note") if isinstance(run.get("train"), dict) else ("name", "note", "train")
    return {k: v for k, v in run.items() if k not in bench_keys}


def check_base_run(
    path: Path, name: str, own: dict[str, Any], settings: dict[str, Any], generation: Any
) -> None:
    """A run that does not train evaluates the base model by generating, on the bench's ``eval_data``, and
    reads only :data:`BASE_SETTINGS`: one of its ``own`` settings (the run's, flattened) that evaluation would
    not read is refused."""
    if generation is None:
        raise BenchError(
            f"{path}: run {name} does not train, and the bench evaluates a base model only by "
            "generating: add a 'generate' mapping, or drop the run"
        )
    if not settings.get("eval_data"):
        raise BenchError(
            f"{path}: run {name} does not train, and evaluates the base model on the bench's eval_data, "
            "which is not set: set eval_data (in defaults or the run)"
        )
    ignored = sorted(k for k in own if k not in BASE_SETTINGS)
    if ignored:
        raise BenchError(
            f"{path}: run {name} does not train, so {', '.join(ignored)} would not apply to it (its "
            f"evaluation reads only {', '.join(BASE_SETTINGS)}); drop them, or let the run train"
        )


def check_one_task(path: Path, settings: dict[str, dict[str, Any]]) -> None:
    """Refuse runs of different tasks in one bench: its table and plot read every run by one metric
    (accuracy, or the completion loss). A model that cannot be read is left to its run to report."""
    tasks: dict[str, list[str]] = {}
    known: dict[str, str | None] = {}  # each model's task, read once
    for name, values in settings.items():
        model = str(values.get("model", "minilm"))
        if not values.get("task") and model not in known:
            try:
                known[model] = infer_task(model)
            except LorakitError:
                known[model] = None
        task = values.get("task") or known[model]
        if task is not None:
            tasks.setdefault(task, []).append(name)
    if len(tasks) > 1:
        shown = "; ".join(f"{task}: {', '.join(names)}" for task, names in tasks.items())
        raise BenchError(
            f"{path}: the runs are of different tasks ({shown}); a bench compares runs of one task by one "
            "metric: put each task's runs in a bench file of their own"
        )


def check_generation(path: Path, generation: dict[str, Any]) -> None:
    """Refuse a ``generate`` value that ``lorakit eval --generate`` would refuse, before any run trains: a
    count that is no whole number of at least 1, an answer pattern that is no usable regular expression."""
    for key, value in generation.items():
        if key == "answer_pattern":
            if not isinstance(value, str):
                raise BenchError(f"{path}: generate: answer_pattern must be text (a regular expression)")
            try:
                compile_pattern(value)
            except LorakitError as err:
                raise BenchError(f"{path}: generate: {err}") from None
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BenchError(f"{path}: generate: {key} must be a whole number of at least 1, not {value!r}")


def record(out: Path, name: str, step: str) -> Path:
    """Where the bench keeps the settings run ``name``'s ``step`` (``config``: training, ``generate``: its
    evaluation) ran with, to tell a finished step from one the bench file now sets otherwise."""
    return out / f".{name}.{step}.yaml"


def changed(path: Path, now: dict[str, Any], job: bool = True) -> list[str]:
    """The settings that differ between ``now`` and those recorded at ``path`` (none where nothing was
    recorded, as by an older bench); ``job``: a run's settings (not its ``generate`` mapping), read as a bench
    reads them now (sections flattened, text targets split)."""
    if not path.exists():
        return []
    before = yaml.safe_load(path.read_text()) or {}
    if isinstance(before, dict) and job:
        marker = {"train": before.pop("train")} if before.get("train") is False else {}
        try:
            before = {**job_values(before, str(path)), **marker}
        except LorakitError:  # not settings as lorakit writes them: compared as they are
            before = {**before, **marker}
    return sorted((k for k in {*before, *now} if before.get(k) != now.get(k)), key=str)


def evaluate_one(name: str, settings: dict[str, Any], generation: dict[str, Any], out: Path) -> int:
    """``lorakit eval --generate`` of run ``name`` (its adapter, or with ``train: false`` the base model)
    into ``out/name/eval``, its output appended to the run's log; returns its exit code."""
    record(out, name, "generate").write_text(yaml.safe_dump(generation))
    cmd = [sys.executable, "-m", "lorakit.cli", "eval", "--generate", "--overwrite"]
    cmd += ["--out", str(out / name / EVAL_DIR)]
    if trains(settings):
        cmd += ["--adapter", str(out / name)]
    else:  # the base model as it is, on the job's evaluation data with the job's columns
        cmd += ["--model", str(settings.get("model", "minilm")), "--data", str(settings.get("eval_data"))]
        for key in (k for k in BASE_SETTINGS if k not in ("model", "eval_data")):
            if key in settings:
                cmd += [f"--{key.replace('_', '-')}", str(settings[key])]
    for key, value in generation.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
    with (out / f"{name}.log").open("a") as log:
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


def trains(run: dict[str, Any]) -> bool:
    """Whether the run trains (``train: false``: the base model, evaluated as it is)."""
    return run.get("train", True) is not False


def run_one(name: str, settings: dict[str, Any], out: Path) -> int:
    """``lorakit train`` with ``settings`` into ``out/name``; returns its exit code. An interrupted attempt
    with the same settings continues from its checkpoint (``--checkpoint-every``), its log with it."""
    run_dir, log_path = out / name, out / f"{name}.log"
    config = record(out, name, "config")
    again = config.exists() and not changed(config, settings)
    config.write_text(yaml.safe_dump(settings))
    cmd = [sys.executable, "-m", "lorakit.cli", "train", "--config", str(config)]
    cmd += ["--output-dir", str(run_dir), "--overwrite", *(["--resume", "auto"] if again else [])]
    print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
    with log_path.open("a" if again else "w") as log:  # the config stays: what the run trained with
        return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


def _run(spec: Bench, run: dict[str, Any], out: Path) -> bool:
    """Train ``run`` unless it is finished (or does not train), then evaluate it with generation if the
    bench asks and it has not been; False if a step failed."""
    name, generation = run["name"], spec.generate
    settings = spec.settings[name]
    if trains(run) and not (out / name / "metrics.json").exists():
        if (out / name / CONFIG_FILE).exists() and not (out / f"{name}.log").exists():
            # a run's log marks its directory as this bench's own; this adapter was put there otherwise
            print(f"[bench] {name}: {out / name} holds an adapter this bench did not train; not replacing it")
            return False
        code = run_one(name, settings, out)
        print(f"[bench] {name}: {'done' if code == 0 else f'failed ({code}), see {name}.log'}", flush=True)
        if code != 0:
            return False
    if generation is None or (out / name / EVAL_DIR / "metrics.json").exists():
        return True
    if not trains(run):  # what it is evaluated with, as a trained run's config records its training
        record(out, name, "config").write_text(yaml.safe_dump(spec.recorded(run)))
    code = evaluate_one(name, {**settings, "train": trains(run)}, generation, out)
    print(f"[bench] {name}: {'evaluated' if code == 0 else f'evaluation failed ({code})'}", flush=True)
    return code == 0


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bench", type=Path, help="bench YAML file: 'defaults' and a list of 'runs'")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench"), help="one directory per run, and the report"
    )
    parser.add_argument("--only", help="comma-separated run names to run (default: all)")


def run_bench(bench: Path, out: Path, only: str | None = None) -> int:
    """Run the bench's unfinished runs in order, then report every finished one; 1 if any run failed."""
    spec = read_bench(bench)
    wanted = set(only.split(",")) if only else None
    unknown = sorted((wanted or set()) - {r["name"] for r in spec.runs})
    if unknown:
        raise BenchError(f"--only names {unknown} are not runs of {bench}")
    with dirlock.exclusive(out, f"--out {out}", "lorakit bench"):  # one bench per directory
        return _run_all(spec, wanted, out)


def check_finished(spec: Bench, out: Path) -> None:
    """Refuse to report a run (or its evaluation) as this bench's when the bench file now sets it otherwise:
    it would be skipped, and the table would show the old run under the new settings. Every run of the table
    is checked, also those ``--only`` leaves out."""
    for run in spec.runs:
        name = run["name"]
        ran = (out / name / "metrics.json").exists() or (out / name / EVAL_DIR / "metrics.json").exists()
        steps = [("trained" if trains(run) else "evaluated", ran, "config", spec.recorded(run))]
        if spec.generate is not None:
            evaluated = (out / name / EVAL_DIR / "metrics.json").exists()
            steps.append(("evaluated", evaluated, "generate", spec.generate))
        for done, finished, step, now in steps:
            differ = changed(record(out, name, step), now, step == "config") if finished else []
            if differ:
                where = out / name if step == "config" else out / name / EVAL_DIR
                raise BenchError(
                    f"run {name} in {out} was {done} with other settings ({', '.join(map(str, differ))} "
                    f"changed since); it is kept as it is: give the changed run a new name, use another "
                    f"--out, or delete {where} to run it again"
                )


def check_own_out(spec: Bench, out: Path) -> None:
    """Refuse an ``out`` holding files named as those the bench writes (its report, a run's directory, log
    or records) that no bench wrote there: they may be the user's, and the bench would write over them."""
    if not out.is_dir() or (out / MARKER).exists():
        return
    names = [r["name"] for r in spec.runs]
    ours = [*sorted(REPORT_NAMES - {"results"}), *names, *(f"{n}.log" for n in names)]
    ours += [record(out, n, step).name for n in names for step in ("config", "generate")]
    found = [name for name in ours if (out / name).exists()]
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise BenchError(
            f"--out {out} holds {shown}, which the bench writes, but no bench wrote them there (no "
            f"{MARKER}); choose another --out, or move them away"
        )


def _run_all(spec: Bench, wanted: set[str] | None, out: Path) -> int:
    check_own_out(spec, out)
    check_finished(spec, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    failed = []
    for run in spec.runs:
        name = run["name"]
        if wanted and name not in wanted:
            continue
        if not _run(spec, run, out):
            failed.append(name)
    notes = {r["name"]: r.get("note", "") for r in spec.runs}
    write_report(out, [r["name"] for r in spec.runs], notes, failed=failed)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run and compare fine-tuning jobs.")
    add_bench_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_bench(args.bench, args.out, args.only)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
