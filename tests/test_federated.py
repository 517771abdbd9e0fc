"""Federated DP-DyLoRA on Flower: partitions, the server's rank, clipping, noise, accounting, the apps.

Most runs use the real ClientApp and ServerApp objects with an in-process Grid (no Ray, no sockets); the
``slow`` tests run Flower's simulation engine through ``lorakit federate`` and a real deployment
(SuperLink + SuperNodes + ``flwr run``) over 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import random
import re
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

from fed_harness import failed_run, run_local, use_local_engine  # noqa: E402
from flwr.app import ArrayRecord, Error, Message  # noqa: E402

import lorakit  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.common.errors import LorakitError  # noqa: E402
from lorakit.data import datasets as D  # noqa: E402
from lorakit.federated import FedConfig, partition  # noqa: E402
from lorakit.federated.failures import FederatedError  # noqa: E402
from lorakit.federated.server import check_run  # noqa: E402
from lorakit.federated.strategy import DPFedAvg, Reply, draw_rank, sample_cohort, update_space  # noqa: E402
from lorakit.privacy import PrivacyError  # noqa: E402
from lorakit.privacy.accountant import Accountant  # noqa: E402
from lorakit.variants.dylora import set_rank  # noqa: E402

APP_DIR = Path(lorakit.__file__).parent / "federated" / "flwr_app"


@pytest.fixture
def local_engine(monkeypatch) -> list:
    return use_local_engine(monkeypatch)


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


def test_a_delta_of_at_least_one_over_the_clients_is_refused_when_accounted(capsys) -> None:
    """Client-level (epsilon, delta)-DP with delta >= 1/clients may publish one client's data outright."""
    with pytest.raises(PrivacyError, match=r"1/N = 1/4 = 0.25 for N = 4 clients.*--delta below 0.25"):
        FedConfig(clients=4, cohort=2, clip_norm=1.0, noise_multiplier=1.0, delta=0.25)
    with pytest.raises(PrivacyError, match="1/N = 1/4"):
        FedConfig(clients=4, cohort=2, clip_norm=1.0, target_epsilon=5.0, delta=0.5)
    FedConfig(clients=4, cohort=2, clip_norm=1.0, noise_multiplier=1.0, delta=0.2)
    FedConfig(clients=4, cohort=2, clip_norm=1.0, delta=0.5)  # clipping only: no epsilon to qualify
    with pytest.raises(PrivacyError, match="applies to client-level DP, which is off"):
        FedConfig(clients=4, cohort=2, delta=0.5)  # plain FedAvg: a delta would read as a guarantee
    argv = ["federate", "--clients", "2", "--cohort", "2", "--clip-norm", "1", "--noise-multiplier", "1"]
    assert main([*argv, "--delta", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1/N = 1/2 = 0.5 for N = 2 clients" in err


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
    from lorakit.jobs.models import load_model
    from lorakit.train.loop import TrainConfig

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
    from lorakit.data import datasets as D

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
    if "noise_multiplier" in changes or "target_epsilon" in changes:
        values["num_labels"] = 2  # under client-level DP the classes come from the settings
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


def poison_first_update(poisoned: list):
    """A tamper that turns the first update a client sends into NaN (``poisoned`` gets its node id)."""

    def tamper(msg, sent):
        if not poisoned and not msg.has_error() and "update" in msg.content:
            arrays = msg.content["update"].to_torch_state_dict()
            first = next(iter(arrays))
            arrays[first] = torch.full_like(arrays[first], float("nan"))
            msg.content["update"] = ArrayRecord(arrays)
            poisoned.append(msg.metadata.src_node_id)
        return msg

    return tamper


def test_a_nan_update_is_dropped_and_the_round_goes_on(tiny_bert_dir, tmp_path, capsys) -> None:
    poisoned: list = []
    cfg = tiny_cfg(tiny_bert_dir, tmp_path, rounds=2, cohort=4)  # every client every round
    result, _ = run_local(cfg, poison_first_update(poisoned))
    assert result.rounds[0]["dropped"] == 1 and result.rounds[0]["used"] == 3 and len(result.rounds) == 2
    client = poisoned[0] - 101  # the partition that node holds
    assert (
        f"round 1: dropped the update of client {client}: unusable-update: tensor" in capsys.readouterr().out
    )
    state = _saved_tensors(tmp_path / "fed")  # the dropped NaN never reached the global adapter
    assert state and all(torch.isfinite(t).all() for t in state.values())


def test_under_dp_a_dropped_update_is_reported_by_its_code_alone(
    tiny_bert_dir, tmp_path, capsys, caplog
) -> None:
    """Which client failed and how many did are not released under DP: one line with the reason code."""
    poisoned: list = []
    cfg = tiny_cfg(tiny_bert_dir, tmp_path, rounds=2, cohort=4, clip_norm=1.0, noise_multiplier=0.5)
    result, _ = run_local(cfg, poison_first_update(poisoned))
    assert poisoned and len(result.rounds) == 2
    assert all(
        set(entry) == {"round", "rank", "epsilon", "accuracy", "loss", "seconds"} for entry in result.rounds
    )
    out = capsys.readouterr().out
    line = "round 1: client updates were dropped (unusable-update); whose and how many is not released"
    assert line in out and line in caplog.text
    assert "client 0" not in out + caplog.text and "tensor" not in out + caplog.text
    assert "clients" not in out.split("round 1/2")[1]  # the progress line counts no clients
    state = _saved_tensors(tmp_path / "fed")
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

    def listen(msg, sent):
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
    released = {"round", "rank", "epsilon", "accuracy", "loss", "seconds"}  # no cohort size, no counts
    assert all(set(entry) <= released for entry in result.rounds)
    saved = json.loads((Path(cfg.output_dir) / "metrics.json").read_text())
    assert all(set(entry) <= released for entry in saved["rounds"])
    assert "cohort sizes, used and dropped counts" in saved["privacy"]["not_released"]
    out = capsys.readouterr().out
    assert "not released: per-client training losses, example counts" in out and "train_loss" not in out
    plain, _, plain_replies = run_and_listen(
        tiny_cfg(tiny_bert_dir, tmp_path, variant="lora", options="", rounds=1, cohort=4)
    )
    assert plain_replies[0]["metrics"]["train_loss"] > 0 and plain.rounds[0]["train_loss"] > 0  # without DP
    assert (plain.rounds[0]["cohort"], plain.rounds[0]["used"], plain.rounds[0]["dropped"]) == (4, 4, 0)


def test_federated_lora_without_noise_beats_the_base_model(tmp_path) -> None:
    """Plain FedAvg (no clipping, no noise) through the same apps: the embedded model on the demo task."""
    from lorakit.data import datasets as D
    from lorakit.federated.client import job_config
    from lorakit.jobs.job import evaluate, prepare_model

    values = dict(variant="lora", rank=4, targets="query,value", clients=4, cohort=2, sampling="fixed")
    values |= dict(rounds=2, local_steps=5, lr=5e-3, max_length=32)
    cfg = FedConfig(**values, output_dir=str(tmp_path / "fed"))
    model, tok = prepare_model(job_config(cfg))
    test = D.tokenize_classification(D.demo_rows("test"), tok, "sentence", "label", 32, "demo")
    base = evaluate(model, test)["accuracy"]
    result, _ = run_local(cfg)
    assert result.epsilon is None and result.rounds[-1]["rank"] is None
    assert result.metrics["accuracy"] > base + 0.15, (base, result.metrics)


# --- data checked before any round, failures that stop the run --------------------------------------------
def write_rows(path: Path, rows: list[tuple[str, object]]) -> Path:
    path.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    return path


def demo_file(path: Path, count: int, names=None, split: str = "train") -> Path:
    """The first ``count`` demo rows as a TSV file, labels written as ``names[label]`` when given."""
    rows = [(r["sentence"], names[r["label"]] if names else r["label"]) for r in D.demo_rows(split)[:count]]
    return write_rows(path, rows)


def bad_data(case: str, tmp_path: Path) -> tuple[dict, str]:
    """Settings whose data no client could train on, and what the error must say."""
    if case == "missing file":
        return {"data": str(tmp_path / "missing.tsv")}, "missing.tsv does not exist"
    if case == "label above num_labels":
        rows = [("good", 0), ("bad", 1), ("odd", 2), ("fine", 1)]
        path = write_rows(tmp_path / "three.tsv", rows)
        return {"data": str(path), "num_labels": 2}, "label 2 is outside the 2 classes 0..1"
    if case == "more clients than rows":
        path = write_rows(tmp_path / "three.tsv", [("good", 0), ("bad", 1), ("odd", 1)])
        return {
            "data": str(path)
        }, "3 example(s), fewer than the 4 clients (each needs at least one); lower --clients to at most 3"
    if case == "evaluation label outside the classes":
        path = demo_file(tmp_path / "train.tsv", 40, ["neg", "pos"])
        test = write_rows(tmp_path / "test.tsv", [("good", "pos"), ("odd", "meh")])
        return {"data": str(path), "eval_data": str(test)}, "label 'meh' is not one of the classes"
    assert case == "ids and names mixed"
    path = write_rows(tmp_path / "mixed.tsv", [("good", 0), ("bad", "neg"), ("odd", 1), ("fine", 1)])
    return {"data": str(path)}, "mix class ids"


BAD_DATA = [
    "missing file",
    "label above num_labels",
    "more clients than rows",
    "evaluation label outside the classes",
    "ids and names mixed",
]


def cli_args(cfg: FedConfig) -> list[str]:
    """``lorakit federate`` flags for every setting of ``cfg`` that differs from the default."""
    default = FedConfig()
    args = ["federate"]
    for name, value in cfg.to_run_config().items():
        if value != getattr(default, name):
            flag = "--" + name.replace("_", "-")
            args += [flag] if value is True else [flag, str(value)]
    return args


@pytest.mark.parametrize("case", BAD_DATA)
def test_data_no_client_could_train_on_stops_the_run_before_any_round(
    case: str, tiny_bert_dir, tmp_path, local_engine, capsys
) -> None:
    """Checked once, on the server, the way `lorakit train` checks it: one line, exit 2, nothing sent or
    saved (before, every client failed and the run printed "adapter saved", exit 0, an untrained adapter)."""
    changes, expected = bad_data(case, tmp_path)
    cfg = tiny_cfg(tiny_bert_dir, tmp_path, **changes)
    assert main(cli_args(cfg)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit: error: ") and expected in err[0], err
    assert local_engine == [] and not Path(cfg.output_dir).exists()  # checked before the engine started
    error, grid = failed_run(cfg)  # a deployed ServerApp (no `lorakit federate` before it) checks it too
    assert isinstance(error, LorakitError) and expected in str(error)
    assert grid.sent == [] and not Path(cfg.output_dir).exists()


def test_class_names_are_read_as_lorakit_train_reads_them(tiny_bert_dir, tmp_path) -> None:
    """Names sorted into class ids, the head sized by them, the names saved for `lorakit eval`."""
    names = ["neutral", "negative", "positive"]  # the demo's labels 0 and 1 become negative and positive
    data = demo_file(tmp_path / "train.tsv", 120, names[1:])
    rows = data.read_text().splitlines()
    data.write_text("\n".join([*rows, "it is a film .\tneutral", "a film .\tneutral"]) + "\n")
    test = demo_file(tmp_path / "test.tsv", 40, names[1:], split="test")
    cfg = tiny_cfg(tiny_bert_dir, tmp_path, data=str(data), eval_data=str(test), rounds=2, cohort=4)
    result, grid = run_local(cfg)
    assert all(entry["used"] == 4 for entry in result.rounds)  # every client trained in every round
    job = json.loads((Path(cfg.output_dir) / "job.json").read_text())
    assert job["labels"] == sorted(names) and job["num_labels"] == 3
    head = _saved_tensors(Path(cfg.output_dir))
    assert [t.shape[0] for n, t in head.items() if n.startswith("classifier") and t.dim() == 2] == [3]
    sent = {json.dumps(json.loads(m.content["config"]["classes"])) for m in grid.sent}
    assert sent == {json.dumps({"num_labels": 3, "labels": sorted(names)})}  # the server's classes, to all
    assert main(["eval", "--adapter", cfg.output_dir, "--data", str(test)]) == 0


def diverging_cfg(tiny_bert_dir, tmp_path, private: bool) -> FedConfig:
    """Local training that diverges on every client (a learning rate of 1e4)."""
    dp = dict(clip_norm=1.0, noise_multiplier=0.5) if private else {}
    return tiny_cfg(
        tiny_bert_dir, tmp_path, variant="lora", options="", lr=1e4, local_steps=3, cohort=4, **dp
    )


@pytest.mark.parametrize("private", [False, True])
def test_a_round_in_which_every_client_fails_stops_the_run_and_saves_nothing(
    private: bool, tiny_bert_dir, tmp_path, capsys, caplog
) -> None:
    """Before, such a run printed "adapter saved", exit 0, with an untrained adapter."""
    cfg = diverging_cfg(tiny_bert_dir, tmp_path, private)
    error, grid = failed_run(cfg)
    assert isinstance(error, FederatedError) and not Path(cfg.output_dir).exists()
    assert str(error).startswith("round 1: no client update could be used")
    assert str(error).endswith("the run stopped and nothing was saved")
    reasons = [m.error.reason for m in grid.replies if m.has_error()]
    assert len(reasons) == 4 and not any(m.metadata.message_type == "train" for m in grid.sent[4:][4:])
    if not private:  # the first client's own message
        assert "client 0: diverged: DivergedError: training stopped at step 2: the loss is" in str(error)
        return
    # Under DP the clients send a fixed code; their losses reach neither the server nor any output.
    assert set(reasons) == {"lorakit:diverged"}
    released = str(error) + capsys.readouterr().out + caplog.text
    assert "a client reported diverged (a client's local training diverged" in str(error)
    assert "the loss is" not in released and "first step's 0." not in released


def test_under_dp_the_server_keeps_only_a_known_code_of_whatever_a_client_sends(
    tiny_bert_dir, tmp_path, capsys, caplog
) -> None:
    """A client's reply text (here, an old client's message quoting its losses, and a crash's traceback) is
    cut to its code on the server: only ``diverged`` and ``unreported`` are printed."""
    texts = iter(
        [
            "lorakit:diverged: DivergedError: the loss is 1.252e+05, over 1000 times the first step's 0.6966",
            "Traceback (most recent call last): ValueError: row 'my secret sentence'",
        ]
    )

    def tamper(msg, sent):
        if msg.metadata.message_type == "train" and msg.metadata.group_id == "1":
            reason = next(texts, None)
            if reason is not None:
                return Message(Error(code=0, reason=reason), reply_to=sent)
        return msg

    cfg = tiny_cfg(tiny_bert_dir, tmp_path, rounds=1, cohort=4, clip_norm=1.0, noise_multiplier=0.5)
    run_local(cfg, tamper)
    released = capsys.readouterr().out + caplog.text
    assert "round 1: client updates were dropped (diverged, unreported)" in released
    assert "loss is" not in released and "secret" not in released and "Traceback" not in released


def test_settings_a_client_would_refuse_stop_the_run_before_any_round(tiny_bert_dir, tmp_path) -> None:
    with pytest.raises(LorakitError, match="lr=inf"):  # refused where the settings are read
        tiny_cfg(tiny_bert_dir, tmp_path, lr=float("inf"))


def test_a_global_adapter_that_is_no_longer_finite_stops_the_run(tiny_bert_dir, tmp_path) -> None:
    error, grid = failed_run(tiny_cfg(tiny_bert_dir, tmp_path, server_lr=1e300))
    assert isinstance(error, FederatedError) and not Path(tmp_path / "fed").exists()
    assert str(error).startswith("round 1: the global adapter holds NaN or infinite values")
    assert "lower --server-lr" in str(error)


def test_a_client_that_failed_leaves_nothing_behind_for_the_next_one_its_process_plays(
    tiny_bert_dir, tmp_path
) -> None:
    """A process (a simulation worker) keeps its model across clients and runs: a client whose step failed
    left NaN gradients on it, and every later client on that process failed too."""
    failed_run(tiny_cfg(tiny_bert_dir, tmp_path, server_lr=1e30, rounds=2))  # round 2's clients get NaN
    result, _ = run_local(tiny_cfg(tiny_bert_dir, tmp_path, rounds=1))
    assert result.rounds[0]["used"] == 3


def test_an_adapter_in_the_output_directory_is_replaced_only_on_request_and_only_by_a_finished_run(
    tiny_bert_dir, tmp_path, local_engine, capsys
) -> None:
    cfg = tiny_cfg(tiny_bert_dir, tmp_path, rounds=1)
    run_local(cfg)
    out = Path(cfg.output_dir)
    saved = {f.name: f.read_bytes() for f in out.iterdir()}
    assert main(cli_args(cfg)) == 2  # before, the adapter was replaced without a word
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a trained adapter; pass --overwrite to replace it" in err[0]
    assert local_engine == [] and {f.name: f.read_bytes() for f in out.iterdir()} == saved
    diverging = diverging_cfg(tiny_bert_dir, tmp_path, private=False)
    diverging.overwrite = True
    assert main(cli_args(diverging)) == 2  # a run that fails leaves the adapter as it was
    assert "no client update could be used" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == saved
    assert main([*cli_args(cfg), "--seed", "3", "--overwrite"]) == 0
    assert f"adapter saved to {out}" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".fed")) == []  # no staging left


def test_a_run_in_which_no_round_aggregated_saves_nothing(tiny_bert_dir, tmp_path, capsys) -> None:
    """Empty Poisson cohorts in every round, or a budget too small for one round: no training, no adapter."""
    seed = next(s for s in range(100) if not sample_cohort(list(range(4)), POISSON_ONE, random.Random(s * 2)))
    cfg = tiny_cfg(tiny_bert_dir, tmp_path, rounds=1, cohort=1, sampling="poisson", seed=seed)
    error, grid = failed_run(cfg)
    assert isinstance(error, FederatedError) and not Path(cfg.output_dir).exists()
    assert "no client update was aggregated in any of the 1 round(s)" in str(error)
    assert "raise --cohort or --rounds" in str(error) and "round 1/1" in capsys.readouterr().out
    # A budget too small for one round is refused before any client is asked.
    budget = dict(clip_norm=1.0, noise_multiplier=0.3, target_epsilon=0.5, sampling="poisson", cohort=2)
    error, grid = failed_run(tiny_cfg(tiny_bert_dir, tmp_path, **budget))
    assert isinstance(error, PrivacyError) and not Path(cfg.output_dir).exists() and grid.sent == []
    first = Accountant().epsilon_after(1e-5, 0.3, 2 / 4)
    assert first > 0.5 and str(error).startswith(
        f"--target-epsilon 0.5 cannot pay for one round: one round at noise multiplier 0.3 and sample rate "
        f"0.5 spends epsilon {first:.4g}"
    )
    assert "lower --cohort" in str(error)
    with pytest.raises(PrivacyError, match="cannot pay for one round"):  # the simulation is refused alike
        check_run(tiny_cfg(tiny_bert_dir, tmp_path, **budget))
    assert not Path(cfg.output_dir).exists()


@pytest.mark.parametrize(
    ("variant", "why"),
    [
        ("adalora", "prunes its rank budget on one run's data"),
        ("delta_lora", "moves the base weight by state outside its trained factors"),
        ("lora_drop", "runs stages on the training data before the main run"),
    ],
)
def test_variants_whose_rules_federated_rounds_cannot_share_are_refused_first(
    variant: str, why: str, tiny_bert_dir, tmp_path
) -> None:
    """AdaLoRA's pruning mask and Delta-LoRA's moved weight lived on in a client process from one client to
    the next, outside the update the server aggregates: refused before the data is read."""
    options = '{"init_r": 4, "target_r": 2}' if variant == "adalora" else ""
    missing = str(tmp_path / "missing.tsv")
    cfg = tiny_cfg(tiny_bert_dir, tmp_path, variant=variant, options=options, data=missing)
    with pytest.raises(LorakitError, match=f"variant '{variant}' {why}"):
        check_run(cfg)
    assert not Path(cfg.output_dir).exists()


def test_under_client_level_dp_the_classes_come_from_the_settings(tiny_bert_dir, tmp_path) -> None:
    """The clients' labels are private: their number and names are released with the adapter."""
    dp = dict(clip_norm=1.0, noise_multiplier=1.0, sampling="poisson")
    with pytest.raises(PrivacyError, match="takes its classes from the settings.*--num-labels N"):
        check_run(tiny_cfg(tiny_bert_dir, tmp_path, **dp, num_labels=None))
    names = ["negative", "positive"]
    data = demo_file(tmp_path / "train.tsv", 60, names)
    named = dict(data=str(data), eval_data=str(demo_file(tmp_path / "test.tsv", 20, names, split="test")))
    with pytest.raises(D.DataError, match="not shown under DP.*--labels NAMES"):  # names in the data
        check_run(tiny_cfg(tiny_bert_dir, tmp_path, **dp, **named))
    checked = check_run(
        tiny_cfg(tiny_bert_dir, tmp_path, **dp, **named, num_labels=None, labels="negative,positive")
    )
    assert checked.job.labels == names and checked.job.num_labels == 2
    with pytest.raises(LorakitError, match="labels='a,a'.*at least 2 distinct class names"):
        FedConfig(labels="a,a")
    with pytest.raises(D.DataError, match="neutral"):  # a label outside the settings' classes is refused
        check_run(
            tiny_cfg(tiny_bert_dir, tmp_path, **dp, **named, num_labels=None, labels="negative,neutral")
        )
    # Without noise (plain FedAvg, or clipping alone) there is no privacy claim: classes from the data.
    assert check_run(tiny_cfg(tiny_bert_dir, tmp_path, **named)).job.labels == names


POISSON_ONE = FedConfig(clients=4, cohort=1, sampling="poisson")


def test_supernodes_that_hold_the_same_partition_are_refused_before_round_1(tiny_bert_dir, tmp_path) -> None:
    error, grid = failed_run(tiny_cfg(tiny_bert_dir, tmp_path), partitions=[0, 1, 1, 3])
    assert isinstance(error, FederatedError) and "SuperNodes 102 and 103 both hold partition 1" in str(error)
    assert {m.metadata.message_type for m in grid.sent} == {"query"}  # nothing trained


def test_the_insecure_seed_repeats_a_run_whatever_the_node_ids_and_the_reply_order(tiny_bert_dir, tmp_path):
    """Flower's simulation gives its nodes new random ids each run, and replies arrive in any order; the
    cohort is drawn over partitions and the replies summed in partition order, so the runs are identical."""
    dp = dict(clip_norm=0.5, noise_multiplier=0.5, dp_insecure_seed=True)
    cfg = tiny_cfg(tiny_bert_dir, tmp_path, rounds=3, cohort=2, sampling="poisson", **dp)
    runs = []
    for i, node_ids in enumerate([[101, 102, 103, 104], [904, 17, 350, 12]]):
        cfg.output_dir = str(tmp_path / f"run{i}")
        with pytest.warns(UserWarning, match="NOT a guarantee"):
            _, grid = run_local(cfg, node_ids=node_ids, shuffle=random.Random(i))
        partition = {node: p for p, node in enumerate(node_ids)}
        trained = [
            sorted(partition[m.metadata.dst_node_id] for m in grid.sent if m.metadata.group_id == str(rnd))
            for rnd in (1, 2, 3)
        ]
        runs.append((trained, _saved_tensors(Path(cfg.output_dir))))
    (cohorts, first), (again, second) = runs
    assert cohorts == again and len({len(c) for c in cohorts}) > 1  # Poisson cohorts, the same partitions
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)


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
        "--num-labels",
        "2",
        "--output-dir",
        str(out),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "round 1/2  rank" in text and "round 2/2" in text and "epsilon" in text
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["rounds"]) == 2 and saved["epsilon"] > 0 and (out / "adapter.safetensors").exists()


def federate_process(tiny_bert_dir, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``lorakit federate`` on Flower's Ray engine in a process of its own (all it and its workers print)."""
    args = ["--model", str(tiny_bert_dir), "--clients", "3", "--cohort", "2", "--rounds", "2", "--rank", "4"]
    args += ["--local-steps", "2", "--targets", "query,value", "--max-length", "24", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lorakit", "federate", *args, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)


@pytest.mark.slow
def test_a_diverging_dp_simulation_ends_in_one_line_and_prints_no_client_loss(
    tiny_bert_dir, tmp_path
) -> None:
    """Every client diverges on Ray's workers: exit 2, the reason code, nothing saved, and no loss or
    traceback in anything the run and Flower print (before: exit 0, "adapter saved", the losses logged)."""
    out = tmp_path / "diverged"
    run = federate_process(
        tiny_bert_dir,
        out,
        "--lr",
        "1e4",
        "--clip-norm",
        "1.0",
        "--noise-multiplier",
        "0.5",
        "--num-labels",
        "2",
        "--variant",
        "lora",
    )
    printed = run.stdout + run.stderr
    assert run.returncode == 2, printed[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("lorakit:")]
    assert errors == [errors[0]] and "no client update could be used; a client reported diverged" in errors[0]
    assert "the loss is" not in printed and "Traceback" not in printed and "first step's 0." not in printed
    assert not out.exists()


@pytest.mark.slow
def test_two_insecure_seed_simulations_give_identical_adapters(tiny_bert_dir, tmp_path) -> None:
    """Flower's node ids differ between the runs; the cohorts (Poisson, q = 2/3) and the noise do not."""
    flags = ["--clip-norm", "0.5", "--noise-multiplier", "0.5", "--dp-insecure-seed", "--rounds", "3"]
    flags += ["--num-labels", "2"]  # under DP the classes come from the settings
    runs = [federate_process(tiny_bert_dir, tmp_path / f"run{i}", *flags) for i in range(2)]
    for run in runs:
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    first, second = (_saved_tensors(tmp_path / f"run{i}") for i in range(2))
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)


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
        f'noise_multiplier=0.5 num_labels=2 output_dir="{out}"'
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
        assert all("used" not in r and "cohort" not in r for r in saved["rounds"])  # DP: no counts released
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


def test_every_seed_gives_each_round_and_client_its_own_local_seed_in_range() -> None:
    """The local seed of a round and client stays a valid training seed for every --seed (the largest one
    included), and differs between rounds and clients; a seed out of range is refused up front."""
    from lorakit.federated.client import local_config, round_seed

    for top in (0, 4295, 2**32 - 1):
        cfg = FedConfig(seed=top)
        seeds = {(r, p): round_seed(cfg, r, p) for r in range(3) for p in range(3)}
        assert len(set(seeds.values())) == 9 and all(0 <= s < 2**32 for s in seeds.values())
        assert local_config(cfg, 10, seeds[2, 2]).seed == seeds[2, 2]
    for bad in (-1, 2**32):
        with pytest.raises(LorakitError, match=f"seed={bad}: it must be an integer in \\[0, 4294967295\\]"):
            FedConfig(seed=bad)


def test_under_dp_a_client_asked_to_evaluate_on_its_own_data_answers_with_the_code_alone(
    tiny_bert_dir, tmp_path
) -> None:
    # The settings refuse eval_data='clients' under DP; a server that sends evaluate messages anyway must get
    # no accuracy and no example count back.
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    cfg = dp_round_cfg(tiny_bert_dir, tmp_path, insecure=False)
    _, grid = run_local(cfg)
    train = next(m for m in grid.sent if m.metadata.message_type == "train")
    content = RecordDict(
        {"adapter": ArrayRecord(train.content["adapter"].to_torch_state_dict()),
         "config": ConfigRecord({"classes": train.content["config"]["classes"]})}
    )  # fmt: skip
    node = train.metadata.dst_node_id
    ask = Message(content, dst_node_id=node, message_type="evaluate", group_id="eval-x")
    reply = grid.app(ask, grid.contexts[node])
    assert reply.has_error() and not reply.has_content()
    assert re.fullmatch(r"lorakit:[a-z-]+", reply.error.reason)  # the code, and nothing of the data
    plain = tiny_cfg(tiny_bert_dir, tmp_path, variant="lora", options="", rounds=1, cohort=4)
    _, plain_grid = run_local(plain)
    train = next(m for m in plain_grid.sent if m.metadata.message_type == "train")
    content["adapter"] = ArrayRecord(train.content["adapter"].to_torch_state_dict())
    node = train.metadata.dst_node_id
    ask = Message(content, dst_node_id=node, message_type="evaluate", group_id="eval-x")
    answered = plain_grid.app(ask, plain_grid.contexts[node])
    assert not answered.has_error() and answered.content["metrics"]["num-examples"] > 0  # without DP
