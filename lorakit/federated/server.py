"""The server side: rounds of DP-DyLoRA (DP-FedAvg with one server-drawn rank per round) as a Flower
``ServerApp`` (Message API: ``@app.main()`` receives the ``Grid`` that reaches the clients).

Before any round the server checks the data the way ``lorakit train`` does (every row, the classes, the split
among the clients: :func:`lorakit.federated.data.check_run_data`) and asks every client to set up and say
which partition it holds; the cohort is drawn over partitions, never over Flower's node ids (which change from
run to run), so a run in the reproducible mode repeats exactly. Each round: stop if the accountant says one
more round would exceed ``target_epsilon``; sample the cohort; draw ``b_t``; send the round's part of the
adapter and ``b_t``; aggregate the replies, in partition order, with
:class:`~lorakit.federated.strategy.DPFedAvg` (updates with NaN, wrong shapes or errors are dropped); apply
with the server learning rate; record the round with the RDP/PRV accountant (the subsampled Gaussian mechanism
with ``q = C/N`` and ``sigma``); evaluate; print one progress line. A round whose cohort sent no usable update
stops the run with the first failure (:mod:`lorakit.federated.failures`), and a run in which no round
aggregated an update saves nothing.

With DP (``clip_norm > 0``) the noise and the cohort come from ``os.urandom``, never from ``seed`` (which
every client receives in the run config); clients return only their update, a failed client only a reason
code, and the rounds record no per-client statistic and no count of the cohort or of its failures.
``dp_insecure_seed`` makes them reproducible and the run not private (:mod:`lorakit.privacy.randomness`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.core.contract import Driver
from lorakit.core.ranks import round_ranks
from lorakit.data import datasets as D
from lorakit.federated.client import local_config, make_client_app
from lorakit.federated.config import FedConfig
from lorakit.federated.data import check_run_data, classes_text, job_config
from lorakit.federated.failures import Failure, FederatedError, read_reason
from lorakit.federated.strategy import (
    DPFedAvg,
    Reply,
    Space,
    draw_rank,
    read_space,
    sample_cohort,
    update_space,
    use_rank,
    write_space,
)
from lorakit.jobs import rundir
from lorakit.jobs.config import JobConfig
from lorakit.jobs.job import check_data, check_variant_runs, evaluate, located, prepare_model, tokenize
from lorakit.privacy.accountant import Accountant, run_noise
from lorakit.privacy.randomness import (
    NOISE_STREAM,
    SAMPLING_STREAM,
    private_generator,
    private_random,
    warn_insecure,
)
from lorakit.privacy.report import mark_adapter, privacy_record

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
        raise FederatedError(
            f"only {len(nodes)} of {count} clients connected within {timeout:.0f} s; start more SuperNodes "
            "or lower --clients"
        )
    return nodes[:count]


def setup_clients(grid: Any, cfg: FedConfig, nodes: list[int], classes: str) -> dict[int, int]:
    """Ask every client to set up (its model and its partition) and to say which partition it holds; returns
    partition id -> node id. Any client's failure, or a partition held twice, stops the run before round 1."""
    from lorakit.federated import flower

    records = flower.app
    messages = [
        records.Message(
            records.RecordDict({"config": records.ConfigRecord({"classes": classes})}),
            dst_node_id=node,
            message_type=records.MessageType.QUERY,
            group_id="setup",
        )
        for node in nodes
    ]
    holders: dict[int, int] = {}
    failures, answered = [], set()
    answers = grid.send_and_receive(messages, timeout=cfg.round_timeout)
    for msg in sorted(answers, key=lambda m: m.metadata.src_node_id):
        node = msg.metadata.src_node_id
        answered.add(node)
        if msg.has_error():
            failures.append(read_reason(msg.error.reason, cfg.private))
            continue
        pid = int(msg.content["node"]["partition-id"])
        if pid in holders:
            raise FederatedError(
                f"SuperNodes {holders[pid]} and {node} both hold partition {pid}; give every SuperNode its "
                f"own partition-id in [0, {cfg.clients}) with --node-config"
            )
        holders[pid] = node
    failures += [Failure("timeout") for node in nodes if node not in answered]
    if failures:
        raise FederatedError(
            f"a client could not set up before the first round: {failures[0].describe()}; nothing was "
            "trained or saved"
        )
    return holders


@dataclass
class CheckedRun:
    """What :func:`check_run` found: the job (with the classes), the data read, and the output directory."""

    job: JobConfig
    data: list[tuple[str, list[D.Row]]]
    out: rundir.RunDir
    sigma: float  # the noise multiplier of the server's noise (0: none)


def check_run(cfg: FedConfig) -> CheckedRun:
    """What a run checks before any client is asked: the output directory (an adapter there is replaced only
    with ``overwrite``), the data (every row, the classes, the split:
    :func:`~lorakit.federated.data.check_run_data`), the settings of the clients' local training, and that
    a target epsilon pays for one round."""
    check_variant_runs(job_config(cfg), Driver.FEDERATED)  # before the data is read or a client asked
    out = rundir.open_run_dir(cfg.output_dir, overwrite=cfg.overwrite, resume=False, resumable=False)
    job, data = check_run_data(cfg)
    local_config(cfg, cfg.batch_size, cfg.seed)
    return CheckedRun(job, data, out, _noise(cfg))


def _noise(cfg: FedConfig) -> float:
    """The server's noise multiplier: ``cfg.noise_multiplier``, else the one that spends ``target_epsilon``
    in ``rounds`` rounds (refused when one round exceeds it), else 0."""
    return run_noise(
        cfg.noise_multiplier or None,  # 0 with a target is refused by the config; alone it is no noise
        cfg.target_epsilon,
        cfg.delta,
        cfg.sample_rate,
        cfg.rounds,
        cfg.accountant,
        "round",
        "raise --noise-multiplier (or leave it unset: the target then sets it), lower --cohort, or raise "
        "--target-epsilon",
    )


def run_server(
    grid: Any, cfg: FedConfig, report: Callable[[str], None] = print, checked: CheckedRun | None = None
) -> FedResult:
    """All rounds of a federated run over ``grid``; writes the adapter and ``metrics.json`` to output_dir.
    ``checked``: what :func:`check_run` returned for ``cfg`` (else it runs here, before any client is
    asked)."""
    checked = checked if checked is not None else check_run(cfg)
    job, data = checked.job, checked.data
    model, tokenizer = prepare_model(job)  # the server's own copy holds the global adapter
    lorakit.adapters.api.check_driver(model, Driver.FEDERATED)
    evaluate_data = _server_eval_data(cfg, job, tokenizer, data)
    check_data(job, model, None, evaluate_data)
    classes = classes_text(job)
    holders = setup_clients(grid, cfg, wait_for_nodes(grid, cfg.clients, cfg.round_timeout), classes)
    sigma = checked.sigma
    # Noise and cohorts: os.urandom under DP unless --dp-insecure-seed; plain FedAvg (no noise, nothing to
    # protect) keeps its cohorts seeded from --seed, so its runs repeat.
    insecure_seed = cfg.seed if cfg.dp_insecure_seed else None
    cohort_gen = random.Random(cfg.seed * 2)
    if cfg.private:
        report(privacy_line(cfg, sigma))
        if cfg.dp_insecure_seed:
            warn_insecure("this federated run")
        cohort_gen = private_random(SAMPLING_STREAM, insecure_seed)
    aggregator = DPFedAvg(cfg, sigma, private_generator(NOISE_STREAM, insecure_seed))
    rounds = _Rounds(grid, cfg, model, holders, classes, evaluate_data, aggregator, report)
    result = rounds.run_all(sigma, cohort_gen)
    _save(model, cfg, checked, result)
    return result


NOT_RELEASED = (
    "per-client training losses, example counts, update norms and clipping counts; per-round cohort sizes, "
    "used and dropped counts; clients' error messages (only reason codes)"
)


@dataclass
class _Rounds:
    """One run's rounds: the global model, who holds which partition, and what the rounds have done."""

    grid: Any
    cfg: FedConfig
    model: nn.Module
    holders: dict[int, int]  # partition id -> node id
    classes: str
    evaluate_data: D.TokenizedData | None
    aggregator: DPFedAvg
    report: Callable[[str], None]
    aggregated: int = 0  # rounds that applied at least one client update

    def run_all(self, sigma: float, cohort_gen: random.Random) -> FedResult:
        """Every round, until ``cfg.rounds`` or the privacy budget; a run in which no round aggregated a
        client update ends in :class:`FederatedError`."""
        cfg = self.cfg
        accountant = Accountant(cfg.accountant) if cfg.private else None
        result = FedResult(delta=cfg.delta, noise_multiplier=sigma)
        rank_gen = random.Random(cfg.seed * 2 + 1)  # data-independent, and shares nothing with the noise
        ranks = rank_range(self.model)
        for rnd in range(1, cfg.rounds + 1):
            result.stopped = _over_budget(cfg, accountant, sigma, rnd)
            if result.stopped:
                self.report(result.stopped)
                break
            began = time.perf_counter()
            rank = draw_rank(rank_gen, *ranks) if ranks else None
            entry = self.run(rnd, rank, sample_cohort(list(range(cfg.clients)), cfg, cohort_gen))
            if accountant is not None:
                accountant.step(sigma, cfg.sample_rate)
                entry["epsilon"] = accountant.epsilon(cfg.delta)
            if rnd == cfg.rounds or (cfg.eval_every and rnd % cfg.eval_every == 0):
                entry.update(self.evaluate(rnd))
            entry["seconds"] = round(time.perf_counter() - began, 2)
            result.rounds.append(entry)
            self.report(progress_line(entry, cfg))
        if not self.aggregated:
            raise FederatedError(_nothing_trained(cfg, result))
        last = result.rounds[-1]
        if "accuracy" not in last:  # stopped early: evaluate what was trained
            last.update(self.evaluate(last["round"]))
        result.metrics = {k: last[k] for k in ("accuracy", "loss") if k in last}
        if accountant is not None:
            result.epsilon = accountant.epsilon(cfg.delta)
            result.privacy = {
                **privacy_record("dp-fedavg (client-level)", result.epsilon, cfg.delta, cfg.dp_insecure_seed),
                "sampling": f"poisson, q = C/N = {cfg.sample_rate:.4g}",
                "not_released": NOT_RELEASED,
            }
        return result

    def run(self, rnd: int, rank: int | None, cohort: list[int]) -> dict[str, Any]:
        """Send the round's part of the adapter to ``cohort`` (partition ids), aggregate and apply the
        replies; the round's entry (under DP without counts of the cohort or its failures)."""
        space = update_space(self.model, rank)
        values = read_space(space)
        config = {"round": rnd, "rank": rank or 0, "classes": self.classes}
        replies, failures = self._send(values, config, "train", str(rnd), cohort)
        agg = self.aggregator.aggregate(replies, {n: v.shape for n, v in values.items()})
        failures += [
            (client, Failure("unusable-update", "" if self.cfg.private else why))
            for client, why in agg.dropped
        ]
        failures.sort(key=lambda f: f[0])
        if cohort and not agg.used:
            raise FederatedError(self._all_failed(rnd, failures))
        self._report(rnd, failures)
        if agg.used or self.cfg.private:  # DP: a round of noise alone still happens (and is accounted)
            self._apply(rnd, space, {n: values[n] + self.cfg.server_lr * agg.update[n] for n in values})
        self.aggregated += agg.used > 0
        entry: dict[str, Any] = {"round": rnd, "rank": rank}
        if not self.cfg.private:  # under DP these count participants and failures: not released
            entry |= {"cohort": len(cohort), "used": agg.used, "dropped": len(failures)}
            entry["train_loss"] = _mean([r.metrics.get("train_loss") for r in replies])
        return entry

    def _apply(self, rnd: int, space: Space, values: dict[str, torch.Tensor]) -> None:
        """Write the round's new global values; a value that is no longer finite stops the run."""
        write_space(space, values)
        if not all(bool(torch.isfinite(v).all()) for v in values.values()):
            raise FederatedError(
                f"round {rnd}: the global adapter holds NaN or infinite values after the round's update "
                f"(server learning rate {self.cfg.server_lr:g}); lower --server-lr or --lr (or the noise); "
                "the run stopped and nothing was saved"
            )

    def evaluate(self, rnd: int) -> dict[str, float]:
        """Full-rank accuracy on the server's evaluation data, or, with ``eval_data = 'clients'``, the
        example-weighted accuracy the clients measure on their own data (Flower ``evaluate`` messages)."""
        use_rank(self.model, None)
        if self.evaluate_data is not None:
            return evaluate(self.model, self.evaluate_data)
        if self.cfg.eval_data != "clients":
            return {}
        values = read_space(update_space(self.model, None))
        config = {"classes": self.classes}
        replies, failures = self._send(values, config, "evaluate", f"eval-{rnd}", sorted(self.holders))
        for client, failure in failures:  # refused under DP: no client statistic leaves without noise
            log.warning("round %d: evaluation failed on client %s: %s", rnd, client, failure.describe())
        count = sum(r.examples for r in replies)
        totals: dict[str, float] = {}
        for reply in replies:
            for key, value in reply.metrics.items():
                totals[key] = totals.get(key, 0.0) + value * reply.examples
        return {k: v / count for k, v in totals.items()} if count else {}

    def _send(
        self, values: dict[str, Any], config: dict[str, Any], kind: str, group: str, clients: list[int]
    ) -> tuple[list[Reply], list[tuple[int, Failure]]]:
        """Send the adapter part ``values`` to ``clients`` (partition ids); their replies and failures, both
        in partition order (so a sum over them does not depend on the order they arrived in)."""
        from lorakit.federated import flower

        records = flower.app
        messages = [
            records.Message(
                records.RecordDict(
                    {"adapter": records.ArrayRecord(values), "config": records.ConfigRecord(config)}
                ),
                dst_node_id=self.holders[client],
                message_type=kind,
                group_id=group,
            )
            for client in clients
        ]
        partition_of = {node: pid for pid, node in self.holders.items()}
        replies, failures, answered = [], [], set()
        timeout = self.cfg.round_timeout
        for msg in self.grid.send_and_receive(messages, timeout=timeout) if messages else []:
            client = partition_of.get(msg.metadata.src_node_id)
            if client not in clients or client in answered:  # not asked, or a second answer: not used
                continue
            answered.add(client)
            if msg.has_error():
                failures.append((client, read_reason(msg.error.reason, self.cfg.private)))
                continue
            content = msg.content
            metrics = {k: float(v) for k, v in content["metrics"].items()} if "metrics" in content else {}
            examples = int(metrics.pop("num-examples", 0))  # absent under DP: only plain FedAvg weighs by it
            update = content["update"].to_torch_state_dict() if "update" in content else {}
            replies.append(Reply(client, update, examples, metrics))
        failures += [(c, Failure("timeout")) for c in clients if c not in answered]
        return sorted(replies, key=lambda r: r.client), sorted(failures, key=lambda f: f[0])

    def _report(self, rnd: int, failures: list[tuple[int, Failure]]) -> None:
        """Name each dropped update and why; under DP only the reason codes, not whose nor how many."""
        if self.cfg.private and failures:
            codes = ", ".join(sorted({f.code for _, f in failures}))
            lines = [
                f"round {rnd}: client updates were dropped ({codes}); whose and how many is not released"
            ]
        else:
            lines = [f"round {rnd}: dropped the update of client {c}: {f.describe()}" for c, f in failures]
        for line in lines:
            log.warning(line)
            self.report(line)

    def _all_failed(self, rnd: int, failures: list[tuple[int, Failure]]) -> str:
        client, first = failures[0]
        if self.cfg.private:
            return (
                f"round {rnd}: no client update could be used; a client reported {first.describe()} (under "
                "DP the clients send only this code); the run stopped and nothing was saved"
            )
        return (
            f"round {rnd}: no client update could be used; the first failure, client {client}: "
            f"{first.describe()}; the run stopped and nothing was saved"
        )


def _over_budget(cfg: FedConfig, accountant: Accountant | None, sigma: float, rnd: int) -> str | None:
    """Why round ``rnd`` must not run: one more round would spend more than ``target_epsilon``."""
    if accountant is None or not cfg.target_epsilon:
        return None
    ahead = accountant.epsilon_after(cfg.delta, sigma, cfg.sample_rate)
    if ahead <= cfg.target_epsilon:
        return None
    return (
        f"stopped before round {rnd}: it would spend epsilon {ahead:.3f} > target {cfg.target_epsilon} "
        f"(delta {cfg.delta:g})"
    )


def _nothing_trained(cfg: FedConfig, result: FedResult) -> str:
    """Why a run that aggregated no client update saves nothing."""
    if not result.rounds:
        return (
            f"{result.stopped}; no round ran, so nothing was saved: raise --target-epsilon or set a larger "
            "--noise-multiplier"
        )
    return (
        f"no client update was aggregated in any of the {len(result.rounds)} round(s) (each client joins a "
        f"round with probability q = C/N = {cfg.sample_rate:.4g}), so the adapter holds no training and "
        "nothing was saved; raise --cohort or --rounds"
    )


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
    """``round 3/10  rank 5  clients 4/5  epsilon 1.234  accuracy 0.8123  loss 0.4123  (2.1 s)`` (under DP
    without the clients' counts)."""
    parts = [f"round {entry['round']}/{cfg.rounds}"]
    parts.append(f"rank {entry['rank']}" if entry["rank"] else f"rank {cfg.rank} (fixed)")
    if "cohort" in entry:
        parts.append(f"clients {entry['used']}/{entry['cohort']}")
    if "epsilon" in entry:
        parts.append(f"epsilon {entry['epsilon']:.3f}")
    for key in ("accuracy", "loss"):
        if key in entry:
            parts.append(f"{key} {entry[key]:.4f}")
    return "  ".join(parts) + f"  ({entry['seconds']:.1f} s)"


def _server_eval_data(
    cfg: FedConfig, job: JobConfig, tokenizer: Any, data: list[tuple[str, list[D.Row]]]
) -> D.TokenizedData | None:
    """The server's evaluation data (already read and checked with the training data), its first
    ``eval_examples`` rows."""
    if len(data) < 2:
        return None
    source, rows = data[1]
    return tokenize(job, tokenizer, source, rows[: cfg.eval_examples] if cfg.eval_examples else rows)


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _save(model: nn.Module, cfg: FedConfig, checked: CheckedRun, result: FedResult) -> None:
    """Write the adapter, ``job.json`` and ``metrics.json`` beside the output directory and swap them in
    (:mod:`lorakit.jobs.rundir`): an adapter already there is replaced whole or not at all."""
    use_rank(model, None)
    result.adapter_dir = checked.out.shown
    job_text = json.dumps(dataclasses.asdict(located(checked.job)), indent=2) + "\n"  # for `lorakit eval`
    summary = {"config": cfg.to_run_config(), **dataclasses.asdict(result)}
    staging = rundir.begin(checked.out, resume=False)
    try:
        lorakit.save(model, staging, overwrite=True)
        (staging / rundir.JOB_FILE).write_text(job_text)
        (staging / rundir.METRICS_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if result.privacy is not None:
            mark_adapter(staging, result.privacy)
    except BaseException:
        rundir.abandon(checked.out)
        raise
    rundir.commit(checked.out)


def make_server_app(
    cfg: FedConfig | None = None, results: list[Any] | None = None, checked: CheckedRun | None = None
) -> Any:
    """A Flower ``ServerApp``; with ``cfg`` None the settings come from the run config (deployment).
    ``results`` (a list) receives the :class:`FedResult`, or the exception that ended the run; ``checked``:
    what :func:`check_run` returned for ``cfg``, if the caller checked it."""
    from lorakit.federated import flower

    app = flower.serverapp.ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            settings = cfg if cfg is not None else FedConfig.from_run_config(dict(context.run_config))
            result: FedResult | Exception = run_server(grid, settings, checked=checked)
        except Exception as err:  # the simulation engine only logs it: hand it to the caller too
            result = err
            raise
        finally:
            if results is not None:
                results.append(result)

    return app


__all__ = ["FedResult", "make_client_app", "make_server_app", "progress_line", "run_server"]
