"""The server side: rounds of DP-DyLoRA (DP-FedAvg with one server-drawn rank per round) as a Flower
``ServerApp`` (Message API: ``@app.main()`` receives the ``Grid`` that reaches the clients).

Each round: stop if the accountant says one more round would exceed ``target_epsilon``; sample the cohort;
draw ``b_t``; send the round's part of the adapter and ``b_t``; aggregate the replies with
:class:`~lorakit.federated.strategy.DPFedAvg` (updates with NaN, wrong shapes or errors are dropped, with the
reason logged); apply with the server learning rate; record the round with the RDP/PRV accountant (the
subsampled Gaussian mechanism with ``q = C/N`` and ``sigma``); evaluate; print one progress line.

With DP (``clip_norm > 0``) the noise and the cohort come from ``os.urandom``, never from ``seed`` (which
every client receives in the run config); clients return only their update, and the rounds record no
per-client statistic (no training loss, no clipping count). ``dp_insecure_seed`` makes them reproducible and
the run not private (:mod:`lorakit.privacy.randomness`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

import lorakit
from lorakit.core.contract import Driver
from lorakit.core.ranks import round_ranks
from lorakit.federated.client import job_config, make_client_app
from lorakit.federated.config import FedConfig
from lorakit.federated.strategy import (
    DPFedAvg,
    Reply,
    draw_rank,
    read_space,
    sample_cohort,
    update_space,
    use_rank,
    write_space,
)
from lorakit.privacy.accountant import Accountant, noise_for_budget
from lorakit.privacy.randomness import (
    NOISE_STREAM,
    SAMPLING_STREAM,
    private_generator,
    private_random,
    warn_insecure,
)
from lorakit.privacy.report import mark_adapter, privacy_record
from lorakit.train import data as D
from lorakit.train.job import evaluate, prepare_model

log = logging.getLogger("lorakit.federated")


@dataclass
class FedResult:
    """What a federated run did: one entry per round, and the privacy spent."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    epsilon: float | None = None  # None without DP; inf with clipping but no noise
    delta: float = 0.0
    noise_multiplier: float = 0.0
    stopped: str | None = None  # why it ended before cfg.rounds
    privacy: dict[str, Any] | None = None  # with DP: whether it is private, and where the noise came from
    metrics: dict[str, float] = field(default_factory=dict)  # final evaluation
    adapter_dir: str = ""


def rank_range(model: nn.Module) -> tuple[int, int] | None:
    """``(low, high)`` when the variant trains one server-drawn rank per round (DP-DyLoRA), else None."""
    return round_ranks(model)


def wait_for_nodes(grid: Any, count: int, timeout: float) -> list[int]:
    """The ids of ``count`` connected clients; a clear error if fewer connect within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < count and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = sorted(grid.get_node_ids())
    if len(nodes) < count:
        raise RuntimeError(
            f"only {len(nodes)} of {count} clients connected within {timeout:.0f} s; start more SuperNodes "
            "or lower --clients"
        )
    return nodes[:count]


def run_server(grid: Any, cfg: FedConfig, report: Callable[[str], None] = print) -> FedResult:
    """All rounds of a federated run over ``grid``; writes the adapter and ``metrics.json`` to output_dir."""
    from lorakit.federated import flower

    records = flower.app
    model, tokenizer = prepare_model(job_config(cfg))  # the server's own copy holds the global adapter
    lorakit.api.check_driver(model, Driver.FEDERATED)
    evaluate_data = _server_eval_data(cfg, tokenizer)
    nodes = wait_for_nodes(grid, cfg.clients, cfg.round_timeout)
    sigma = cfg.noise_multiplier or 0.0  # unset: from the target below, else no noise
    if cfg.target_epsilon and not sigma:
        sigma = noise_for_budget(cfg.target_epsilon, cfg.delta, cfg.sample_rate, cfg.rounds, cfg.accountant)
    accountant = Accountant(cfg.accountant) if cfg.private else None
    result = FedResult(delta=cfg.delta, noise_multiplier=sigma)
    ranks = rank_range(model)
    # Noise and cohorts: os.urandom under DP unless --dp-insecure-seed; plain FedAvg (no noise, nothing to
    # protect) keeps its cohorts seeded from --seed, so its runs repeat.
    insecure_seed = cfg.seed if cfg.dp_insecure_seed else None
    cohort_gen = random.Random(cfg.seed * 2)
    if cfg.private:
        report(privacy_line(cfg, sigma))
        if cfg.dp_insecure_seed:
            warn_insecure("this federated run")
        cohort_gen = private_random(SAMPLING_STREAM, insecure_seed)
    rank_gen = random.Random(cfg.seed * 2 + 1)  # data-independent, and shares nothing with the noise
    aggregator = DPFedAvg(cfg, sigma, private_generator(NOISE_STREAM, insecure_seed))
    for rnd in range(1, cfg.rounds + 1):
        began = time.perf_counter()
        if accountant is not None and cfg.target_epsilon:
            ahead = accountant.epsilon_after(cfg.delta, sigma, cfg.sample_rate)
            if ahead > cfg.target_epsilon:
                result.stopped = (
                    f"stopped before round {rnd}: it would spend epsilon {ahead:.3f} > "
                    f"target {cfg.target_epsilon} (delta {cfg.delta:g})"
                )
                report(result.stopped)
                break
        rank = draw_rank(rank_gen, *ranks) if ranks else None
        cohort = sample_cohort(nodes, cfg, cohort_gen)
        space = update_space(model, rank)
        values = read_space(space)
        messages = [
            records.Message(
                records.RecordDict(
                    {
                        "adapter": records.ArrayRecord(values),
                        "config": records.ConfigRecord({"round": rnd, "rank": rank or 0}),
                    }
                ),
                dst_node_id=node,
                message_type=records.MessageType.TRAIN,
                group_id=str(rnd),
            )
            for node in cohort
        ]
        replies, dropped = _collect(grid, messages, cohort, cfg.round_timeout)
        agg = aggregator.aggregate(replies, {n: v.shape for n, v in values.items()})
        dropped += agg.dropped
        for client, reason in dropped:
            log.warning("round %d: dropped the update of client %s: %s", rnd, client, reason)
            report(f"round {rnd}: dropped the update of client {client}: {reason}")
        if agg.used or cfg.private:  # DP: a round of noise alone still happens (and is accounted)
            write_space(space, {n: values[n] + cfg.server_lr * agg.update[n] for n in values})
        if accountant is not None:
            accountant.step(sigma, cfg.sample_rate)
        entry: dict[str, Any] = {
            "round": rnd,
            "rank": rank,
            "cohort": len(cohort),
            "used": agg.used,
            "dropped": len(dropped),
        }
        if accountant is not None:
            entry["epsilon"] = accountant.epsilon(cfg.delta)
        else:  # plain FedAvg: the clients' own training loss (under DP it never leaves a client)
            entry["train_loss"] = _mean([r.metrics.get("train_loss") for r in replies])
        if rnd == cfg.rounds or (cfg.eval_every and rnd % cfg.eval_every == 0):
            entry.update(_evaluate(grid, cfg, model, evaluate_data, nodes, rnd))
        entry["seconds"] = round(time.perf_counter() - began, 2)
        result.rounds.append(entry)
        report(progress_line(entry, cfg))
    if result.rounds and "accuracy" not in result.rounds[-1]:  # stopped early: evaluate what was trained
        result.rounds[-1].update(
            _evaluate(grid, cfg, model, evaluate_data, nodes, result.rounds[-1]["round"])
        )
    result.metrics = {
        k: result.rounds[-1][k] for k in ("accuracy", "loss") if result.rounds and k in result.rounds[-1]
    }
    if accountant is not None:
        result.epsilon = accountant.epsilon(cfg.delta)
        result.privacy = {
            **privacy_record("dp-fedavg (client-level)", result.epsilon, cfg.delta, cfg.dp_insecure_seed),
            "sampling": f"poisson, q = C/N = {cfg.sample_rate:.4g}",
            "not_released": NOT_RELEASED,
        }
    _save(model, cfg, result)
    return result


NOT_RELEASED = "per-client training losses, example counts, update norms and clipping counts"


def privacy_line(cfg: FedConfig, sigma: float) -> str:
    """The run's privacy terms, printed before the first round."""
    source = "derived from the seed: NOT private" if cfg.dp_insecure_seed else "from os.urandom"
    sampling = (
        "every client every round (q = 1)"
        if cfg.sample_rate == 1
        else f"cohorts Poisson-sampled at q = C/N = {cfg.sample_rate:.4g} and accounted as such"
    )
    return (
        f"privacy: client-level DP-FedAvg, clip {cfg.clip_norm}, noise multiplier {sigma:.4f}, {sampling} "
        f"({cfg.accountant}); noise and cohorts {source}; not released: {NOT_RELEASED}"
    )


def progress_line(entry: dict[str, Any], cfg: FedConfig) -> str:
    """``round 3/10  rank 5  clients 4/5  epsilon 1.234  accuracy 0.8123  loss 0.4123  (2.1 s)``."""
    parts = [f"round {entry['round']}/{cfg.rounds}"]
    parts.append(f"rank {entry['rank']}" if entry["rank"] else f"rank {cfg.rank} (fixed)")
    parts.append(f"clients {entry['used']}/{entry['cohort']}")
    if "epsilon" in entry:
        parts.append(f"epsilon {entry['epsilon']:.3f}")
    for key in ("accuracy", "loss"):
        if key in entry:
            parts.append(f"{key} {entry[key]:.4f}")
    return "  ".join(parts) + f"  ({entry['seconds']:.1f} s)"


def _collect(
    grid: Any, messages: list[Any], cohort: list[int], timeout: float
) -> tuple[list[Reply], list[tuple[int, str]]]:
    replies, dropped, answered = [], [], set()
    for msg in grid.send_and_receive(messages, timeout=timeout) if messages else []:
        client = msg.metadata.src_node_id
        answered.add(client)
        if msg.has_error():
            dropped.append((client, f"the client failed: {msg.error.reason}"))
            continue
        metrics = dict(msg.content["metrics"])
        update = msg.content["update"].to_torch_state_dict()
        examples = int(metrics.pop("num-examples", 0))  # absent under DP: only plain FedAvg weighs by it
        replies.append(Reply(client, update, examples, {k: float(v) for k, v in metrics.items()}))
    dropped += [(n, f"no reply within {timeout:.0f} s") for n in cohort if n not in answered]
    return replies, dropped


def _server_eval_data(cfg: FedConfig, tokenizer: Any) -> D.TokenizedData | None:
    source = cfg.eval_data or ("demo" if cfg.data == "demo" else "")
    if not source or source == "clients":
        return None
    rows = D.read_rows(source, split="test")
    if cfg.eval_examples:
        rows = rows[: cfg.eval_examples]
    return D.tokenize_classification(
        rows, tokenizer, cfg.text_column, cfg.label_column, cfg.max_length, source
    )


def _evaluate(
    grid: Any, cfg: FedConfig, model: nn.Module, data: D.TokenizedData | None, nodes: list[int], rnd: int
) -> dict[str, float]:
    """Full-rank accuracy on the server's evaluation data, or, with ``eval_data = 'clients'``, the
    example-weighted accuracy the clients measure on their own data (Flower ``evaluate`` messages)."""
    use_rank(model, None)
    if data is not None:
        return evaluate(model, data)
    if cfg.eval_data != "clients":
        return {}
    from lorakit.federated import flower

    records = flower.app
    values = read_space(update_space(model, None))
    messages = [
        records.Message(
            records.RecordDict({"adapter": records.ArrayRecord(values)}),
            dst_node_id=node,
            message_type=records.MessageType.EVALUATE,
            group_id=f"eval-{rnd}",
        )
        for node in nodes
    ]
    totals: dict[str, float] = {}
    count = 0
    for msg in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        if msg.has_error():
            log.warning(
                "round %d: evaluation failed on client %s: %s", rnd, msg.metadata.src_node_id, msg.error
            )
            continue
        metrics = dict(msg.content["metrics"])
        n = int(metrics.pop("num-examples"))
        count += n
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value) * n
    return {k: v / count for k, v in totals.items()} if count else {}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _save(model: nn.Module, cfg: FedConfig, result: FedResult) -> None:
    out = Path(cfg.output_dir)
    use_rank(model, None)
    lorakit.save(model, out, overwrite=True)
    result.adapter_dir = str(out)
    job = dataclasses.asdict(job_config(cfg))
    (out / "job.json").write_text(json.dumps(job, indent=2) + "\n")  # so `lorakit eval` can load it
    summary = {"config": cfg.to_run_config(), **dataclasses.asdict(result)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if result.privacy is not None:
        mark_adapter(out, result.privacy)


def make_server_app(cfg: FedConfig | None = None, results: list[Any] | None = None) -> Any:
    """A Flower ``ServerApp``; with ``cfg`` None the settings come from the run config (deployment).
    ``results`` (a list) receives the :class:`FedResult`, or the exception that ended the run."""
    from lorakit.federated import flower

    app = flower.serverapp.ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            settings = cfg if cfg is not None else FedConfig.from_run_config(dict(context.run_config))
            result: FedResult | Exception = run_server(grid, settings)
        except Exception as err:  # the simulation engine only logs it: hand it to the caller too
            result = err
            raise
        finally:
            if results is not None:
                results.append(result)

    return app


__all__ = ["FedResult", "make_client_app", "make_server_app", "progress_line", "run_server"]
