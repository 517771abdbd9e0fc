"""The data of a federated run, checked once on the server before any round the way ``lorakit train``
checks it, and each client's partition of it.

The server reads the training and evaluation data, checks every row and reads the classes (class ids, or class
names mapped to ids in sorted order) with the training job's own code
(:func:`lorakit.jobs.job.resolve_classes`), and makes the split among the clients once, so a bad file, a
label outside ``--num-labels`` or more clients than examples stops the run before any client trains. The
classes travel to the clients in every message (:func:`classes_text`); each client recomputes the same split
from the seed and keeps its own part.
"""

from __future__ import annotations

import json
from typing import Any

from lorakit.data import datasets as D
from lorakit.engine import TrainConfig
from lorakit.federated.config import FedConfig
from lorakit.federated.partition import partition
from lorakit.jobs.config import DataConfig, JobConfig
from lorakit.jobs.job import read_data, resolve_classes, tokenize


def job_config(cfg: FedConfig, classes: D.ClassLabels | None = None) -> JobConfig:
    """The model, variant and data part of ``cfg`` as a job (shared with ``lorakit train``); ``classes`` (the
    server's, once read from the data) size the head and name the classes."""
    if classes is None:  # the settings' classes, if any (the server then reads the rest from the data)
        names, count = cfg.label_list(), cfg.num_labels
    else:
        names, count = (list(classes.names) if classes.names is not None else None), classes.count
    return JobConfig(
        model=cfg.model,
        task="classification",  # federated runs tune classifiers (text and label columns)
        num_labels=count,
        labels=names,
        variant=cfg.variant,
        targets=cfg.target_list(),
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        options=cfg.variant_options(),
        data=DataConfig(
            data=cfg.data,
            eval_data=cfg.eval_data if cfg.eval_data not in ("", "clients") else None,
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            max_length=cfg.max_length,
        ),
        train=TrainConfig(seed=cfg.seed, progress=False),
    )


def check_run_data(cfg: FedConfig) -> tuple[JobConfig, list[tuple[str, list[D.Row]]]]:
    """Server side, before any round: the job with its classes read from the training data, after every row of
    the training and evaluation data was checked against them, and the split among the clients made once.
    Under client-level DP the classes come from the settings (``num_labels`` / ``labels``): the clients' data
    is private, and the classes are released with the adapter. Returns the job and ``(source, rows)`` of the
    training and (if any) the server's evaluation data."""
    job = job_config(cfg)
    data = read_data(job)
    if cfg.eval_data == "clients":  # the clients evaluate on their own parts; the server keeps no test split
        data = data[:1]
    job = resolve_classes(job, data, private=cfg.accounted)
    source, rows = data[0]
    split(cfg, job, rows, source)
    return job, data


def split(cfg: FedConfig, job: JobConfig, rows: list[D.Row], source: str) -> list[list[int]]:
    """The clients' partitions of the training rows (deterministic in the seed), by class id."""
    if cfg.clients > len(rows):
        raise D.DataError(
            f"{source} has {len(rows)} example(s), fewer than the {cfg.clients} clients (each needs at least "
            f"one); lower --clients to at most {len(rows)} or give more data"
        )
    labels = job.classes().ids(rows, cfg.label_column, source)
    return partition(labels, cfg.clients, cfg.partition, cfg.skew, cfg.seed)


_PARTS: dict[tuple, D.TokenizedData] = {}


def client_data(cfg: FedConfig, job: JobConfig, tokenizer: Any, partition_id: int) -> D.TokenizedData:
    """This client's part of ``cfg.data``, tokenised with the server's classes: the whole split is recomputed
    from the seed, nothing is sent. Kept for the rounds and clients a process plays."""
    key = (classes_text(job), *(getattr(cfg, k) for k in _DATA_FIELDS), partition_id)
    if key not in _PARTS:
        rows = D.read_rows(cfg.data, split="train")
        mine = split(cfg, job, rows, cfg.data)[partition_id]
        _PARTS[key] = tokenize(job, tokenizer, cfg.data, [rows[i] for i in mine])
    return _PARTS[key]


_DATA_FIELDS = (
    "model",
    "data",
    "text_column",
    "label_column",
    "max_length",
    "clients",
    "partition",
    "skew",
    "seed",
)


def classes_text(job: JobConfig) -> str:
    """The job's classes as the server sends them to the clients (a run config holds no lists)."""
    return json.dumps({"num_labels": job.num_labels, "labels": job.labels})


def client_job(cfg: FedConfig, text: str) -> JobConfig:
    """A client's job: ``cfg`` with the classes the server read from the data (:func:`classes_text`)."""
    sent = json.loads(text)
    names = sent["labels"]
    return job_config(cfg, D.ClassLabels(sent["num_labels"], tuple(names) if names is not None else None))


__all__ = [
    "check_run_data",
    "classes_text",
    "client_data",
    "client_job",
    "job_config",
    "split",
]
