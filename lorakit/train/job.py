"""One fine-tuning job end to end: load model and data, apply a variant, train, evaluate, save.

Shared by ``lorakit train``, ``lorakit eval`` and the benchmarks, so every number is produced the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.core.contract import CapabilityError, Driver
from lorakit.core.variant import VariantConfig
from lorakit.distributed.group import check_one_process
from lorakit.distributed.job import ScaleOut
from lorakit.engine.placement import LOCAL
from lorakit.errors import LorakitError
from lorakit.io import atomic_write
from lorakit.privacy.config import DPConfig
from lorakit.quant_api import check_quant_type
from lorakit.settings import check_settings, check_types, setting
from lorakit.train import data as D
from lorakit.train import rundir
from lorakit.train.loop import TrainConfig, TrainResult, train
from lorakit.train.models import TASKS, head_modules, load_model


@dataclass
class DataConfig:
    """Where the data comes from and how to read it."""

    data: str = setting(
        "demo", "training data: a .tsv/.csv/.jsonl path, a Hugging Face dataset id, or 'demo'"
    )
    eval_data: str | None = setting(None, "evaluation data (default: the test split of 'demo', else none)")
    text_column: str = setting("sentence", "classification text column")
    label_column: str = setting("label", "classification label column (class ids 0, 1, ... or class names)")
    prompt_column: str = setting("prompt", "causal-LM prompt column (no loss on it)")
    response_column: str = setting("response", "causal-LM response column (the loss covers it)")
    max_length: int = setting(64, "tokens per example")
    eval_batch_size: int = setting(128, "examples per evaluation batch")

    def __post_init__(self) -> None:
        check_types(self, "data")
        names = ("data", "text_column", "label_column", "prompt_column", "response_column")
        checks = {name: bool(getattr(self, name).strip()) for name in names}
        checks["eval_data"] = self.eval_data is None or bool(self.eval_data.strip())
        checks |= {"max_length": self.max_length > 0, "eval_batch_size": self.eval_batch_size > 0}
        rules = {name: "a name, not empty" for name in (*names, "eval_data")}
        rules |= {"max_length": "a positive number of tokens", "eval_batch_size": "a positive number"}
        check_settings(self, checks, "data", rules)


@dataclass
class JobConfig:
    """A whole fine-tuning job: model, variant, data and training settings."""

    model: str = setting("minilm", "'minilm' (embedded), a local directory, or a Hugging Face id")
    task: str = setting("classification", "classification | causal-lm")
    num_labels: int | None = setting(
        None, "classes of a classification task (default: from the training data)"
    )
    labels: list[str] | None = setting(
        None, "class names in class-id order when the labels are names (read from the training data)"
    )
    variant: str = setting("lora", "a registered variant name (see `lorakit list`)")
    targets: list[str] | str = setting(
        doc="layers to adapt: comma-separated name suffixes, a regex, or all-linear",
        factory=lambda: ["query", "key", "value", "dense"],
    )
    rank: int = setting(8, "adapter rank r")
    alpha: float = setting(16.0, "scale numerator: the update is scaled by alpha / r")
    dropout: float = setting(0.05, "dropout on the adapter input (never on the base path)")
    options: dict[str, Any] = setting(doc="further variant config fields", factory=dict)
    quantize: str | None = setting(None, "'nf4' stores the frozen linear weights in 4 bits (QLoRA)")
    output_dir: str = setting("runs/lorakit", "where the adapter, metrics.json and checkpoints go")
    overwrite: bool = setting(False, "replace an adapter already in output_dir")
    resume: bool | str = setting(
        False, "continue from output_dir's checkpoint; auto: continue if there is one, else start (restarts)"
    )
    distributed: str | None = setting(
        None,
        "under torchrun: ddp (model replicated) or fsdp (FSDP2, frozen base sharded); batch-size is per rank",
    )
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: DPConfig = field(default_factory=DPConfig)

    def __post_init__(self) -> None:
        check_types(self, "job")
        checks = {
            "model": bool(self.model.strip()),
            "task": self.task in TASKS,
            "num_labels": self.num_labels is None or self.num_labels >= 2,
            "labels": self.labels is None or len(set(self.labels)) == len(self.labels) >= 2,
            "output_dir": bool(self.output_dir.strip()),
            "resume": self.resume in (True, False, "auto"),
        }
        rules = {
            "model": "a model name or path",
            "task": f"one of {', '.join(TASKS)}",
            "num_labels": "at least 2 (lorakit trains no regression heads); unset: counted from the data",
            "labels": "at least 2 distinct class names",
            "output_dir": "a directory path",
            "resume": "true, false or auto",
        }
        check_settings(self, checks, "job", rules)
        if self.quantize is not None:
            check_quant_type(self.quantize)
        self.variant_config()  # the variant's settings are checked now, before anything is read or written

    def variant_config(self) -> VariantConfig:
        """The variant's config from the job's rank, alpha, dropout and options (checked)."""
        config = {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, **self.options}
        return lorakit.get_variant(self.variant).config_class.from_dict(config, self.variant)

    def driver(self) -> Driver:
        """How the job trains, as a variant sees it (:meth:`lorakit.Variant.refusal`)."""
        if self.privacy.dp:
            return Driver.DP_SGD
        return Driver.DISTRIBUTED if self.distributed else Driver.LOOP

    def classes(self) -> D.ClassLabels | None:
        """The classes given or recorded (None until :func:`resolve_classes` counts them in the data)."""
        if self.labels is not None:
            return D.ClassLabels(self.num_labels or len(self.labels), tuple(self.labels))
        return D.ClassLabels(self.num_labels) if self.num_labels is not None else None


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
    eval_source = d.eval_data or ("demo" if d.data == "demo" else None)
    out = [(d.data, D.read_rows(d.data, split="train"))]
    if eval_source is not None:
        out.append((eval_source, D.read_rows(eval_source, split="test")))
    return out


def resolve_classes(job: JobConfig, data: list[tuple[str, list[D.Row]]] | None = None) -> JobConfig:
    """``job`` with its classes read from the training data (the number, and the names of named labels),
    after checking every row of the training and evaluation data against them; before any training, so a
    label problem never costs a run. A causal-LM job is returned as it is."""
    if job.task != "classification":
        return job
    data = read_data(job) if data is None else data
    d = job.data
    classes = job.classes() if job.labels is not None else None
    if classes is None:
        source, rows = data[0]
        classes = D.ClassLabels.from_rows(rows, d.label_column, source, job.num_labels)
    for source, rows in data:
        classes.ids(rows, d.label_column, source)
        D.texts(rows, d.text_column, source)
    labels = list(classes.names) if classes.names is not None else None
    return dataclasses.replace(job, num_labels=classes.count, labels=labels)


def tokenize(job: JobConfig, tokenizer: Any, source: str, rows: list[D.Row]) -> D.TokenizedData:
    """One data set of ``job`` tokenised for its task (classification labels as the job's class ids)."""
    d = job.data
    if job.task == "classification":
        return D.tokenize_classification(
            rows, tokenizer, d.text_column, d.label_column, d.max_length, source, classes=job.classes()
        )
    return D.tokenize_causal(rows, tokenizer, d.prompt_column, d.response_column, d.max_length, source)


def build_data(job: JobConfig, tokenizer: Any) -> tuple[D.TokenizedData, D.TokenizedData | None]:
    """Tokenised training data and evaluation data (if any) for ``job``."""
    data = read_data(job)
    job = resolve_classes(job, data)
    out = [tokenize(job, tokenizer, source, rows) for source, rows in data]
    return out[0], (out[1] if len(out) > 1 else None)


@torch.no_grad()
def evaluate(model: nn.Module, data: D.TokenizedData, batch_size: int = 128) -> dict[str, float]:
    """Accuracy and mean loss (classification) or loss and perplexity (causal LM)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    loss_sum = 0.0
    try:
        for batch in D.eval_batches(data, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            n = batch["labels"].shape[0]
            loss_sum += out.loss.item() * n
            total += n
            if batch["labels"].dim() == 1:
                correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
    finally:  # a failed evaluation must not leave a model that is still training in eval mode
        model.train(was_training)
    if isinstance(data.labels[0], list):
        return {"loss": loss_sum / total, "perplexity": math.exp(min(loss_sum / total, 50))}
    return {"accuracy": correct / total, "loss": loss_sum / total}


def prepare_model(job: JobConfig) -> tuple[nn.Module, Any]:
    """Load the base model, quantise it if asked, and apply the job's variant."""
    torch.manual_seed(job.train.seed)  # the new head's initialisation depends on it
    model, tokenizer = load_model(job.model, job.task, job.num_labels or 2)
    if job.labels is not None:  # the names travel with a merged model
        model.config.id2label = dict(enumerate(job.labels))
        model.config.label2id = {name: i for i, name in enumerate(job.labels)}
    if job.quantize:
        from lorakit.quant_api import quantize

        quantize(model, job.quantize)
    config = {"rank": job.rank, "alpha": job.alpha, "dropout": job.dropout, **job.options}
    lorakit.apply(
        model, job.variant, targets=job.targets, train_modules=head_modules(model, job.task), **config
    )
    return model, tokenizer


def check_variant_runs(job: JobConfig) -> None:
    """Refuse, before anything is loaded, a variant that cannot run in the job's driver (its refusal)."""
    reason = lorakit.get_variant(job.variant).refusal(job.driver(), job.variant_config())
    if reason is not None:
        raise CapabilityError(reason)


def open_output(job: JobConfig, scale: ScaleOut | None) -> tuple[rundir.RunDir, bool]:
    """The job's output directory, checked before anything is written (see :mod:`lorakit.train.rundir`), and
    whether the run resumes (``resume: auto``: whether it holds an interrupted run's checkpoint).

    In a distributed run rank 0 alone looks at the directory and decides (so it alone would hold a lock on
    it); the other ranks take its decision, or stop with its error."""
    opened: list[rundir.RunDir] = []

    def check() -> bool:
        resume = rundir.interrupted_run(job.output_dir) if job.resume == "auto" else bool(job.resume)
        opened.append(rundir.open_run_dir(job.output_dir, overwrite=job.overwrite, resume=resume))
        return resume

    resume = check() if scale is None else scale.group.on_main(check)
    return (opened[0] if opened else rundir.locate(job.output_dir)), resume


def check_data(job: JobConfig, model: nn.Module, train_data: D.TokenizedData, eval_data: Any) -> None:
    """Refuse, before training, data that would fail later: no examples, or evaluation data the model
    cannot evaluate (the first evaluation batch is run once, as a sanity check)."""
    d = job.data
    for data, source in ((train_data, d.data), (eval_data, d.eval_data or d.data)):
        if data is not None and len(data) == 0:
            raise D.DataError(f"{source} has no examples; check the file and its columns")
    if eval_data is None:
        return
    sample = dataclasses.replace(
        eval_data,
        input_ids=eval_data.input_ids[: d.eval_batch_size],
        labels=eval_data.labels[: d.eval_batch_size],
    )
    try:
        evaluate(model, sample, d.eval_batch_size)
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


def measure_peak_memory_mb() -> float:
    """Peak accelerator memory of this process if on CUDA, else its peak resident memory (whole process)."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def run_job(job: JobConfig) -> JobResult:
    """Train and evaluate one job; writes the adapter, ``job.json`` and ``metrics.json`` to its output_dir.

    Everything is checked before training. The run is built beside the output directory and swapped in once
    the adapter is saved (:mod:`lorakit.train.rundir`), so a failed run never damages an adapter already
    there. The final evaluation runs after the adapter is saved: if it fails, the adapter is kept.

    With ``job.distributed`` (under ``torchrun``) every rank runs this and only rank 0 writes.
    """
    if not job.distributed:
        check_one_process()  # not one of several processes torchrun started
    check_variant_runs(job)
    scale = ScaleOut.join(job) if job.distributed else None  # under torchrun: this rank's side of the run
    if scale is None:
        return _run_job(job, None)
    with scale.watch():  # a peer process that dies is named as such, not as an error of this one
        return _run_job(job, scale)


def _run_job(job: JobConfig, scale: ScaleOut | None) -> JobResult:
    """:func:`run_job` once the job may run in its driver (and has joined its process group)."""
    out, resume = open_output(job, scale)
    # every label checked before training (the classes size the head); what ran records the resume taken
    job = dataclasses.replace(resolve_classes(job), resume=resume)
    model, tokenizer = prepare_model(job)
    train_data, eval_data = build_data(job, tokenizer)
    check_data(job, model, train_data, eval_data)
    identity = data_identity(train_data)
    if scale is not None:  # every rank runs rank 0's job, or all stop here
        scale.agree(job, model, identity, data_identity(eval_data) if eval_data is not None else None)
    writes = scale is None or scale.group.is_main
    staging = rundir.begin(out, resume=job.resume) if writes else out.staging
    if scale is not None:
        scale.group.barrier()  # the staging directory exists before any rank reads a checkpoint there
    try:
        result, decided, started = _train(job, model, train_data, eval_data, staging, scale, identity)
        if scale is not None:  # ranks in sync, base-weight bytes per rank, 4-bit base still packed
            decided = {**decided, **scale.finish(model)}
        if writes:
            job_text = json.dumps(dataclasses.asdict(job), indent=2) + "\n"  # what ran, resumed or not
            atomic_write(staging / rundir.JOB_FILE, lambda path: Path(path).write_text(job_text))
            lorakit.save(model, staging, overwrite=True)
            if job.privacy.dp:  # whoever receives the adapter sees whether it was trained privately
                from lorakit.privacy.report import mark_adapter

                mark_adapter(staging, decided)
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
    if result.evals and result.evals[-1][0] == result.steps:
        job_result.metrics = result.evals[-1][1]
    elif eval_data is not None:
        try:
            job_result.metrics = evaluate(model, eval_data, job.data.eval_batch_size)
        except Exception as err:
            raise EvaluationError(
                f"the adapter is saved in {out.shown}, but the final evaluation failed "
                f"({type(err).__name__}: {_one_line(err)}); evaluate it with `lorakit eval --adapter "
                f"{out.shown} --data PATH`"
            ) from None
    if writes:
        metrics_text = json.dumps(job_result.to_dict(), indent=2) + "\n"
        atomic_write(out.path / rundir.METRICS_FILE, lambda path: Path(path).write_text(metrics_text))
    return job_result


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
        batches = D.BatchSampler(train_data, job.train.batch_size, job.train.seed)
    else:
        batches = scale.start(model, train_data)
    evaluate_fn = (
        (lambda m: evaluate(m, eval_data, job.data.eval_batch_size))
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
