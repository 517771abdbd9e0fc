"""The ``lorakit`` command: list, train, eval, merge."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lorakit
from lorakit.common.errors import LorakitError, is_disk_full
from lorakit.jobs.cliargs import add_job_flags, job_from_args

if typing.TYPE_CHECKING:
    from torch import nn

    from lorakit.data.chat import Example
    from lorakit.jobs.config import JobConfig


def cmd_list(args: argparse.Namespace) -> None:
    rows = [(name, cls.__name__, cls.paper, cls.summary) for name, cls in lorakit.VARIANTS.items()]
    width = max(len(r[0]) for r in rows)
    for name, cls_name, paper, summary in rows:
        print(f"{name:<{width}}  {cls_name:<10} {paper:<18} {summary}")


def cmd_train(args: argparse.Namespace) -> None:
    from lorakit.distributed import writes_files
    from lorakit.jobs.job import check_variant_runs, run_job

    job = job_from_args(args)
    check_variant_runs(job)  # a variant this run cannot train is refused before it is announced
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


def cmd_eval(args: argparse.Namespace) -> None:
    from lorakit.data import datasets as D
    from lorakit.jobs.job import (
        eval_batch_size,
        evaluate,
        measure_peak_memory_mb,
        reset_peak_memory,
        tokenize,
    )

    _check_eval_flags(args)
    source = _eval_data(args)  # before the model is loaded
    pattern, out = None, None
    if args.generate:  # every flag of the generation checked before the model is loaded
        from lorakit.eval.run import GenerationReport
        from lorakit.eval.scoring import compile_pattern

        pattern, out = compile_pattern(args.answer_pattern), _eval_out(args)
        GenerationReport.check_out(out, args.overwrite)
    job, model, tokenizer = _load_for_eval(args)
    job.data.eval_data, job.data.data = source, source
    rows = D.read_rows(source, split="test")
    rows = rows[: args.limit] if args.limit else rows
    data = tokenize(job, tokenizer, source, rows, named=_columns_named(args))
    cut = data.truncation.describe(source) if data.truncation is not None else None
    if cut is not None:  # the loss covers what is left of the answers
        print(cut, file=sys.stderr)
    size = eval_batch_size(job)
    if args.all_ranks:
        table = lorakit.evaluate_all_ranks(model, lambda m: evaluate(m, data, size))
        print("rank  " + "  ".join(f"{k:>10}" for k in next(iter(table.values()))))
        for rank, metrics in table.items():
            print(f"{rank:>4}  " + "  ".join(f"{v:>10.4f}" for v in metrics.values()))
        return
    reset_peak_memory()
    metrics: dict[str, float] = evaluate(model, data, size)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    metrics["loss_peak_memory_mb"] = measure_peak_memory_mb()  # the loss evaluation's, not generation's
    if out is not None:
        from lorakit.eval.run import generation_eval

        answered = rows[: args.generate_limit] if args.generate_limit else rows
        report = generation_eval(
            job, model, tokenizer, answered, source, pattern, args.max_new_tokens, args.batch_size or BATCH,
            named=_columns_named(args),
        )  # fmt: skip
        metrics |= report.metrics
        shown += f", exact match {report.metrics['exact_match']:.4f} ({report.correct}/{report.total})"
        report.write(out, metrics, args.overwrite)
        shown += f"; generations in {report.path}"
    print(shown)


def _columns_named(args: argparse.Namespace) -> bool:
    """Whether the prompt or response column was named on the command line for this data: data holding
    conversations is then refused rather than read with the named columns passed over."""
    return args.prompt_column is not None or args.response_column is not None


def _check_eval_flags(args: argparse.Namespace) -> None:
    """Refuse flags this evaluation would not use: the generation's without ``--generate``, and
    ``--generate`` beside ``--all-ranks`` (a loss table over the ranks, no generation)."""
    if args.all_ranks and args.generate:
        raise LorakitError(
            "--all-ranks evaluates the loss at every rank and generates nothing; run --generate as a "
            "command of its own (at the rank the adapter uses)"
        )
    generation = {
        "--answer-pattern": args.answer_pattern,
        "--max-new-tokens": args.max_new_tokens,
        "--generate-limit": args.generate_limit,
        "--batch-size": args.batch_size,
        "--out": args.out,
        "--overwrite": args.overwrite or None,
    }
    given = [flag for flag, value in generation.items() if value is not None]
    if given and not args.generate:
        raise LorakitError(f"{given[0]} applies to --generate only: add --generate, or drop {given[0]}")


def _check_model_args(args: argparse.Namespace) -> None:
    if args.adapter is not None and args.model is not None:
        raise LorakitError("pass --adapter (a tuned model) or --model (a base model as it is), not both")
    if args.adapter is None and args.model is None:
        raise LorakitError("pass --adapter DIR (a tuned model) or --model NAME (a base model as it is)")


def _eval_data(args: argparse.Namespace) -> str:
    """The data to evaluate on: ``--data``, else the adapter's job's evaluation data (never other data)."""
    from lorakit.jobs.saved import eval_source, saved_job

    _check_model_args(args)
    if args.adapter is not None:
        return eval_source(saved_job(args.adapter), args.adapter, args.data)
    if not args.data:
        raise LorakitError("evaluating a base --model needs --data PATH")
    return args.data


def _eval_job(args: argparse.Namespace) -> JobConfig | None:
    """The job of the model that evaluates or generates, before it is loaded: the ``--adapter``'s (its saved
    settings; None without ``job.json``) or a base ``--model``'s; flags given override its data settings."""
    from lorakit.jobs.config import DataConfig, JobConfig
    from lorakit.jobs.job import resolve_task
    from lorakit.jobs.saved import saved_job

    _check_model_args(args)
    if args.adapter is not None:
        job = saved_job(args.adapter)
    else:
        job = resolve_task(
            JobConfig(model=args.model, data=DataConfig(chat_template=args.chat_template or "auto"))
        )
    if job is not None:
        _override_data(args, job)
        _check_task_flags(args, job)
    return job


def _override_data(args: argparse.Namespace, job: JobConfig) -> None:
    from lorakit.data.datasets import MESSAGES_COLUMN

    columns = ("prompt_column", "response_column", "messages_column", "text_column", "label_column")
    for name in (*columns, "max_length"):
        if getattr(args, name, None) is not None:
            setattr(job.data, name, getattr(args, name))
    if _columns_named(args) and getattr(args, "messages_column", None) is None:
        job.data.messages_column = MESSAGES_COLUMN  # prompt/response named for this data: not the run's


def _check_task_flags(args: argparse.Namespace, job: JobConfig) -> None:
    """Refuse flags the job's model cannot honour: generation from a classifier, another chat template for an
    adapter (it renders prompts in its run's own)."""
    from lorakit.jobs.job import CHAT_TEMPLATE_FILE

    if args.generate and job.task != "causal-lm":
        what = "lorakit generate" if args.command == "generate" else "--generate"
        raise LorakitError(f"{what} needs a causal language model; this one is a classifier")
    task_flags = {
        "causal language model": ("prompt_column", "response_column", "messages_column", "chat_template"),
        "classifier": ("text_column", "label_column"),
    }
    this = "causal language model" if job.task == "causal-lm" else "classifier"
    for task, flags in task_flags.items():
        given = [name for name in flags if getattr(args, name, None) is not None]
        if task != this and given:
            flag = "--" + given[0].replace("_", "-")
            raise LorakitError(f"{flag} applies to a {task}; this one is a {this}: drop it")
    if args.adapter is not None and job.task == "causal-lm" and args.chat_template is not None:
        raise LorakitError(
            f"the adapter renders prompts in the chat template it was trained with ({CHAT_TEMPLATE_FILE} "
            "in its directory, or none); --chat-template applies to a base --model only"
        )


def _load_for_eval(args: argparse.Namespace) -> tuple[JobConfig, nn.Module, typing.Any]:
    """The model to evaluate or generate with: the adapted model of ``--adapter`` (its job's settings, its
    chat template), or the base ``--model`` as it is; flags given override the job's data settings."""
    from lorakit.jobs.job import check_context
    from lorakit.jobs.models import load_model
    from lorakit.jobs.saved import load_adapted

    job = _eval_job(args)
    if args.adapter is not None:
        job, model, tokenizer = load_adapted(args.adapter)
        _override_data(args, job)
        _check_task_flags(args, job)  # again: an adapter without job.json
    else:
        model, tokenizer = load_model(job.model, job.task, job.num_labels or 2)
    check_context(job, model)
    return job, model, tokenizer


def _eval_out(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    if args.adapter is None:
        raise LorakitError("--generate on a base --model needs --out DIR for its metrics and generations")
    from lorakit.jobs.rundir import EVAL_DIR

    return Path(args.adapter) / EVAL_DIR


def cmd_generate(args: argparse.Namespace) -> None:
    from lorakit.data import chat
    from lorakit.data import datasets as D
    from lorakit.eval.run import answer_prompts

    args.generate = True  # the checks of a model that generates
    if args.max_length is not None:
        raise LorakitError("--max-length sets the loss's tokens per example; generate has no loss: drop it")
    if args.compare_base and args.adapter is None:
        raise LorakitError("--compare-base compares an --adapter's answers with its base model's")
    for number, text in enumerate(args.prompts, 1):
        if not text.strip():
            raise LorakitError(f"prompt {number} is empty; pass the text to answer")
        if not D.valid_text(text):
            raise LorakitError(f"prompt {number} is not valid UTF-8 text; pass it in the terminal's UTF-8")
    job = _eval_job(args)
    prompts = [chat.Example(({"role": "user", "content": text},)) for text in args.prompts]
    if args.prompts_file:
        from_file = _prompts_from_file(Path(args.prompts_file), job, _columns_named(args))
        if not from_file:
            raise LorakitError(f"--prompts-file {args.prompts_file} holds no prompt; write one per line")
        prompts += from_file
    if not prompts:
        raise LorakitError("no prompt: pass one or more prompts, or --prompts-file FILE")
    job, model, tokenizer = _load_for_eval(args)
    batch = args.batch_size or BATCH
    tuned = answer_prompts(model, tokenizer, job, prompts, args.max_new_tokens, batch)
    base = None
    if args.compare_base:
        with lorakit.disabled(model):
            base = answer_prompts(model, tokenizer, job, prompts, args.max_new_tokens, batch)
    for i, prompt in enumerate(prompts):
        print(f"### prompt {i + 1}\n{prompt.prompt[-1]['content']}")
        print(f"--- tuned\n{tuned[i]}" if base is not None else f"--- answer\n{tuned[i]}")
        if base is not None:
            print(f"--- base\n{base[i]}")
        print()


def _prompts_from_file(path: Path, job: JobConfig | None, named: bool) -> list[Example]:
    """Prompts from a data file (its prompt column, or each conversation up to its last user turn) or from a
    text file (one per line), as conversations to answer. ``named``: see :func:`_columns_named`."""
    from lorakit.data import chat
    from lorakit.data import datasets as D
    from lorakit.jobs.config import DataConfig

    if path.is_dir():
        raise LorakitError(f"--prompts-file {path} is a directory; pass a text file (one prompt per line)")
    if not path.exists():
        raise LorakitError(f"--prompts-file {path} does not exist; check the path")
    if not path.is_file():
        raise LorakitError(
            f"--prompts-file {path} is not a regular file (a pipe or a device); save it to a file"
        )
    if path.suffix.lower() in D.FILE_TYPES:
        d = job.data if job is not None else DataConfig()
        rows = D.read_rows(str(path))
        examples = D.conversations(
            rows, d.messages_column, d.prompt_column, d.response_column, str(path), answers=False, named=named
        )
        return [chat.Example(example.prompt) for example in examples]
    try:
        lines = D.text_lines(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is no prompt text
    except UnicodeDecodeError:
        raise LorakitError(f"--prompts-file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as err:
        raise LorakitError(f"cannot read --prompts-file {path}: {err.strerror or err}") from None
    return [chat.Example(({"role": "user", "content": line},)) for line in lines if line.strip()]


def cmd_merge(args: argparse.Namespace) -> None:
    from lorakit.jobs.saved import write_merged

    write_merged(args.adapter, args.out)
    print(f"merged model saved to {args.out}")


def cmd_export(args: argparse.Namespace) -> None:
    from lorakit.jobs.saved import write_peft

    write_peft(args.adapter, args.out, args.rank, args.overwrite)
    loader = f"peft.PeftModel.from_pretrained(base_model, '{args.out}')"
    print(f"PEFT adapter saved to {args.out} (load it with {loader})")


def cmd_bench(args: argparse.Namespace) -> int:
    from lorakit.bench.run import run_bench

    return run_bench(args.bench, args.out, args.only)


def cmd_federate(args: argparse.Namespace) -> None:
    from lorakit.distributed.group import check_one_process
    from lorakit.federated.config import from_args
    from lorakit.federated.simulate import simulate
    from lorakit.jobs.rundir import exclusive

    check_one_process("lorakit federate is one process (Flower runs its clients): launch it without torchrun")
    cfg = from_args(args)
    noise = cfg.noise_multiplier if cfg.target_epsilon is None else (cfg.noise_multiplier or "from target")
    dp = f"clip {cfg.clip_norm}, noise {noise or 0}" if cfg.private else "no DP"
    print(
        f"federated {cfg.variant} on {cfg.model}: {cfg.clients} clients ({cfg.partition}), "
        f"{cfg.rounds} rounds, cohort {cfg.cohort} ({cfg.sampling}), {cfg.local_steps} local steps; {dp}"
    )
    with exclusive(cfg.output_dir, "lorakit federate"):  # one run writes an output directory at a time
        result = simulate(cfg, num_cpus=args.num_cpus)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()) or "no evaluation data"
    if result.epsilon is not None:
        metrics += f"; epsilon {result.epsilon:.3f} at delta {result.delta:g}"
    print(f"done after {len(result.rounds)} rounds: {metrics}; adapter saved to {result.adapter_dir}")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Which model answers (a tuned adapter, or a base model as it is), and data settings over the job's."""
    parser.add_argument("--adapter", help="directory written by `lorakit train`")
    parser.add_argument("--model", help="a base model as it is, instead of --adapter (e.g. smollm2)")
    parser.add_argument(
        "--chat-template", help="with --model: auto (default), none, or the path of a Jinja chat template"
    )
    parser.add_argument("--prompt-column", help="causal-LM prompt column (default: the job's)")
    parser.add_argument("--response-column", help="causal-LM reference answer column (default: the job's)")
    parser.add_argument("--messages-column", help="causal-LM conversations column (default: the job's)")
    parser.add_argument("--text-column", help="classifier text column (default: the job's)")
    parser.add_argument("--label-column", help="classifier label column (default: the job's)")
    parser.add_argument(
        "--max-length", type=_positive, help="tokens per example for the loss (default: the job's)"
    )


BATCH = 16  # prompts generated together unless --batch-size says otherwise


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-new-tokens",
        type=_positive,
        help="tokens generated per answer at most (default: 256, or fewer where the model's context ends)",
    )
    parser.add_argument("--batch-size", type=_positive, help=f"prompts generated together (default: {BATCH})")


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
    ev = sub.add_parser("eval", help="evaluate a saved adapter (or a base model)")
    _add_model_flags(ev)
    ev.add_argument("--data", help="evaluation data (default: the job's evaluation data)")
    ev.add_argument("--limit", type=_positive, help="evaluate the first N rows only")
    ev.add_argument(
        "--generate-limit", type=_positive, help="with --generate: answer the first N rows (the loss: all)"
    )
    ev.add_argument(
        "--all-ranks",
        action="store_true",
        help="evaluate every rank the adapter was trained for (variants with rank choices)",
    )
    ev.add_argument(
        "--generate",
        action="store_true",
        help="causal LM: also answer every prompt (greedy) and score exact match of the final answers",
    )
    ev.add_argument(
        "--answer-pattern",
        help="regular expression whose first group is the final answer (default: GSM8K's '#### N', else the "
        "last number)",
    )
    ev.add_argument("--out", help="directory for metrics.json and generations.jsonl (default: ADAPTER/eval)")
    ev.add_argument("--overwrite", action="store_true", help="replace an evaluation already in --out")
    _add_generation_flags(ev)
    ev.set_defaults(func=cmd_eval)
    gen = sub.add_parser("generate", help="print a tuned causal LM's answers to prompts")
    _add_model_flags(gen)
    gen.add_argument("prompts", nargs="*", help="prompts (the user's turn)")
    gen.add_argument("--prompts-file", help="more prompts: a text file (one per line) or a data file")
    gen.add_argument(
        "--compare-base", action="store_true", help="show the base model's answers beside the tuned ones"
    )
    _add_generation_flags(gen)
    gen.set_defaults(func=cmd_generate)
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
    if is_disk_full(err) and not isinstance(err, LorakitError):  # a write no handler nearer to it named
        where = Path(err.filename).parent if isinstance(err, OSError) and err.filename else "the device"
        return f"no space left on {where}; free space and run the command again"
    if isinstance(err, OSError) and err.strerror and err.filename is not None:  # a path the system refused
        return f"cannot use {err.filename}: {err.strerror} (check that the path exists and is writable)"
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed in one line
        code = done.code if isinstance(done.code, int) else 2
        if code and _trains(sys.argv[1:] if argv is None else argv):
            _release_peers("its command line was refused (a usage error, printed there)")
        return code
    debug = args.debug or bool(os.environ.get("LORAKIT_DEBUG"))
    try:
        with warnings.catch_warnings():  # put back as it was when the command ends
            warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
            return args.func(args) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        line, code = _report(err)
        if args.command == "train":
            _release_peers(_one_line(err))
        if debug:
            raise
        print(f"lorakit: {line}", file=sys.stderr)
        return code


_PACKAGE = Path(lorakit.__file__).resolve().parent


def _show_warning(
    shown: Callable[..., None], message: Warning | str, category: type[Warning], filename: str, *args: Any
) -> None:
    """lorakit's own warnings as one line each, as its errors, without Python's source location; other
    libraries' as they were ``shown`` before."""
    if not Path(filename).resolve().is_relative_to(_PACKAGE):
        shown(message, category, filename, *args)
        return
    print(f"lorakit: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _report(err: Exception) -> tuple[str, int]:
    """The one line an error is reported with, and the exit code: 2 for what a user can fix, 1 for a bug."""
    if isinstance(err, USER_ERRORS) or is_disk_full(err):  # or a library's own error type for a full disk
        return f"error: {_one_line(err)}", 2
    # a bug in lorakit: still one line, with the way to see the traceback
    return (
        f"internal error: {type(err).__name__}: {_one_line(err)} "
        "(rerun with --debug for the traceback and report it)"
    ), 1


def _trains(argv: list[str]) -> bool:
    """Whether the command line is a ``lorakit train`` (its first word that is no option)."""
    return next((word for word in argv if not word.startswith("-")), None) == "train"


def _release_peers(reason: str) -> None:
    # Under torchrun, the other processes of the run wait for this one in the process group: tell them why
    # it stops (lorakit.distributed.group.release_peers), so none waits until the group's timeout.
    from lorakit.distributed.group import release_peers

    release_peers(reason)


if __name__ == "__main__":
    sys.exit(main())
