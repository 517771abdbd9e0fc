"""The client side: local training on one partition at the server's rank, as a Flower ``ClientApp``.

A client receives the round's part of the global adapter (the rank-``b_t`` slices for DP-DyLoRA) and
``b_t``, fixes that rank with ``set_rank`` (the variant's hook then never resamples), trains ``local_steps``
steps on its own partition in the training engine (every hook runs), and returns only the change of that
part (with DP, nothing else: no loss, no example count). The model and the partition are prepared once per
process and reused across rounds and across the clients a simulation worker plays.

Before the first round the server asks every client to set up (a ``query`` message): the client builds its
model and its partition and answers with its partition id, so the server knows which node holds which part
of the data. A client that fails answers with an error reply carrying a reason code (under DP nothing else;
:mod:`lorakit.federated.failures`) instead of raising.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import lorakit
from lorakit.core.contract import Driver
from lorakit.data import datasets as D
from lorakit.engine import Engine, LossBackward, TrainConfig, TrainResult
from lorakit.federated.config import FedConfig
from lorakit.federated.data import classes_text, client_data, client_job, job_config
from lorakit.federated.failures import CLIENT_FAILED, FederatedError, NodeConfigError, client_reason
from lorakit.federated.strategy import read_space, update_space, use_rank, write_space
from lorakit.jobs.config import JobConfig
from lorakit.jobs.job import evaluate, prepare_model

log = logging.getLogger("lorakit.federated")
_MODELS: dict[str, tuple[nn.Module, Any, dict[str, Tensor]]] = {}


def adapted_model(cfg: FedConfig, job: JobConfig) -> tuple[nn.Module, Any]:
    """The adapted model and tokenizer, built once per process for these settings (same seed everywhere), with
    its trained tensors as they were built and no gradients: nothing an earlier round or client left (in the
    rows above a round's rank, which the server does not send, or in the gradients of a step that failed)
    reaches this round."""
    fields = cfg.to_run_config()
    key = json.dumps([[fields[k] for k in _MODEL_FIELDS], classes_text(job)])
    if key not in _MODELS:
        model, tokenizer = prepare_model(job)
        lorakit.adapters.api.check_driver(model, Driver.FEDERATED)  # before any round trains
        _MODELS[key] = model, tokenizer, read_space(update_space(model, None))
    model, tokenizer, initial = _MODELS[key]
    write_space(update_space(model, None), initial)
    model.zero_grad(set_to_none=True)
    return model, tokenizer


_MODEL_FIELDS = ("model", "variant", "targets", "rank", "alpha", "dropout", "options", "seed")


def train_round(
    cfg: FedConfig, job: JobConfig, partition_id: int, values: dict[str, Tensor], rank: int | None, rnd: int
) -> tuple[dict[str, Tensor], int, dict[str, float]]:
    """Local training for round ``rnd``: returns the update of the round's space, examples, metrics."""
    model, tokenizer = adapted_model(cfg, job)
    data = client_data(cfg, job, tokenizer, partition_id)
    use_rank(model, rank)
    space = update_space(model, rank)
    write_space(space, values)
    before = read_space(space)
    result = local_training(model, data, local_config(cfg, len(data), round_seed(cfg, rnd, partition_id)))
    after = read_space(space)
    update = {n: after[n] - before[n] for n in before}
    return update, len(data), {"train_loss": float(result.final_loss)}


def round_seed(cfg: FedConfig, rnd: int, partition_id: int) -> int:
    """The seed of a client's local training in round ``rnd``: a different data order per round and client,
    within the seeds every library takes (``[0, 2**32)``, as ``--seed``)."""
    return (cfg.seed * 1_000_003 + rnd * 1009 + partition_id) % 2**32


def local_config(cfg: FedConfig, examples: int, seed: int) -> TrainConfig:
    """The training settings of a client's local steps on ``examples`` examples (checked as `lorakit train`
    checks its own, so the server can refuse them before any round)."""
    return TrainConfig(
        steps=cfg.local_steps,
        batch_size=min(cfg.batch_size, examples),
        lr=cfg.lr,
        warmup_ratio=0.0,
        schedule="constant",
        seed=seed,
        progress=False,
    )


def local_training(model: nn.Module, data: D.TokenizedData, local: TrainConfig) -> TrainResult:
    """A client's local steps in the training engine: every hook runs, and a variant that cannot train in a
    federated client is refused before the first step."""
    engine = Engine(model, local, driver=Driver.FEDERATED)
    batches = D.BatchSampler(data, local.batch_size, local.seed)
    return engine.run(LossBackward(model, batches, local), TrainResult(steps=0, seconds=0.0), desc="client")


def evaluate_round(
    cfg: FedConfig, job: JobConfig, partition_id: int, values: dict[str, Tensor]
) -> tuple[int, dict[str, float]]:
    """Accuracy of the global adapter (full rank) on this client's data, at most ``eval_examples`` rows."""
    model, tokenizer = adapted_model(cfg, job)
    data = client_data(cfg, job, tokenizer, partition_id)
    use_rank(model, None)
    write_space(update_space(model, None), values)
    if cfg.eval_examples:
        data = D.TokenizedData(
            data.input_ids[: cfg.eval_examples], data.labels[: cfg.eval_examples], data.pad_id
        )
    return len(data), evaluate(model, data)


def partition_of(context: Any, cfg: FedConfig) -> int:
    """This node's partition id, from its config (the simulation sets ``partition-id`` and
    ``num-partitions``; a deployed SuperNode gets them from ``--node-config``)."""
    node = dict(context.node_config)
    if "partition-id" not in node or "num-partitions" not in node:
        raise NodeConfigError(
            "this SuperNode has no partition: start it with --node-config 'partition-id=I num-partitions=N'"
        )
    pid, parts = int(node["partition-id"]), int(node["num-partitions"])
    if parts != cfg.clients or not 0 <= pid < parts:
        raise NodeConfigError(
            f"this SuperNode holds partition {pid} of {parts}, but the run has clients={cfg.clients}: give "
            "every SuperNode num-partitions equal to clients and a partition-id in [0, clients)"
        )
    return pid


Work = Callable[[FedConfig, JobConfig, int, Any], dict[str, Any]]


def make_client_app(cfg: FedConfig | None = None) -> Any:
    """A Flower ``ClientApp``; with ``cfg`` None the settings come from the run config (deployment)."""
    from lorakit.federated import flower

    app = flower.clientapp.ClientApp()
    records = flower.app

    def answer(msg: Any, context: Any, work: Work) -> Any:
        """Run ``work`` for this node; a failure becomes an error reply with its reason code (under DP the
        code alone: the message of a failed client may quote its data, such as its training losses)."""
        private = True  # until the settings are read, say nothing but the code
        try:
            c = cfg if cfg is not None else FedConfig.from_run_config(dict(context.run_config))
            private = c.private
            job = client_job(c, str(msg.content["config"]["classes"]))
            content = work(c, job, partition_of(context, c), msg)
        except Exception as err:  # answered, not raised: Flower would log the text of an exception
            if not private:
                log.debug("the client failed", exc_info=True)
            return records.Message(records.Error(CLIENT_FAILED, client_reason(err, private)), reply_to=msg)
        return records.Message(records.RecordDict(content), reply_to=msg)

    def setup(c: FedConfig, job: JobConfig, pid: int, msg: Any) -> dict[str, Any]:
        _, tokenizer = adapted_model(c, job)
        client_data(c, job, tokenizer, pid)
        return {"node": records.ConfigRecord({"partition-id": pid})}

    def train(c: FedConfig, job: JobConfig, pid: int, msg: Any) -> dict[str, Any]:
        torch.set_num_threads(1)  # simulation workers share the machine's cores
        conf = msg.content["config"]
        rank = int(conf["rank"]) or None
        values = msg.content["adapter"].to_torch_state_dict()
        update, examples, metrics = train_round(c, job, pid, values, rank, int(conf["round"]))
        # Under DP only the update leaves (the server clips and noises it); the loss and the example count are
        # statistics of this client's data that the accountant does not cover.
        released = {} if c.private else {"num-examples": examples, **metrics}
        return {"update": records.ArrayRecord(update), "metrics": records.MetricRecord(released)}

    def score(c: FedConfig, job: JobConfig, pid: int, msg: Any) -> dict[str, Any]:
        if c.private:  # settings refuse eval_data='clients' under DP; a server that asks anyway gets nothing
            raise FederatedError(
                "under client-level DP a client does not evaluate on its own data (its accuracy and example "
                "count are not covered by the accountant)"
            )
        values = msg.content["adapter"].to_torch_state_dict()
        examples, metrics = evaluate_round(c, job, pid, values)
        return {"metrics": records.MetricRecord({"num-examples": examples, **metrics})}

    app.query()(lambda msg, context: answer(msg, context, setup))
    app.train()(lambda msg, context: answer(msg, context, train))
    app.evaluate()(lambda msg, context: answer(msg, context, score))
    return app


__all__ = [
    "adapted_model",
    "client_data",
    "evaluate_round",
    "job_config",
    "local_config",
    "local_training",
    "make_client_app",
    "train_round",
]
