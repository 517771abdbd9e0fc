"""Federated DP-DyLoRA on Flower: partitions, the server's rank, clipping, noise, accounting, the apps.

Most runs use the real ClientApp and ServerApp objects with an in-process Grid (no Ray, no sockets); the
``slow`` tests run Flower's simulation engine through ``lorakit federate`` and a real deployment
(SuperLink + SuperNodes + ``flwr run``) over 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="federated tests need lorakit[federated]")

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

import lorakit  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.federated import FedConfig, partition  # noqa: E402
from lorakit.federated.client import make_client_app  # noqa: E402
from lorakit.federated.server import make_server_app  # noqa: E402
from lorakit.federated.strategy import DPFedAvg, Reply, draw_rank, sample_cohort, update_space  # noqa: E402
from lorakit.privacy import PrivacyError  # noqa: E402
from lorakit.privacy.accountant import Accountant  # noqa: E402
from lorakit.variants.dylora import set_rank  # noqa: E402

APP_DIR = Path(lorakit.__file__).parent / "federated" / "flwr_app"


class LocalGrid(Grid):
    """Delivers each message to the real ClientApp in this process, one Context per virtual SuperNode."""

    def __init__(self, client_app, num_nodes: int, tamper=None) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as in a ServerApp process
        self.app, self.tamper, self.sent = client_app, tamper, []
        self.contexts = {
            101 + i: Context(
                run_id=1,
                node_id=101 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError("LocalGrid only answers send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("LocalGrid only answers send_and_receive")

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            try:
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # as Flower does: the failure comes back as an error reply
                reply = Message(Error(code=0, reason=str(err)), reply_to=msg)
            replies.append(self.tamper(reply) if self.tamper else reply)
        return replies


def run_local(cfg: FedConfig, tamper=None):
    results: list = []
    grid = LocalGrid(make_client_app(cfg), cfg.clients, tamper)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    make_server_app(cfg, results)(grid, context)
    assert len(results) == 1 and not isinstance(results[0], Exception), results
    return results[0], grid


# --- partitions, cohorts, ranks ----------------------------------------------------------------------------
def test_partitions_are_disjoint_complete_deterministic_and_skewed_on_request() -> None:
    labels = [i % 2 for i in range(400)]
    for scheme in ("iid", "label-skew"):
        parts = partition(labels, 8, scheme, skew=0.1, seed=3)
        flat = sorted(i for p in parts for i in p)
        assert flat == list(range(400)) and all(parts) and parts == partition(labels, 8, scheme, 0.1, 3)

    def majority(parts):  # mean share of each client's most common label
        return (
            sum(max(sum(labels[i] for i in p), len(p) - sum(labels[i] for i in p)) / len(p) for p in parts)
            / 8
        )

    assert majority(partition(labels, 8, "iid", seed=3)) < 0.6
    assert majority(partition(labels, 8, "label-skew", skew=0.1, seed=3)) > 0.85
    with pytest.raises(ValueError, match="cannot split"):
        partition(labels[:3], 4)


def test_cohort_sampling_and_server_rank_draws() -> None:
    nodes = list(range(100))
    cfg = FedConfig(clients=100, cohort=10, sampling="poisson")
    sizes = [len(sample_cohort(nodes, cfg, random.Random(s))) for s in range(200)]
    assert 9 < sum(sizes) / 200 < 11 and len(set(sizes)) > 3  # Poisson: expected C, varying size
    fixed = FedConfig(clients=100, cohort=10, sampling="fixed")
    assert {len(sample_cohort(nodes, fixed, random.Random(s))) for s in range(20)} == {10}
    gen = random.Random(5)
    draws = [draw_rank(gen, 2, 6) for _ in range(300)]
    assert set(draws) == {2, 3, 4, 5, 6}
    assert draws == [draw_rank(g, 2, 6) for g in [random.Random(5)] for _ in range(300)]  # seeded, no data


def test_secure_noise_and_cohorts_differ_between_runs_and_only_the_insecure_seed_repeats_them() -> None:
    from lorakit.privacy.randomness import NOISE_STREAM, SAMPLING_STREAM, private_generator, private_random

    cfg = FedConfig(clients=100, cohort=50, clip_norm=1.0, noise_multiplier=1.0)
    nodes = list(range(100))

    def noise(seed):
        return flat(DPFedAvg(cfg, 1.0, private_generator(NOISE_STREAM, seed)).aggregate([], SHAPES).update)

    def cohort(seed):
        return sample_cohort(nodes, cfg, private_random(SAMPLING_STREAM, seed))

    assert not torch.equal(noise(None), noise(None)) and cohort(None) != cohort(None)
    assert torch.equal(noise(3), noise(3)) and cohort(3) == cohort(3)
    assert not torch.equal(noise(3), noise(4))


# --- aggregation -----------------------------------------------------------------------------------------
SHAPES = {"a": torch.Size([30, 40]), "b": torch.Size([50])}


def reply(client: int, scale: float, examples: int = 10) -> Reply:
    gen = torch.Generator().manual_seed(client)
    return Reply(client, {n: torch.randn(s, generator=gen) * scale for n, s in SHAPES.items()}, examples)


def flat(update) -> torch.Tensor:
    return torch.cat([update[n].reshape(-1) for n in SHAPES])


def test_clipping_bounds_every_clients_contribution() -> None:
    cfg = FedConfig(clients=10, cohort=4, clip_norm=0.5)
    agg = DPFedAvg(cfg, 0.0, torch.Generator().manual_seed(0))
    replies = [reply(1, 1.0), reply(2, 0.001), reply(3, 5.0)]
    result = agg.aggregate(replies, SHAPES)
    expected = torch.zeros(sum(s.numel() for s in SHAPES.values()))
    for r in replies:
        v = flat(r.update)
        expected += v * min(1.0, 0.5 / float(v.norm()))
    torch.testing.assert_close(flat(result.update) * 4, expected)  # sum of clipped updates / expected C
    assert result.used == 3 and float(flat(replies[2].update).norm()) > 0.5  # clipping really happened
    for r in replies:  # alone, any client moves the model by at most S / C
        alone = agg.aggregate([r], SHAPES)
        assert float(flat(alone.update).norm()) <= 0.5 / 4 + 1e-6
    plain = DPFedAvg(FedConfig(clients=10, cohort=4), 0.0, torch.Generator()).aggregate(replies[:2], SHAPES)
    torch.testing.assert_close(flat(plain.update), (flat(replies[0].update) + flat(replies[1].update)) / 2)


def test_noise_has_the_calibrated_std_on_every_coordinate() -> None:
    sigma, clip, cohort = 1.3, 0.7, 4
    cfg = FedConfig(clients=10, cohort=cohort, clip_norm=clip, noise_multiplier=sigma)
    shapes = {"a": torch.Size([300, 400]), "b": torch.Size([50])}
    result = DPFedAvg(cfg, sigma, torch.Generator().manual_seed(0)).aggregate([], shapes)
    noise = torch.cat([result.update[n].reshape(-1) for n in shapes]) * cohort
    assert abs(float(noise.std()) / (sigma * clip) - 1) < 0.01 and abs(float(noise.mean())) < 0.01
    assert (result.update["b"] != 0).all()  # every coordinate of the update space is noised


def test_an_update_with_nan_is_dropped_with_its_reason() -> None:
    cfg = FedConfig(clients=10, cohort=4, clip_norm=1.0)
    bad = reply(7, 1.0)
    bad.update["b"][3] = float("nan")
    agg = DPFedAvg(cfg, 0.0, torch.Generator())
    result = agg.aggregate([reply(1, 0.1), bad], SHAPES)
    assert result.used == 1 and result.dropped == [(7, "tensor b holds NaN or infinite values")]
    torch.testing.assert_close(flat(result.update), flat(agg.aggregate([reply(1, 0.1)], SHAPES).update))


def test_settings_out_of_range_are_clear_errors(capsys) -> None:
    with pytest.raises(ValueError, match="cohort 12 is larger than the population of 10"):
        FedConfig(clients=10, cohort=12)
    with pytest.raises(PrivacyError, match="delta"):
        FedConfig(delta=1.0)
    with pytest.raises(PrivacyError, match="epsilon"):
        FedConfig(target_epsilon=-2.0, clip_norm=1.0)
    with pytest.raises(PrivacyError, match="clip_norm"):
        FedConfig(noise_multiplier=1.0)
    with pytest.raises(ValueError, match="unknown federated setting"):
        FedConfig.from_run_config({"rounds": 2, "epochs": 3})
    assert main(["federate", "--clients", "3", "--cohort", "5"]) == 2
    assert "larger than the population" in capsys.readouterr().err


def test_variant_fields_are_set_like_train_and_merge_over_options(capsys) -> None:
    from lorakit.cli import build_parser
    from lorakit.federated.config import from_args

    argv = ["federate", "--options", '{"min_rank": 1, "frozen": true}', "--set", "min_rank=3", "--set", "x=a"]
    cfg = from_args(build_parser().parse_args(argv))
    assert cfg.variant_options() == {"min_rank": 3, "frozen": True, "x": "a"}
    assert main(["federate", "--set", "min_rank"]) == 2
    assert "--set expects FIELD=VALUE, got 'min_rank'" in capsys.readouterr().err


def test_the_deployment_app_lists_every_setting_with_its_default() -> None:
    project = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["config"] == FedConfig().to_run_config()
    assert app["components"] == {
        "serverapp": "lorakit.federated.app:server_app",
        "clientapp": "lorakit.federated.app:client_app",
    }
    assert project["project"]["dependencies"] == []  # nothing for `flwr run` to install (torch stays put)


# --- the server's rank, end to end -------------------------------------------------------------------------
def test_dp_dylora_trains_exactly_the_rank_the_round_fixed(tiny_bert_dir) -> None:
    """Paper formula: the rank-b adapter is (alpha/b) B[:, :b] A[:b]; local steps move only that slice."""
    from lorakit.federated.client import local_training
    from lorakit.train.loop import TrainConfig
    from lorakit.train.models import load_model

    model, tok = load_model(str(tiny_bert_dir), "classification")
    lorakit.apply(model, "dp_dylora", targets=["query"], rank=4, alpha=8.0, dropout=0.0, min_rank=1)
    with torch.no_grad():
        for _, layer in lorakit.adapted_layers(model):
            layer.variant.B.normal_()
    set_rank(model, 3)
    layer = lorakit.adapted_layers(model)[0][1]
    v = layer.variant
    torch.testing.assert_close(v.delta_weight(), (8.0 / 3) * v.B[:, :3] @ v.A[:3])
    before = [
        (lay.variant.A.detach().clone(), lay.variant.B.detach().clone())
        for _, lay in lorakit.adapted_layers(model)
    ]
    from lorakit.train import data as D

    data = D.tokenize_classification(D.demo_rows()[:64], tok, "sentence", "label", 24, "demo")
    local_training(model, data, TrainConfig(steps=3, batch_size=16, lr=1e-2, progress=False))
    for (a, b), (_, lay) in zip(before, lorakit.adapted_layers(model), strict=True):
        assert torch.equal(lay.variant.A[3:], a[3:]) and torch.equal(lay.variant.B[:, 3:], b[:, 3:])
        assert not torch.equal(lay.variant.A[:3], a[:3])  # the rank-3 slice trained
    space = update_space(model, 2)
    a_name = next(n for n in space if n.endswith("variant.A"))
    assert space[a_name][0][space[a_name][1]].shape == (2, 32)


def tiny_cfg(tiny_bert_dir, tmp_path, **changes) -> FedConfig:
    values = dict(model=str(tiny_bert_dir), rank=4, options='{"min_rank": 1}', targets="query,value")
    values |= dict(
        clients=4, cohort=3, sampling="fixed", rounds=3, local_steps=2, batch_size=8, max_length=24
    )
    values["output_dir"] = str(tmp_path / "fed")
    return FedConfig(**{**values, **changes})


def test_every_client_of_a_round_gets_and_returns_the_servers_rank(tiny_bert_dir, tmp_path, capsys) -> None:
    cfg = tiny_cfg(tiny_bert_dir, tmp_path, rounds=4)
    result, grid = run_local(cfg)
    ranks = [entry["rank"] for entry in result.rounds]
    gen = random.Random(cfg.seed * 2 + 1)
    assert ranks == [draw_rank(gen, 1, 4) for _ in ranks] and len(set(ranks)) > 1
    for rnd, rank in enumerate(ranks, start=1):
        sent = [m for m in grid.sent if m.metadata.group_id == str(rnd)]
        assert len(sent) == 3 and {int(m.content["config"]["rank"]) for m in sent} == {rank}
        for msg in sent:
            arrays = msg.content["adapter"].to_torch_state_dict()
            a = [t for n, t in arrays.items() if n.endswith("variant.A")]
            b = [t for n, t in arrays.items() if n.endswith("variant.B")]
            assert all(t.shape[0] == rank for t in a) and all(t.shape[1] == rank for t in b)
            assert any(
                n.startswith("classifier") and t.dim() == 2 and t.shape[0] == 2 for n, t in arrays.items()
            )
    assert "round 4/4" in capsys.readouterr().out
    saved = json.loads((tmp_path / "fed" / "metrics.json").read_text())
    assert [r["rank"] for r in saved["rounds"]] == ranks


def test_clients_evaluate_when_the_server_has_no_data(tiny_bert_dir, tmp_path) -> None:
    result, grid = run_local(tiny_cfg(tiny_bert_dir, tmp_path, rounds=1, eval_data="clients"))
    evals = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(evals) == 4  # every client scores the full-rank global adapter on its own data
    assert all(
        v.shape[0] == 4
        for n, v in evals[0].content["adapter"].to_torch_state_dict().items()
        if n.endswith(".A")
    )
    assert 0 <= result.metrics["accuracy"] <= 1 and result.metrics["loss"] > 0


def test_a_nan_update_is_dropped_and_the_round_goes_on(tiny_bert_dir, tmp_path, capsys) -> None:
    poisoned = []

    def tamper(msg):
        if not poisoned and not msg.has_error() and "update" in msg.content:
            arrays = msg.content["update"].to_torch_state_dict()
            first = next(iter(arrays))
            arrays[first] = torch.full_like(arrays[first], float("nan"))
            msg.content["update"] = ArrayRecord(arrays)
            poisoned.append(msg.metadata.src_node_id)
        return msg

    cfg = tiny_cfg(tiny_bert_dir, tmp_path, rounds=2, cohort=4, clip_norm=1.0, noise_multiplier=0.5)
    result, _ = run_local(cfg, tamper)  # q = 1: every client in every round
    assert result.rounds[0]["dropped"] == 1 and result.rounds[0]["used"] == 3 and len(result.rounds) == 2
    assert f"dropped the update of client {poisoned[0]}" in capsys.readouterr().out
    state = _saved_tensors(tmp_path / "fed")  # the dropped NaN never reached the global adapter
    assert state and all(torch.isfinite(t).all() for t in state.values())


def _saved_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter.safetensors"))


def test_a_dp_run_reports_epsilon_each_round_and_stops_at_the_target(tiny_bert_dir, tmp_path, capsys) -> None:
    cfg = tiny_cfg(
        tiny_bert_dir,
        tmp_path,
        rounds=10,
        sampling="poisson",
        clip_norm=0.5,
        noise_multiplier=1.0,
        target_epsilon=6.0,
    )
    result, _ = run_local(cfg)
    eps = [entry["epsilon"] for entry in result.rounds]
    assert 1 <= len(eps) < 10 and all(b > a for a, b in zip(eps, eps[1:], strict=False))
    accountant = Accountant()
    accountant.step(1.0, 3 / 4, len(eps))
    assert eps[-1] == pytest.approx(accountant.epsilon(1e-5)) and eps[-1] <= 6.0
    accountant.step(1.0, 3 / 4)
    assert accountant.epsilon(1e-5) > 6.0  # the round it skipped would have exceeded the target
    out = capsys.readouterr().out
    assert f"stopped before round {len(eps) + 1}" in out and "epsilon" in out and result.stopped
    assert result.epsilon == pytest.approx(eps[-1]) and "accuracy" in result.rounds[-1]
    assert "Poisson-sampled at q = C/N = 0.75 and accounted as such" in out


def test_a_fixed_cohort_or_client_evaluation_under_dp_is_refused_with_the_fix() -> None:
    with pytest.raises(PrivacyError, match="sampling without replacement.*sampling='poisson'"):
        FedConfig(clients=10, cohort=4, sampling="fixed", clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(PrivacyError, match="sampling without replacement"):
        FedConfig(clients=10, cohort=4, sampling="fixed", clip_norm=1.0, target_epsilon=3.0)
    assert FedConfig(clients=4, cohort=4, sampling="fixed", clip_norm=1.0, noise_multiplier=1.0).accounted
    assert not FedConfig(clients=10, cohort=4, sampling="fixed").private  # plain FedAvg: no accounting
    with pytest.raises(PrivacyError, match="eval_data='clients'.*without noise"):
        FedConfig(clip_norm=1.0, noise_multiplier=1.0, eval_data="clients")


def dp_round_cfg(tiny_bert_dir, tmp_path, insecure: bool) -> FedConfig:
    """Two rounds of DP-FedAvg on LoRA (whole tensors every round), every client every round (q = 1)."""
    return tiny_cfg(
        tiny_bert_dir,
        tmp_path,
        variant="lora",
        options="",
        rounds=2,
        cohort=4,
        sampling="poisson",
        clip_norm=0.01,
        noise_multiplier=1.0,
        dp_insecure_seed=insecure,
        output_dir=str(tmp_path / ("insecure" if insecure else "secure")),
    )


def run_and_listen(cfg: FedConfig):
    """Run ``cfg``; returns the result, the grid (what was sent) and every reply as the server got it."""
    replies: list[dict] = []

    def listen(msg):
        if not msg.has_error() and "update" in msg.content:
            replies.append(
                {
                    "update": msg.content["update"].to_torch_state_dict(),
                    "metrics": dict(msg.content["metrics"]),
                }
            )
        return msg

    if cfg.dp_insecure_seed:
        with pytest.warns(UserWarning, match="NOT a guarantee"):
            result, grid = run_local(cfg, listen)
    else:
        result, grid = run_local(cfg, listen)
    return result, grid, replies


@pytest.mark.parametrize("insecure", [True, False])
def test_a_client_recovers_the_sum_of_clipped_updates_only_with_the_insecure_seed(
    tiny_bert_dir, tmp_path, insecure: bool
) -> None:
    """The attack: a client holds the global adapter before and after round 1 (its round-1 and round-2
    messages) and the run's seed (run config, metrics.json); it regenerates round 1's noise as the code
    draws it and subtracts it from the aggregate."""
    from lorakit.privacy.randomness import NOISE_STREAM, derived_seed, gaussian_noise

    cfg = dp_round_cfg(tiny_bert_dir, tmp_path, insecure)
    result, grid, replies = run_and_listen(cfg)
    node = grid.sent[0].metadata.dst_node_id
    before, after = (
        next(
            m.content["adapter"].to_torch_state_dict()
            for m in grid.sent
            if m.metadata.group_id == str(rnd) and m.metadata.dst_node_id == node
        )
        for rnd in (1, 2)
    )
    seed = json.loads((Path(cfg.output_dir) / "metrics.json").read_text())["config"]["seed"]
    generator = torch.Generator().manual_seed(derived_seed(seed, NOISE_STREAM))
    noise = {n: gaussian_noise(t.shape, 1.0 * 0.01, generator) for n, t in before.items()}
    recovered = {n: (after[n] - before[n]) / cfg.server_lr * cfg.cohort - noise[n] for n in before}
    truth = {n: torch.zeros_like(t) for n, t in before.items()}
    for r in replies[: cfg.clients]:  # round 1: the exact sum of clipped updates
        norm = float(torch.cat([t.reshape(-1) for t in r["update"].values()]).norm())
        assert norm > 0.01  # every update is clipped
        for n in truth:
            truth[n] += r["update"][n] * (0.01 / norm)
    error = float(torch.cat([(recovered[n] - truth[n]).reshape(-1) for n in truth]).norm())
    scale = float(torch.cat([t.reshape(-1) for t in truth.values()]).norm())
    noise_norm = float(torch.cat([t.reshape(-1) for t in noise.values()]).norm())
    assert noise_norm > 10 * scale  # the noise hides the sum ...
    if insecure:
        assert error < 0.01 * scale  # ... unless it can be regenerated from the seed
        assert result.privacy["private"] is False
    else:
        assert error > 0.5 * noise_norm
        assert result.privacy["private"] is True
    adapter = json.loads((Path(cfg.output_dir) / "adapter.json").read_text())
    assert adapter["privacy"]["private"] is result.privacy["private"]


def test_under_dp_no_per_client_statistic_reaches_the_server_or_the_files(
    tiny_bert_dir, tmp_path, capsys
) -> None:
    cfg = dp_round_cfg(tiny_bert_dir, tmp_path, insecure=False)
    result, _, replies = run_and_listen(cfg)
    assert len(replies) == 8 and all(r["metrics"] == {} for r in replies)  # only the update leaves a client
    released = {"round", "rank", "cohort", "used", "dropped", "epsilon", "accuracy", "loss", "seconds"}
    assert all(set(entry) <= released for entry in result.rounds)
    saved = json.loads((Path(cfg.output_dir) / "metrics.json").read_text())
    assert all("train_loss" not in entry and "clipped" not in entry for entry in saved["rounds"])
    out = capsys.readouterr().out
    assert "not released: per-client training losses, example counts" in out and "train_loss" not in out
    plain, _, plain_replies = run_and_listen(
        tiny_cfg(tiny_bert_dir, tmp_path, variant="lora", options="", rounds=1, cohort=4)
    )
    assert plain_replies[0]["metrics"]["train_loss"] > 0 and plain.rounds[0]["train_loss"] > 0  # without DP


def test_federated_lora_without_noise_beats_the_base_model(tmp_path) -> None:
    """Plain FedAvg (no clipping, no noise) through the same apps: the embedded model on the demo task."""
    from lorakit.federated.client import job_config
    from lorakit.train import data as D
    from lorakit.train.job import evaluate, prepare_model

    values = dict(variant="lora", rank=4, targets="query,value", clients=4, cohort=2, sampling="fixed")
    values |= dict(rounds=2, local_steps=5, lr=5e-3, max_length=32)
    cfg = FedConfig(**values, output_dir=str(tmp_path / "fed"))
    model, tok = prepare_model(job_config(cfg))
    test = D.tokenize_classification(D.demo_rows("test"), tok, "sentence", "label", 32, "demo")
    base = evaluate(model, test)["accuracy"]
    result, _ = run_local(cfg)
    assert result.epsilon is None and result.rounds[-1]["rank"] is None
    assert result.metrics["accuracy"] > base + 0.15, (base, result.metrics)


# --- Flower's simulation engine and a real deployment (slow) ------------------------------------------------
@pytest.mark.slow
def test_cli_federate_runs_on_flowers_simulation_engine(tiny_bert_dir, tmp_path, capsys) -> None:
    out = tmp_path / "sim"
    args = ["federate", "--model", str(tiny_bert_dir), "--clients", "3", "--cohort", "2", "--rounds", "2"]
    args += ["--local-steps", "2", "--rank", "4", "--targets", "query,value", "--options", '{"min_rank": 1}']
    args += [
        "--max-length",
        "24",
        "--clip-norm",
        "1.0",
        "--noise-multiplier",
        "0.8",
        "--output-dir",
        str(out),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "round 1/2  rank" in text and "round 2/2" in text and "epsilon" in text
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["rounds"]) == 2 and saved["epsilon"] > 0 and (out / "adapter.safetensors").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deployment_superlink_supernodes_and_flwr_run_over_loopback(tiny_bert_dir, tmp_path) -> None:
    """The commands docs/federated.md gives, on 127.0.0.1 only; every wait bounded, every process killed."""
    bin_dir = Path(sys.executable).parent
    link = _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "lorakit-local"\n\n[superlink.lorakit-local]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []

    def start(name: str, *cmd: str) -> None:
        log = (tmp_path / f"{name}.log").open("w")
        # a session of its own, so the whole process group (the SuperExec children too) can be stopped
        procs.append(
            subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True
            )
        )

    out = tmp_path / "adapter"
    run_config = (
        f'model="{tiny_bert_dir}" clients=2 cohort=2 sampling="fixed" rounds=2 local_steps=2 rank=4 '
        f'targets="query,value" options=\'{{"min_rank": 1}}\' max_length=24 clip_norm=1.0 '
        f'noise_multiplier=0.5 output_dir="{out}"'
    )
    try:
        no_install = "--disable-runtime-dependency-installation"
        start("superlink", str(bin_dir / "flower-superlink"), "--insecure", no_install, "--port", str(link))
        for i in range(2):
            node = ["--port", str(_free_port()), "--node-config", f"partition-id={i} num-partitions=2"]
            start(
                f"supernode{i}",
                str(bin_dir / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link}",
                *node,
            )
        command = [
            str(bin_dir / "flwr"),
            "run",
            str(APP_DIR),
            "lorakit-local",
            "--stream",
            "--run-config",
            run_config,
        ]
        run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        assert "round 2/2" in run.stdout, run.stdout[-3000:]
        saved = json.loads((out / "metrics.json").read_text())
        assert [r["round"] for r in saved["rounds"]] == [1, 2] and saved["epsilon"] > 0
        assert all(r["used"] == 2 for r in saved["rounds"])
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
