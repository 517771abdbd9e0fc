"""The client side: local training on one partition at the server's rank, as a Flower ``ClientApp``.

A client receives the round's part of the global adapter (the rank-``b_t`` slices for DP-DyLoRA) and
``b_t``, fixes that rank with ``set_rank`` (the variant's hook then never resamples), trains ``local_steps``
steps on its own partition in the training engine (every hook runs), and returns only the change of that
part (with DP, nothing else: no loss, no example count). The model and the partition are prepared once per
process and reused across rounds and across the clients a simulation worker plays.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

import lorakit
from lorakit.core.contract import Driver
from lorakit.engine import Engine, LossBackward, TrainConfig, TrainResult
from lorakit.federated.config import FedConfig
from lorakit.federated.partition import partition
from lorakit.federated.strategy import read_space, update_space, use_rank, write_space
from lorakit.train import data as D
from lorakit.train.job import DataConfig, JobConfig, evaluate, prepare_model

_MODELS: dict[str, tuple[nn.Module, Any]] = {}
_DATA: dict[tuple, D.TokenizedData] = {}


def job_config(cfg: FedConfig) -> JobConfig:
    """The model, variant and data part of ``cfg`` as a job (shared with ``lorakit train``)."""
    return JobConfig(
        model=cfg.model,
        num_labels=cfg.num_labels,
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


def adapted_model(cfg: FedConfig) -> tuple[nn.Module, Any]:
    """The adapted model and tokenizer, built once per process for these settings (same seed everywhere)."""
    key = json.dumps({k: v for k, v in cfg.to_run_config().items() if k in _MODEL_FIELDS}, sort_keys=True)
    if key not in _MODELS:
        model, tokenizer = prepare_model(job_config(cfg))
        lorakit.api.check_driver(model, Driver.FEDERATED)  # before any round trains
        _MODELS[key] = model, tokenizer
    return _MODELS[key]


_MODEL_FIELDS = ("model", "num_labels", "variant", "targets", "rank", "alpha", "dropout", "options", "seed")


def client_data(cfg: FedConfig, tokenizer: Any, partition_id: int, num_partitions: int) -> D.TokenizedData:
    """This client's part of ``cfg.data``: the whole split is recomputed from the seed, nothing is sent."""
    key = (cfg.data, cfg.partition, cfg.skew, cfg.seed, partition_id, num_partitions, cfg.max_length)
    if key not in _DATA:
        rows = D.read_rows(cfg.data, split="train")
        labels = [int(v) for v in D.column(rows, cfg.label_column, cfg.data)]
        mine = partition(labels, num_partitions, cfg.partition, cfg.skew, cfg.seed)[partition_id]
        _DATA[key] = D.tokenize_classification(
            [rows[i] for i in mine], tokenizer, cfg.text_column, cfg.label_column, cfg.max_length, cfg.data
        )
    return _DATA[key]


def train_round(
    cfg: FedConfig,
    partition_id: int,
    num_partitions: int,
    values: dict[str, Tensor],
    rank: int | None,
    rnd: int,
) -> tuple[dict[str, Tensor], int, dict[str, float]]:
    """Local training for round ``rnd``: returns the update of the round's space, examples, metrics."""
    model, tokenizer = adapted_model(cfg)
    data = client_data(cfg, tokenizer, partition_id, num_partitions)
    use_rank(model, rank)
    space = update_space(model, rank)
    write_space(space, values)
    before = read_space(space)
    seed = cfg.seed * 1_000_003 + rnd * 1009 + partition_id  # a different data order per round and client
    local = TrainConfig(
        steps=cfg.local_steps,
        batch_size=min(cfg.batch_size, len(data)),
        lr=cfg.lr,
        warmup_ratio=0.0,
        schedule="constant",
        seed=seed,
        progress=False,
    )
    result = local_training(model, data, local)
    after = read_space(space)
    update = {n: after[n] - before[n] for n in before}
    return update, len(data), {"train_loss": float(result.final_loss)}


def local_training(model: nn.Module, data: D.TokenizedData, local: TrainConfig) -> TrainResult:
    """A client's local steps in the training engine: every hook runs, and a variant that cannot train in a
    federated client is refused before the first step."""
    engine = Engine(model, local, driver=Driver.FEDERATED)
    batches = D.BatchSampler(data, local.batch_size, local.seed)
    return engine.run(LossBackward(model, batches, local), TrainResult(steps=0, seconds=0.0), desc="client")


def evaluate_round(
    cfg: FedConfig, partition_id: int, num_partitions: int, values: dict[str, Tensor]
) -> tuple[int, dict[str, float]]:
    """Accuracy of the global adapter (full rank) on this client's data, at most ``eval_examples`` rows."""
    model, tokenizer = adapted_model(cfg)
    data = client_data(cfg, tokenizer, partition_id, num_partitions)
    use_rank(model, None)
    write_space(update_space(model, None), values)
    if cfg.eval_examples:
        data = D.TokenizedData(
            data.input_ids[: cfg.eval_examples], data.labels[: cfg.eval_examples], data.pad_id
        )
    return len(data), evaluate(model, data)


def partition_of(context: Any, cfg: FedConfig) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node's config (the simulation sets both; a deployed
    SuperNode gets them from ``--node-config``)."""
    node = dict(context.node_config)
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError(
            "this SuperNode has no partition: start it with --node-config 'partition-id=I num-partitions=N'"
        )
    pid, parts = int(node["partition-id"]), int(node["num-partitions"])
    if parts != cfg.clients or not 0 <= pid < parts:
        raise ValueError(
            f"this SuperNode holds partition {pid} of {parts}, but the run has clients={cfg.clients}: give "
            "every SuperNode num-partitions equal to clients and a partition-id in [0, clients)"
        )
    return pid, parts


def make_client_app(cfg: FedConfig | None = None) -> Any:
    """A Flower ``ClientApp``; with ``cfg`` None the settings come from the run config (deployment)."""
    from lorakit.federated import flower

    app = flower.clientapp.ClientApp()
    records = flower.app

    def settings(context: Any) -> FedConfig:
        return cfg if cfg is not None else FedConfig.from_run_config(dict(context.run_config))

    @app.train()
    def train_handler(msg: Any, context: Any) -> Any:
        c = settings(context)
        torch.set_num_threads(1)  # simulation workers share the machine's cores
        conf = msg.content["config"]
        rank = int(conf["rank"]) or None
        values = msg.content["adapter"].to_torch_state_dict()
        pid, parts = partition_of(context, c)
        update, examples, metrics = train_round(c, pid, parts, values, rank, int(conf["round"]))
        # Under DP only the update leaves (the server clips and noises it); the loss and the example count are
        # statistics of this client's data that the accountant does not cover.
        released = {} if c.private else {"num-examples": examples, **metrics}
        content = records.RecordDict(
            {"update": records.ArrayRecord(update), "metrics": records.MetricRecord(released)}
        )
        return records.Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_handler(msg: Any, context: Any) -> Any:
        c = settings(context)
        values = msg.content["adapter"].to_torch_state_dict()
        pid, parts = partition_of(context, c)
        examples, metrics = evaluate_round(c, pid, parts, values)
        content = records.RecordDict({"metrics": records.MetricRecord({"num-examples": examples, **metrics})})
        return records.Message(content, reply_to=msg)

    return app


__all__ = [
    "adapted_model",
    "client_data",
    "evaluate_round",
    "job_config",
    "local_training",
    "make_client_app",
    "train_round",
]
