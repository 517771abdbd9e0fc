"""One fine-tuning job end to end: load model and data, apply a variant, train, evaluate, save.

Shared by ``lorakit train``, ``lorakit eval`` and the benchmarks, so every number is produced the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.adapters.io import atomic_write
from lorakit.common.errors import DiskFullError, LorakitError, SettingError, is_disk_full
from lorakit.core.contract import CapabilityError, Driver
from lorakit.data import chat
from lorakit.data import datasets as D
from lorakit.distributed import writes_files
from lorakit.distributed.group import check_one_process
from lorakit.engine.placement import LOCAL
from lorakit.engine.token_loss import TokenLoss, predicted_tokens, takes_token_loss
from lorakit.jobs import rundir
from lorakit.jobs.config import JobConfig
from lorakit.jobs.models import (
    EMBEDDED,
    GGUF_MODELS,
    checkpoint_blocks,
    context_length,
    head_modules,
    infer_task,
    load_model,
    name_classes,
)
from lorakit.jobs.rundir import CHAT_TEMPLATE_FILE
from lorakit.jobs.scale_out import ScaleOut
from lorakit.privacy.config import PrivacyError
from lorakit.train.checkpoint import resume_point
from lorakit.train.loop import TrainResult, train


class EvaluationError(LorakitError):
    """The evaluation data cannot be evaluated, or the final evaluation failed after the adapter was saved."""


@dataclass
class JobResult:
    metrics: dict[str, float]
    trainable: int
    total: int
    seconds: float
    steps: int
    final_loss: float
    adapter_dir: str
    peak_memory_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``metrics.json``; a number that is not finite (DP-SGD's unreleased loss) is
        written as ``null``, so the file stays strict JSON."""
        return _finite_or_none(dataclasses.asdict(self))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def read_data(job: JobConfig) -> list[tuple[str, list[D.Row]]]:
    """``(source, rows)`` of the training data and, if there is one, the evaluation data."""
    d = job.data
    eval_source = d.eval_source()
    out = [(d.data, D.read_rows(d.data, split="train"))]
    if eval_source is not None:
        out.append((eval_source, D.read_rows(eval_source, split="test")))
    return out


# The classes size the head and are saved with the adapter: under DP they must not come from the private data.
_CLASSES_UNDER_DP = (
    "DP training takes its classes from the settings, not from the private data (their number and names "
    "would be released with the adapter, outside the privacy accounting): pass --num-labels N for class "
    "ids, or --labels NAMES for named classes"
)


def resolve_classes(
    job: JobConfig, data: list[tuple[str, list[D.Row]]] | None = None, private: bool = False
) -> JobConfig:
    """``job`` with its classes read from the training data (the number, and the names of named labels),
    after checking every row of the training and evaluation data against them; before any training, so a
    label problem never costs a run. Under DP (the job's, or ``private``: a federated run's client-level DP)
    the classes must come from the settings. A causal-LM job is returned as it is (its task set)."""
    job = resolve_task(job)
    if job.task != "classification":
        return job
    data = read_data(job) if data is None else data
    d = job.data
    private = private or job.privacy.dp
    classes = job.classes() if job.labels is not None else None
    if classes is None and private:
        if job.num_labels is None:
            raise PrivacyError(_CLASSES_UNDER_DP)
        classes = D.ClassLabels(job.num_labels)  # the settings' classes: the private rows are only checked
    if classes is None:
        source, rows = data[0]
        classes = D.ClassLabels.from_rows(rows, d.label_column, source, job.num_labels)
    for i, (source, rows) in enumerate(data):
        try:
            classes.ids(rows, d.label_column, source)
            D.texts(rows, d.text_column, source)
        except D.DataError:
            if not (private and i == 0):
                raise
            raise D.DataError(  # which row, and its value, are the private data's: neither is named
                f"{source}: a row's label or text does not fit the classes the settings give ({classes.count}"
                f"{': ' + ', '.join(classes.names) if classes.names else ' class ids'}) or the columns "
                f"'{d.text_column}' and '{d.label_column}'; the row and its values are not shown under DP: "
                "check the data (labels that are class names need --labels NAMES for named classes)"
            ) from None
    labels = list(classes.names) if classes.names is not None else None
    return dataclasses.replace(job, num_labels=classes.count, labels=labels)


def tokenize(
    job: JobConfig,
    tokenizer: Any,
    source: str,
    rows: list[D.Row],
    named: bool = False,
    private: bool = False,
) -> D.TokenizedData:
    """One data set of ``job`` tokenised for its task (classification labels as the job's class ids; a
    causal LM's conversations in the job's chat template, the loss on the answers). ``named``: the job's
    columns were set for this data (training), see :func:`lorakit.data.datasets.conversations`.
    ``private``: DP's training data, whose every row stays an example (one whose answer ``max_length``
    cut away trains nothing) and whose problems are named without their row or values."""
    job, d = resolve_task(job), job.data
    if job.task == "classification":
        return D.tokenize_classification(
            rows, tokenizer, d.text_column, d.label_column, d.max_length, source, classes=job.classes()
        )
    if source == "demo":
        raise D.DataError(
            "demo is a built-in classification set (sentence, label), and this model is a causal LM: pass "
            "--data FILE with prompt and response (or messages) columns (a classifier trains on it with "
            "`lorakit train --task classification`)"
        )
    template = chat_template(job, tokenizer)
    try:
        examples = D.conversations(
            rows, d.messages_column, d.prompt_column, d.response_column, source, named=named
        )
        data = D.tokenize_causal(examples, tokenizer, template, d.max_length, source, keep_unanswered=private)
    except (D.DataError, chat.ChatError):
        if not private:
            raise
        raise D.DataError(  # which row, and its values, are the private data's: neither is named
            f"{source}: a row does not fit the columns '{d.prompt_column}' and '{d.response_column}' (or "
            f"'{d.messages_column}': a list of role and content turns ending in an assistant turn with "
            "text); the row and its values are not shown under DP: check the data"
        ) from None
    if not data.input_ids:
        raise D.DataError(
            f"{source}: no example keeps an answer token within max length {d.max_length}; raise --max-length"
        )
    return data


def chat_template(job: JobConfig, tokenizer: Any) -> str | None:
    """The chat template a causal-LM job renders its conversations in (None: plain prompt and response)."""
    return chat.load_template(job.data.chat_template, tokenizer) if job.task == "causal-lm" else None


def build_data(job: JobConfig, tokenizer: Any) -> tuple[D.TokenizedData, D.TokenizedData | None]:
    """Tokenised training data and evaluation data (if any) for ``job``; how truncation cut the answers of
    each is printed once (under DP only the evaluation data's: the training data's counts are statistics of
    the private data that the accountant does not cover)."""
    data = read_data(job)
    job = resolve_classes(job, data)
    # The columns were named for the training data; evaluation data may hold conversations instead (as
    # `lorakit eval` reads it), so only the training data refuses them beside a messages column.
    out = [
        tokenize(job, tokenizer, source, rows, named=i == 0, private=i == 0 and job.privacy.dp)
        for i, (source, rows) in enumerate(data)
    ]
    if job.privacy.dp:  # private counts that the accountant does not cover: neither printed nor recorded
        out[0] = dataclasses.replace(out[0], truncation=None)
    for line in causal_notes(job, tokenizer):
        report(line)
    for (source, _), tokenized in zip(data, out, strict=True):
        line = tokenized.truncation.describe(source) if tokenized.truncation is not None else None
        if line is not None:
            report(line)
    return out[0], (out[1] if len(out) > 1 else None)


def causal_notes(job: JobConfig, tokenizer: Any) -> list[str]:
    """What the user should know about how a causal-LM job's text is formed: plain text without a chat
    template, and answers without an end where the tokenizer has no end-of-sequence token or the template
    closes no answer with a special token."""
    if job.task != "causal-lm":
        return []
    template = chat_template(job, tokenizer)
    if template is not None:
        if chat.ends_answers(tokenizer, template):
            return []
        return [
            "the chat template closes the assistant's answer with no special token (an end-of-turn marker), "
            "so answers are trained without an end and generation runs to --max-new-tokens; end each "
            "assistant turn with the tokenizer's end-of-sequence token in the template"
        ]
    why = "--chat-template none" if job.data.chat_template == "none" else "the tokenizer has no chat template"
    notes = [f"{why}: prompts and responses are joined as plain text; --chat-template PATH applies one"]
    if tokenizer.eos_token_id is None:
        notes.append(
            "the tokenizer has no end-of-sequence token: answers are trained without an end, so generation "
            "runs to --max-new-tokens (set eos_token in the model's tokenizer_config.json to fix it)"
        )
    return notes


def report(line: str) -> None:
    """A line for the user on stderr (once per process in a distributed run: rank 0's)."""
    if writes_files():
        print(line, file=sys.stderr)


def group_by_length(job: JobConfig) -> bool:
    """Whether training batches group examples of similar length (as set; by default for a causal LM)."""
    grouped = job.data.group_by_length
    return grouped if grouped is not None else job.task == "causal-lm"


def save_chat_template(directory: Path, template: str | None) -> None:
    """Record the chat template a run rendered its data in (``chat_template.jinja``; none: no file), so that
    evaluation and generation render prompts the same way."""
    if template is not None:
        atomic_write(directory / CHAT_TEMPLATE_FILE, lambda path: Path(path).write_text(template, "utf-8"))


def run_chat_template(directory: str | Path, job: JobConfig, tokenizer: Any) -> str | None:
    """The chat template a finished causal-LM run rendered its data in: its ``chat_template.jinja``, checked;
    without that file, none where the run chose none, else the tokenizer's own (``auto``, as in training).
    A damaged copy, or a missing copy of a template given by path, is a :class:`chat.ChatError`."""
    path = Path(directory) / CHAT_TEMPLATE_FILE
    restore = "restore it from the run's copy (the model was tuned on that format), or train again"
    if path.exists():
        what = f"the run's chat template {path}"
        template = chat.read_template(path, what, restore)
        chat.check_template(tokenizer, template, what, restore)
        return template
    if job.data.chat_template in ("none", "auto"):
        return chat.load_template(job.data.chat_template, tokenizer)
    raise chat.ChatError(
        f"{path} is missing: the run rendered its data in the chat template {job.data.chat_template} and "
        f"kept a copy there; {restore}"
    )


def adopt_run_template(job: JobConfig, tokenizer: Any, directory: str | Path) -> None:
    """Make the run's chat template the tokenizer's (and the job's choice), whatever the tokenizer ships, so
    that evaluation, generation and a merged or exported tokenizer render prompts as the training did."""
    template = run_chat_template(directory, job, tokenizer)
    tokenizer.chat_template = template
    job.data.chat_template = "auto" if template is not None else "none"


def eval_batch_size(job: JobConfig) -> int:
    """Examples per evaluation batch: as set, else 128 for classification and the training batch size for a
    causal LM (whose activations per example are far larger)."""
    if job.data.eval_batch_size is not None:
        return job.data.eval_batch_size
    return 128 if job.task == "classification" else job.train.batch_size


@torch.no_grad()
def evaluate(model: nn.Module, data: D.TokenizedData, batch_size: int = 128) -> dict[str, float]:
    """Accuracy and mean loss (classification), or a causal LM's loss over its labelled tokens (the answers)
    and its perplexity, ``exp(loss)``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    loss_sum = 0.0
    token_loss = isinstance(data.labels[0], list) and takes_token_loss(model)
    try:
        for batch in D.eval_batches(data, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            if token_loss:  # summed over the labelled tokens, without the full-vocabulary logits
                summed, count = TokenLoss.of(model)(**batch)
                loss_sum += summed.item()
                total += int(count)
                continue
            out = model(**batch)
            labels = batch["labels"]
            # a causal LM's own loss is its mean over the batch's predicted tokens: weighted by them
            n = predicted_tokens(labels) if labels.dim() == 2 else labels.shape[0]
            loss_sum += out.loss.item() * n
            total += n
            if batch["labels"].dim() == 1:
                correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
    finally:  # a failed evaluation must not leave a model that is still training in eval mode
        model.train(was_training)
    if isinstance(data.labels[0], list):
        loss = loss_sum / max(total, 1)
        # exp(loss) up to e^709, about the largest float (a JSON file holds no infinity); NaN stays NaN
        return {"loss": loss, "perplexity": math.exp(min(loss, 709.0))}
    return {"accuracy": correct / total, "loss": loss_sum / total}


BERT_TARGETS = ["query", "key", "value", "dense"]


def targets(job: JobConfig, model: nn.Module) -> list[str] | str:
    """The layers ``job`` adapts: as set, else every linear layer of a causal LM (the output head excluded),
    the attention and feed-forward projections of a BERT-style classifier (the reference budget), and every
    linear layer of another classifier (a causal LM with a classification head has no layers of those
    names)."""
    if job.targets is not None:
        return job.targets
    if job.task == "classification":
        heads = head_modules(model, job.task)
        linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        if {name.rsplit(".", 1)[-1] for name in linear}.issuperset(BERT_TARGETS):
            # by full name, outside the new head, which trains in full (RoBERTa's holds a `dense` too)
            inside = tuple(head + "." for head in heads)
            return [n for n in linear if n.rsplit(".", 1)[-1] in BERT_TARGETS and not n.startswith(inside)]
    return "all-linear"


def check_context(job: JobConfig, model: nn.Module) -> None:
    """Refuse a ``max_length`` longer than the model's context (its position embeddings end there)."""
    context = context_length(model)
    if context is not None and job.data.max_length > context:
        raise SettingError(
            f"--max-length {job.data.max_length} is longer than the model's context of {context} tokens; "
            f"pass --max-length {context} or less"
        )


def resolve_task(job: JobConfig) -> JobConfig:
    """``job`` with its task set: as given, else from the model (causal-lm for a causal language model)."""
    return job if job.task is not None else dataclasses.replace(job, task=infer_task(job.model))


def prepare_model(job: JobConfig) -> tuple[nn.Module, Any]:
    """Load the base model, quantise it if asked, and apply the job's variant."""
    job = resolve_task(job)
    torch.manual_seed(job.train.seed)  # the new head's initialisation depends on it
    model, tokenizer = load_model(job.model, job.task, job.num_labels or 2)
    name_classes(model, job.labels)  # the names travel with a merged model
    if job.quantize:
        from lorakit.adapters.quantize import quantize

        quantize(model, job.quantize)
    lorakit.apply(
        model,
        job.variant,
        targets=targets(job, model),
        train_modules=head_modules(model, job.task),
        **job.variant_config(),
    )
    if job.gradient_checkpointing:
        checkpoint_blocks(model)
    return model, tokenizer


def check_variant_runs(job: JobConfig, driver: Driver | None = None) -> None:
    """Refuse, before anything is loaded, a variant that cannot run in ``driver`` (default: the job's own;
    its refusal)."""
    variant = lorakit.get_variant(job.variant)
    config = variant.config_class.from_dict(job.variant_config(), job.variant)
    reason = variant.refusal(driver or job.driver(), config)
    if reason is not None:
        raise CapabilityError(reason)


def open_output(
    job: JobConfig, scale: ScaleOut | None, held: contextlib.ExitStack
) -> tuple[rundir.RunDir, bool]:
    """The job's output directory, locked (until ``held`` closes) and checked before anything is written (see
    :mod:`lorakit.jobs.rundir`), and whether the run resumes (``resume: auto``: whether it holds an
    interrupted run's checkpoint).

    In a distributed run rank 0 alone locks the directory, looks at it and decides; the other ranks take its
    decision, or stop with its error (another run holding the lock, an adapter in the way)."""
    opened: list[rundir.RunDir] = []

    def check() -> bool:
        held.enter_context(rundir.exclusive(job.output_dir))
        resume = rundir.interrupted_run(job.output_dir) if job.resume == "auto" else bool(job.resume)
        opened.append(rundir.open_run_dir(job.output_dir, overwrite=job.overwrite, resume=resume))
        return resume

    resume = check() if scale is None else scale.group.on_main(check)
    return (opened[0] if opened else rundir.locate(job.output_dir)), resume


def check_data(job: JobConfig, model: nn.Module, train_data: D.TokenizedData | None, eval_data: Any) -> None:
    """Refuse, before training, data that would fail later: no examples, fewer training examples than one
    step's batch, or evaluation data the model cannot evaluate (its first batch is run once, as a check)."""
    d = job.data
    for data, source in ((train_data, d.data), (eval_data, d.eval_data or d.data)):
        if data is not None and len(data) == 0:
            raise D.DataError(f"{source} has no examples; check the file and its columns")
    # One process's batch (DP-SGD's expected Poisson batch too); torchrun's global batch counts the ranks,
    # checked when the ranks start.
    if train_data is not None and not job.distributed:
        D.check_one_step(len(train_data), job.train.batch_size, job.train.grad_accum)
    if eval_data is None:
        return
    sample = dataclasses.replace(
        eval_data,
        input_ids=eval_data.input_ids[: eval_batch_size(job)],
        labels=eval_data.labels[: eval_batch_size(job)],
    )
    try:
        evaluate(model, sample, eval_batch_size(job))
    except LorakitError:
        raise
    except Exception as err:  # e.g. a label outside the model's classes
        raise EvaluationError(
            f"the evaluation data {d.eval_data or d.data} cannot be evaluated by this model "
            f"({type(err).__name__}: {_one_line(err)}); fix the data (labels within --num-labels) or "
            "--eval-data before training"
        ) from None


def data_identity(data: D.TokenizedData) -> str:
    """Size and SHA-256 of the tokenised examples: what a resumed run must train on again."""
    digest = hashlib.sha256(json.dumps([data.input_ids, data.labels]).encode()).hexdigest()[:16]
    return f"{len(data)} examples, sha256 {digest}"


def reset_peak_memory() -> None:
    """Start measuring the peak from here (after the model and data are loaded): the CUDA allocator's peak,
    or on Linux the resident high-water mark (``/proc/self/clear_refs``)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def measure_peak_memory_mb() -> float:
    """Peak accelerator memory of this process if on CUDA, else its peak resident memory since
    :func:`reset_peak_memory` (Linux; elsewhere since the process started)."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    with contextlib.suppress(OSError, AttributeError, ValueError):
        status = Path("/proc/self/status").read_text()
        return round(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def run_job(job: JobConfig) -> JobResult:
    """Train and evaluate one job; writes the adapter, ``job.json`` and ``metrics.json`` to its output_dir.

    The process that writes holds the output directory's lock for the whole run, so a second run into it is
    refused at its start. Everything is checked before training. The run is built beside the output directory
    and swapped in once the adapter is saved (:mod:`lorakit.jobs.rundir`), so a failed run never damages an
    adapter already there. The final evaluation runs after the adapter is saved: if it fails, the adapter is
    kept.

    With ``job.distributed`` (under ``torchrun``) every rank runs this and only rank 0 locks and writes.
    """
    if not job.distributed:
        check_one_process()  # not one of several processes torchrun started
    check_variant_runs(job)
    scale = ScaleOut.join(job) if job.distributed else None  # under torchrun: this rank's side of the run
    with contextlib.ExitStack() as held:  # the output directory's lock, from open_output to the end
        if scale is not None:  # a peer process that dies is named as such, not as an error of this one
            held.enter_context(scale.watch())
        return _run_job(job, scale, held)


def _run_job(job: JobConfig, scale: ScaleOut | None, held: contextlib.ExitStack) -> JobResult:
    """:func:`run_job` once the job may run in its driver (and has joined its process group); ``held`` keeps
    the output directory's lock until the run ends."""
    out, resume = open_output(job, scale, held)
    # every label checked before training (the classes size the head); what ran records the resume taken
    job = resolve_task(job)
    job.check_task_settings()  # before any data is read: a setting of the other task would be ignored
    job = dataclasses.replace(resolve_classes(job), resume=resume)
    model, tokenizer = prepare_model(job)
    check_context(job, model)
    train_data, eval_data = build_data(job, tokenizer)
    check_data(job, model, train_data, eval_data)
    if job.privacy.dp:  # a privacy setting the data's size rules out is refused before anything is written
        from lorakit.privacy.dp_sgd import check_job_private

        check_job_private(job, len(train_data))
    identity = data_identity(train_data)
    if scale is not None:  # every rank runs rank 0's job, or all stop here
        scale.agree(job, model, identity, data_identity(eval_data) if eval_data is not None else None)
    writes = scale is None or scale.group.is_main
    staging = rundir.begin(out, resume=job.resume) if writes else out.staging
    if scale is not None:
        scale.group.barrier()  # the staging directory exists before any rank reads a checkpoint there
    try:
        reset_peak_memory()  # the training's peak, not the loading's
        result, decided, started = _train(job, model, train_data, eval_data, staging, scale, identity)
        if scale is not None:  # ranks in sync, base-weight bytes per rank, 4-bit base still packed
            decided = {**decided, **scale.finish(model)}
        if writes:
            _save_run(job, model, out, decided, chat_template(job, tokenizer))
    except BaseException:
        if writes:
            rundir.abandon(out)
        raise
    if writes:
        rundir.commit(out)
    counts = lorakit.summary(model) if scale is None else scale.counts(model)
    job_result = JobResult(
        metrics={},
        trainable=counts.trainable,
        total=counts.total,
        seconds=round(result.seconds, 1),
        steps=result.steps,
        final_loss=result.final_loss,
        adapter_dir=out.shown,
        peak_memory_mb=measure_peak_memory_mb(),
        extra={"wall_seconds": round(time.perf_counter() - started, 1), **decided},
    )
    if result.tokens:  # every process's input tokens (padding excluded)
        job_result.extra["tokens"] = result.tokens
        job_result.extra["tokens_per_second"] = round(result.tokens_per_second, 1)
    for name, data in (("train", train_data), ("eval", eval_data)):
        if data is not None and data.truncation is not None:  # under DP the training data's is withheld
            t = data.truncation
            job_result.extra[f"{name}_answers_cut"] = t.answers_cut
            job_result.extra[f"{name}_examples_left_out"] = t.left_out
    if result.evals and result.evals[-1][0] == result.steps:
        job_result.metrics = result.evals[-1][1]
    elif eval_data is not None:
        try:
            job_result.metrics = evaluate(model, eval_data, eval_batch_size(job))
        except Exception as err:
            raise EvaluationError(
                f"the adapter is saved in {out.shown}, but the final evaluation failed "
                f"({type(err).__name__}: {_one_line(err)}); evaluate it with `lorakit eval --adapter "
                f"{out.shown} --data PATH`"
            ) from None
    if writes:
        metrics_text = json.dumps(job_result.to_dict(), indent=2) + "\n"
        try:
            atomic_write(out.path / rundir.METRICS_FILE, lambda path: Path(path).write_text(metrics_text))
        except OSError as err:
            if not is_disk_full(err):
                raise
            raise DiskFullError(
                f"no space left on {out.shown}: the adapter is saved there, but {rundir.METRICS_FILE} was "
                f"not written; `lorakit eval --adapter {out.shown}` gives its metrics"
            ) from None
    return job_result


def located(job: JobConfig) -> JobConfig:
    """``job`` with the local files it names (model directory, data, chat template) as absolute paths, so
    that ``eval``, ``generate``, ``merge`` and ``export`` find them from any working directory; a name that
    is no local path (``smollm2``, a hub id, ``demo``, ``auto``) stays as given."""

    def absolute(name: str | None, keywords: tuple[str, ...]) -> str | None:
        if not name or name in keywords or not Path(name).expanduser().exists():
            return name
        return str(Path(name).expanduser().resolve())

    d, models = job.data, (*EMBEDDED, *GGUF_MODELS)
    data = dataclasses.replace(
        d,
        data=absolute(d.data, ("demo",)),
        eval_data=absolute(d.eval_data, ("demo",)),
        chat_template=absolute(d.chat_template, ("auto", "none")),
    )
    return dataclasses.replace(job, model=absolute(job.model, models), data=data)


def _save_run(
    job: JobConfig, model: nn.Module, out: rundir.RunDir, decided: dict[str, Any], template: str | None
) -> None:
    """Write ``job.json``, the chat template (if the run used one) and the adapter into the run's staging
    directory; a full disk is named with the resume point that survived it."""
    staging = out.staging
    job_text = json.dumps(dataclasses.asdict(located(job)), indent=2) + "\n"  # what ran, resumed or not
    try:
        atomic_write(staging / rundir.JOB_FILE, lambda path: Path(path).write_text(job_text))
        save_chat_template(staging, template)
        lorakit.save(model, staging, overwrite=True)
        if job.privacy.dp:  # whoever receives the adapter sees whether it was trained privately
            from lorakit.privacy.report import mark_adapter

            mark_adapter(staging, decided)
    except (OSError, LorakitError) as err:
        if not is_disk_full(err):
            raise
        before = f"; the adapter already in {out.shown} is untouched" if rundir.holds_adapter(out) else ""
        raise DiskFullError(
            f"no space left on {staging.parent}: the trained adapter was not saved; "
            f"{resume_point(staging)}{before}"
        ) from None


def _train(
    job: JobConfig,
    model: nn.Module,
    train_data: D.TokenizedData,
    eval_data: Any,
    staging: Path,
    scale: ScaleOut | None,
    identity: str,
) -> tuple[Any, dict[str, Any], float]:
    """Run the job's training driver; evaluations during training only if asked (``eval_every``).
    ``identity``: the training data's (:func:`data_identity`), which a resume must train on again."""
    if scale is None:
        batches = D.BatchSampler(train_data, job.train.batch_size, job.train.seed, group_by_length(job))
    else:
        batches = scale.start(model, train_data, group_by_length(job))
    evaluate_fn = (
        (lambda m: evaluate(m, eval_data, eval_batch_size(job)))
        if eval_data is not None and job.train.eval_every
        else None
    )
    started = time.perf_counter()
    if job.privacy.dp:  # DP-SGD: Poisson sampling, per-example clipping and noise (lorakit.privacy)
        from lorakit.privacy.dp_sgd import train_job_private

        result, decided = train_job_private(job, model, train_data, evaluate_fn)
        return result, decided, started
    # Settings a resume must keep beyond the training config and the adapter's (which the loop records).
    settings = {
        "task": job.task,
        "num_labels": job.num_labels,
        "quantize": job.quantize,
        "training_data": identity,
        "group_by_length": group_by_length(job),  # which examples share a batch, so what each step sees
        # the global batch and the summation order: a checkpoint resumes only in the same layout
        "distributed": job.distributed,
        "world_size": 1 if scale is None else scale.group.world_size,
    }
    result: TrainResult = train(
        model,
        batches,
        job.train,
        evaluate=evaluate_fn,
        output_dir=staging,
        resume=job.resume,
        settings=settings,
        placement=LOCAL if scale is None else scale.group,
    )
    # Stages before the main run (LoRA-drop's selection) ran first; what they decided goes into the report.
    return result, result.decided, started


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]
