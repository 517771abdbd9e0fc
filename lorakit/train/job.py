"""One fine-tuning job end to end: load model and data, apply a variant, train, evaluate, save.

Shared by ``lorakit train``, ``lorakit eval`` and the benchmarks, so every number is produced the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.privacy.config import DPConfig
from lorakit.train import data as D
from lorakit.train.loop import TrainConfig, TrainResult, train
from lorakit.train.models import head_modules, load_model


@dataclass
class DataConfig:
    """Where the data comes from and how to read it."""

    data: str = "demo"  # training data: a .tsv/.csv/.jsonl path, a Hugging Face dataset id, or 'demo'
    eval_data: str | None = None  # evaluation data (default: the test split of 'demo', else none)
    text_column: str = "sentence"  # classification text column
    label_column: str = "label"  # classification label column (integers)
    prompt_column: str = "prompt"  # causal-LM prompt column (no loss on it)
    response_column: str = "response"  # causal-LM response column (the loss covers it)
    max_length: int = 64  # tokens per example
    eval_batch_size: int = 128  # examples per evaluation batch


@dataclass
class JobConfig:
    """A whole fine-tuning job: model, variant, data and training settings."""

    model: str = "minilm"  # 'minilm' (embedded), a local directory, or a Hugging Face id
    task: str = "classification"  # classification | causal-lm
    num_labels: int = 2  # classes of a classification task
    variant: str = "lora"  # a registered variant name (see `lorakit list`)
    # layers to adapt: comma-separated name suffixes, a regex, or all-linear
    targets: list[str] | str = field(default_factory=lambda: ["query", "key", "value", "dense"])
    rank: int = 8  # adapter rank r
    alpha: float = 16.0  # scale numerator: the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapter input (never on the base path)
    options: dict[str, Any] = field(default_factory=dict)  # further variant config fields
    quantize: str | None = None  # 'nf4' stores the frozen linear weights in 4 bits (QLoRA)
    output_dir: str = "runs/lorakit"  # where the adapter, metrics.json and checkpoints go
    overwrite: bool = False  # replace an adapter already in output_dir
    resume: bool = False  # continue from output_dir/checkpoint
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: DPConfig = field(default_factory=DPConfig)


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
        return dataclasses.asdict(self)


def build_data(job: JobConfig, tokenizer: Any) -> tuple[D.TokenizedData, D.TokenizedData | None]:
    """Tokenised training data and evaluation data (if any) for ``job``."""
    d = job.data
    eval_source = d.eval_data or ("demo" if d.data == "demo" else None)
    splits = [(d.data, "train"), (eval_source, "test")]
    out = []
    for source, split in splits:
        if source is None:
            out.append(None)
            continue
        rows = D.read_rows(source, split=split)
        if job.task == "classification":
            out.append(
                D.tokenize_classification(
                    rows, tokenizer, d.text_column, d.label_column, d.max_length, source
                )
            )
        else:
            out.append(
                D.tokenize_causal(rows, tokenizer, d.prompt_column, d.response_column, d.max_length, source)
            )
    return out[0], out[1]


@torch.no_grad()
def evaluate(model: nn.Module, data: D.TokenizedData, batch_size: int = 128) -> dict[str, float]:
    """Accuracy and mean loss (classification) or loss and perplexity (causal LM)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    loss_sum = 0.0
    for batch in D.eval_batches(data, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        n = batch["labels"].shape[0]
        loss_sum += out.loss.item() * n
        total += n
        if batch["labels"].dim() == 1:
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
    model.train(was_training)
    if isinstance(data.labels[0], list):
        return {"loss": loss_sum / total, "perplexity": math.exp(min(loss_sum / total, 50))}
    return {"accuracy": correct / total, "loss": loss_sum / total}


def prepare_model(job: JobConfig) -> tuple[nn.Module, Any]:
    """Load the base model, quantise it if asked, and apply the job's variant."""
    torch.manual_seed(job.train.seed)  # the new head's initialisation depends on it
    model, tokenizer = load_model(job.model, job.task, job.num_labels)
    if job.quantize:
        from lorakit.quant_api import quantize

        quantize(model, job.quantize)
    config = {"rank": job.rank, "alpha": job.alpha, "dropout": job.dropout, **job.options}
    lorakit.apply(
        model, job.variant, targets=job.targets, train_modules=head_modules(model, job.task), **config
    )
    return model, tokenizer


def check_output_dir(job: JobConfig) -> Path:
    """The job's output directory, refusing to overwrite a saved adapter unless told to."""
    out = Path(job.output_dir)
    if (out / lorakit.io.CONFIG_FILE).exists() and not (job.overwrite or job.resume):
        raise FileExistsError(
            f"{out} already holds a trained adapter; pass --overwrite to replace it, "
            "--resume to continue, or choose another --output-dir"
        )
    return out


def measure_peak_memory_mb() -> float:
    """Peak accelerator memory of this process if on CUDA, else its peak resident memory (whole process)."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def run_job(job: JobConfig) -> JobResult:
    """Train and evaluate one job; writes the adapter and ``metrics.json`` to ``job.output_dir``."""
    out = check_output_dir(job)
    model, tokenizer = prepare_model(job)
    train_data, eval_data = build_data(job, tokenizer)
    batches = D.BatchSampler(train_data, job.train.batch_size, job.train.seed)
    evaluate_fn = (
        (lambda m: evaluate(m, eval_data, job.data.eval_batch_size)) if eval_data is not None else None
    )
    started = time.perf_counter()
    # A variant with stages before the main run (LoRA-drop's module selection) declares a ``prepare``
    # classmethod: it may rebuild the adapters in place and returns what it decided, for the report.
    prepare = getattr(lorakit.get_variant(job.variant), "prepare", None)
    if job.privacy.dp:  # DP-SGD: Poisson sampling, per-example clipping and noise (lorakit.privacy)
        from lorakit.privacy.dp_sgd import train_job_private

        result, decided = train_job_private(job, model, train_data, evaluate_fn, prepare)
    else:
        decided = prepare(model, batches, job.train) if prepare is not None else {}
        result: TrainResult = train(
            model, batches, job.train, evaluate=evaluate_fn, output_dir=out, resume=job.resume
        )
    counts = lorakit.summary(model)
    lorakit.save(model, out, overwrite=True)  # check_output_dir already refused an unintended overwrite
    if job.privacy.dp:  # whoever receives the adapter sees whether it was trained privately
        from lorakit.privacy.report import mark_adapter

        mark_adapter(out, decided)
    job_result = JobResult(
        metrics=result.evals[-1][1] if result.evals else {},
        trainable=counts.trainable,
        total=counts.total,
        seconds=round(result.seconds, 1),
        steps=result.steps,
        final_loss=result.final_loss,
        adapter_dir=str(out),
        peak_memory_mb=measure_peak_memory_mb(),
        extra={"wall_seconds": round(time.perf_counter() - started, 1), **decided},
    )
    (out / "metrics.json").write_text(json.dumps(job_result.to_dict(), indent=2) + "\n")
    return job_result
