"""The ``lorakit`` command: list, train, eval, merge."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

import lorakit
from lorakit.cliargs import add_job_flags, job_from_args
from lorakit.errors import LorakitError
from lorakit.train.rundir import JOB_FILE


def cmd_list(args: argparse.Namespace) -> None:
    rows = [(name, cls.__name__, cls.paper, cls.summary) for name, cls in lorakit.VARIANTS.items()]
    width = max(len(r[0]) for r in rows)
    for name, cls_name, paper, summary in rows:
        print(f"{name:<{width}}  {cls_name:<10} {paper:<18} {summary}")


def cmd_train(args: argparse.Namespace) -> None:
    from lorakit.distributed import writes_files
    from lorakit.train.job import run_job

    job = job_from_args(args)
    writer = writes_files()  # under torchrun only rank 0 reports
    if writer:
        print(f"training {job.variant} on {job.model} with {job.data.data} for {job.train.steps} steps")
    result = run_job(job)
    if not writer:
        return
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    loss = "not released (DP)" if job.privacy.dp else f"{result.final_loss:.4f}"
    print(f"done: {metrics or 'no evaluation data'}; final train loss {loss}")
    print(f"trainable parameters {result.trainable:,} of {result.total:,}; {result.seconds:.1f} s training")
    for key, value in result.extra.items():
        if isinstance(value, list):  # what a variant's stages decided (a list of names)
            print(f"{key} ({len(value)}): {', '.join(map(str, value))}")
    print(f"adapter saved to {result.adapter_dir}")


def _saved_job(adapter: str):
    from lorakit.train.job import DataConfig, JobConfig
    from lorakit.train.loop import TrainConfig

    path = Path(adapter) / JOB_FILE
    meta = lorakit.io.read_meta(adapter)
    if not path.is_file():
        return JobConfig(model=meta.get("base_model") or "minilm", variant=meta["variant"], num_labels=2)
    from lorakit.privacy.config import DPConfig

    # a job.json written before a section existed lacks it: that section takes its defaults
    sections = {"data": DataConfig, "train": TrainConfig, "privacy": DPConfig}
    try:
        raw = json.loads(path.read_text())
        job = JobConfig(**{**raw, **{k: cls(**raw.get(k, {})) for k, cls in sections.items()}})
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise LorakitError(
            f"cannot read {path}: {_one_line(err)}; it must be the {JOB_FILE} `lorakit train` wrote "
            "(restore it, or train again)"
        ) from None
    # a job.json written before the classes were recorded: two classes, as then
    return job if job.task != "classification" or job.num_labels else dataclasses.replace(job, num_labels=2)


def _load_adapted(adapter: str):
    from lorakit.train.models import load_model

    job = _saved_job(adapter)
    model, tokenizer = load_model(job.model, job.task, job.num_labels)
    if job.quantize:
        from lorakit.quant_api import quantize

        quantize(model, job.quantize)
    lorakit.load(model, adapter)
    return job, model, tokenizer


def cmd_eval(args: argparse.Namespace) -> None:
    from lorakit.train import data as D
    from lorakit.train.job import evaluate, tokenize

    job, model, tokenizer = _load_adapted(args.adapter)
    source = args.data or job.data.eval_data or ("demo" if job.data.data == "demo" else None)
    if source is None:
        raise LorakitError("no evaluation data: pass --data PATH")
    job.data.eval_data, job.data.data = source, source
    data = tokenize(job, tokenizer, source, D.read_rows(source, split="test"))
    d = job.data
    if args.all_ranks:
        table = lorakit.evaluate_all_ranks(model, lambda m: evaluate(m, data, d.eval_batch_size))
        print("rank  " + "  ".join(f"{k:>10}" for k in next(iter(table.values()))))
        for rank, metrics in table.items():
            print(f"{rank:>4}  " + "  ".join(f"{v:>10.4f}" for v in metrics.values()))
        return
    metrics = evaluate(model, data, d.eval_batch_size)
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def cmd_merge(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new directory for the merged model")
    _, model, tokenizer = _load_adapted(args.adapter)
    merged = lorakit.merge(model)
    from lorakit.quant_api import dequantize

    dequantize(merged)  # 4-bit layers the adapter did not touch become dense too: a merged model is plain
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"merged model saved to {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from lorakit.interop import save_peft

    _, model, _ = _load_adapted(args.adapter)
    if args.rank is not None:
        lorakit.set_rank(model, args.rank)
    out = save_peft(model, args.out, overwrite=args.overwrite)
    print(f"PEFT adapter saved to {out} (load it with peft.PeftModel.from_pretrained(base_model, '{out}'))")


def cmd_bench(args: argparse.Namespace) -> int:
    from lorakit.bench.run import run_bench

    return run_bench(args.bench, args.out, args.only)


def cmd_federate(args: argparse.Namespace) -> None:
    from lorakit.federated.config import from_args
    from lorakit.federated.simulate import simulate

    cfg = from_args(args)
    dp = f"clip {cfg.clip_norm}, noise {cfg.noise_multiplier or 'from target'}" if cfg.private else "no DP"
    print(
        f"federated {cfg.variant} on {cfg.model}: {cfg.clients} clients ({cfg.partition}), "
        f"{cfg.rounds} rounds, cohort {cfg.cohort} ({cfg.sampling}), {cfg.local_steps} local steps; {dp}"
    )
    result = simulate(cfg, num_cpus=args.num_cpus)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()) or "no evaluation data"
    if result.epsilon is not None:
        metrics += f"; epsilon {result.epsilon:.3f} at delta {result.delta:g}"
    print(f"done after {len(result.rounds)} rounds: {metrics}; adapter saved to {result.adapter_dir}")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes (an unknown flag, a value of the wrong type) end in one line, like every other error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"lorakit: error: {message} (see {self.prog} --help)\n")


# `lorakit train --help` ends with the launches of a distributed run (docs/distributed.md has the details).
TORCHRUN_FORMS = """distributed training under torchrun (--batch-size is per process):
  one machine:   torchrun --nproc_per_node 4 -m lorakit train --distributed ddp ...
  several nodes: torchrun --nnodes 2 --nproc_per_node 8 --node-rank N --rdzv-backend c10d \\
                   --rdzv-endpoint HOST0:29500 --rdzv-id RUN -m lorakit train --distributed fsdp ...
                 (the same command on every node, N = 0, 1, ...; --output-dir on a shared file system)
  restarts:      TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --max-restarts 3 ... \\
                   -m lorakit train --resume auto --checkpoint-every 50 ...
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lorakit", description="Fine-tune models with the LoRA family.")
    parser.add_argument("--version", action="version", version=f"lorakit {lorakit.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the variants").set_defaults(func=cmd_list)
    train = sub.add_parser(
        "train",
        help="fine-tune a model with a variant",
        epilog=TORCHRUN_FORMS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_flags(train)
    train.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="evaluate a saved adapter")
    ev.add_argument("--adapter", required=True, help="directory written by `lorakit train`")
    ev.add_argument("--data", help="evaluation data (default: the job's evaluation data)")
    ev.add_argument(
        "--all-ranks",
        action="store_true",
        help="evaluate every rank the adapter was trained for (variants with rank choices)",
    )
    ev.set_defaults(func=cmd_eval)
    merge = sub.add_parser("merge", help="fold an adapter into its base and save the plain model")
    merge.add_argument("--adapter", required=True, help="directory written by `lorakit train`")
    merge.add_argument("--out", required=True, help="new directory for the merged model (safetensors)")
    merge.set_defaults(func=cmd_merge)
    export = sub.add_parser("export", help="write an adapter in PEFT's format (LoRA, DoRA, LoHa, LoKr, VeRA)")
    export.add_argument("--adapter", required=True, help="directory written by `lorakit train`")
    export.add_argument(
        "--out", required=True, help="directory for adapter_config.json + adapter_model.safetensors"
    )
    export.add_argument(
        "--rank", type=int, help="the rank to write, for variants with rank choices (default: the largest)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace a PEFT adapter already in --out")
    export.set_defaults(func=cmd_export)
    from lorakit.bench.run import add_bench_args

    bench = sub.add_parser("bench", help="run several jobs from a YAML file and compare them (table + plot)")
    add_bench_args(bench)
    bench.set_defaults(func=cmd_bench)
    from lorakit.federated.config import add_flags

    fed = sub.add_parser(
        "federate", help="federated fine-tuning with DP-FedAvg on Flower's simulation engine"
    )
    add_flags(fed)
    fed.add_argument("--num-cpus", type=int, default=2, help="simulation worker processes (default: 2)")
    fed.set_defaults(func=cmd_federate)
    for command in sub.choices.values():  # accepted after the command too: `lorakit train ... --debug`
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


# Errors a user causes and can fix: one line, exit 2. LorakitError is the project's own base; the others are
# what the standard library raises for a bad path, an unwritable directory or a missing optional extra.
USER_ERRORS = (LorakitError, ValueError, OSError, ImportError)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename is not None:  # a path the system refused
        return f"cannot use {err.filename}: {err.strerror} (check that the path exists and is writable)"
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed in one line
        return done.code if isinstance(done.code, int) else 2
    debug = args.debug or bool(os.environ.get("LORAKIT_DEBUG"))
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"lorakit: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug in lorakit: still one line, with the way to see the traceback
        if debug:
            raise
        print(
            f"lorakit: internal error: {type(err).__name__}: {_one_line(err)} "
            "(rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
