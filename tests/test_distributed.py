"""Data-parallel training with 2 gloo processes on 127.0.0.1: DDP and FSDP2 follow the single process."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_harness import (
    WORLD,
    Jobs,
    Probes,
    free_port,
    job,
    run_ranks,
    spawn_jobs,
    without_dropout,
    write_data,
)
from safetensors.torch import load_file

import lorakit
from lorakit.core.contract import Driver
from lorakit.jobs.job import run_job
from lorakit.jobs.rundir import locate

# Settings that exercise each variant's training rule within 8 steps: AdaLoRA prunes from step 2 and fixes
# its mask at step 6 (a matrix may lose every triplet), DyLoRA samples ranks 1..4, Delta-LoRA moves W from
# step 2, LoRA-drop selects modules in a 2-step stage first.
RULES = {
    "lora": {},
    "dora": {},
    "adalora": {"init_r": 4, "target_r": 2, "t_init": 1, "t_final": 2},
    "dylora": {},
    "delta_lora": {"start_step": 2},
    "lora_drop": {"sample_ratio": 0.25, "sample_steps": 2, "threshold": 0.5},
}
EVERY_VARIANT = {name: RULES.get(name, {}) for name in lorakit.VARIANTS}
EVERY_VARIANT["qlora"] = {"compute_dtype": "float32"}
# DP-DyLoRA trains only in federated runs: every variant that accepts the distributed driver
EVERY_VARIANT = {
    name: options
    for name, options in EVERY_VARIANT.items()
    if lorakit.get_variant(name).refusal(Driver.DISTRIBUTED, lorakit.get_variant(name).config_class()) is None
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    return without_dropout(tiny_bert_dir, root / "bert"), write_data(root / "rows.jsonl")


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / lorakit.adapters.io.WEIGHTS_FILE))


def assert_same_adapter(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-4, atol: float = 1e-6
) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape, key
        if tensor.numel():  # AdaLoRA saves a fully pruned matrix as empty tensors
            torch.testing.assert_close(got[key], tensor, rtol=rtol, atol=atol, msg=key)


def single_process(setup, tmp: Path, variant: str, options: dict, quantize: str | None = None) -> Path:
    """The reference: one process with the same examples in the same micro-batches, each padded on its own
    (the ranks' batch 4, grad-accum 2 x 2 ranks = 4)."""
    model, data = setup
    out = tmp / "single" / variant
    one = job(model, data, out, variant, options, batch_size=4, mode=None, quantize=quantize)
    one.train.grad_accum *= WORLD
    run_job(one)
    return out


def check_matches_single_process(
    setup, tmp_path: Path, mode: str, cases: dict[str, dict], quantize: str | None = None
) -> None:
    """2 ranks x 4 examples x 2 micro-batches end with the adapter of 1 process x 4 examples x 4
    micro-batches; every rank trains on its 4 examples of each global batch, LoRA-drop's stage included."""
    model, data = setup
    jobs = [job(model, data, tmp_path / mode / v, v, o, 4, mode, quantize) for v, o in cases.items()]
    ranks = spawn_jobs(jobs, Probes(batches=True))
    stage = RULES["lora_drop"]["sample_steps"] * 2 if "lora_drop" in cases else 0
    assert ranks[0].batches == ranks[1].batches == [4] * (len(cases) * 8 * 2 + stage)
    for variant, options in cases.items():
        want = adapter(single_process(setup, tmp_path, variant, options, quantize))
        # --quantize nf4 computes the base in bfloat16 (lorakit.quantize's default), where the 1e-8 float
        # differences of the summation order grow (to 1e-4 in LoRA+'s B at its 16x rate, under DDP too)
        tolerance = {"rtol": 1e-2, "atol": 1e-3} if quantize else {}
        assert_same_adapter(adapter(tmp_path / mode / variant), want, **tolerance)
        trained = [k for k, t in want.items() if t.is_floating_point() and t.abs().sum() > 1e-4]
        assert trained, f"{variant}: the saved adapter is all zeros"
        metrics = json.loads((tmp_path / mode / variant / "metrics.json").read_text())
        assert metrics["extra"]["world_size"] == WORLD and metrics["steps"] == 8
        if quantize is not None and mode == "fsdp":  # the 4-bit base sharded: half of 4.5 of 32 bits
            assert 0.12 / WORLD < metrics["extra"]["base_bytes_ratio"] <= 0.135 / WORLD
    if "adalora" in cases:  # same masks: the final budget, target_r x matrices, and the single process's
        ada = adapter(tmp_path / mode / "adalora")
        assert sum(ada[k].numel() for k in ada if k.endswith(".E")) == 2 * 4
    if "lora_drop" in cases:  # one selection, made on rank 0 with the global batch
        kept = [
            json.loads((tmp_path / where / "lora_drop" / "metrics.json").read_text())["extra"]["kept"]
            for where in (mode, "single")
        ]
        assert kept[0] == kept[1] and 0 < len(kept[0]) < 4


def test_ddp_matches_single_process_with_adalora_and_lora_drop(setup, tmp_path):
    check_matches_single_process(
        setup, tmp_path, "ddp", {v: RULES[v] for v in ("lora", "adalora", "lora_drop")}
    )


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "quantize"), [("ddp", None), ("fsdp", None), ("fsdp", "nf4")])
def test_every_variant_matches_single_process(setup, tmp_path, mode, quantize):
    """Every variant, on a dense base and (FSDP2, whose sharding of a 4-bit base is new) on a 4-bit one."""
    cases = EVERY_VARIANT if quantize is None else {v: o for v, o in EVERY_VARIANT.items() if v != "qlora"}
    check_matches_single_process(setup, tmp_path, mode, cases, quantize)


def logits(model_dir: Path, adapter_dir: Path | None, data: Path) -> torch.Tensor:
    """Class scores of a fresh single-process model (with the adapter in ``adapter_dir`` if given)."""
    from lorakit.data.datasets import read_rows, tokenize_classification
    from lorakit.jobs.models import load_model

    model, tokenizer = load_model(str(model_dir), "classification")
    if adapter_dir is not None:
        lorakit.load(model, adapter_dir)
    rows = tokenize_classification(read_rows(str(data)), tokenizer, "sentence", "label", 16, "rows")
    with torch.no_grad():
        return model.eval()(**{k: v for k, v in rows.batch(list(range(16))).items() if k != "labels"}).logits


def test_fsdp2_trains_lora_and_qlora_and_saves_a_whole_adapter(setup, tmp_path, capsys):
    """FSDP2 shards the base, dense or 4-bit, trains the single process's adapter, saves it whole and
    evaluates the sharded model as one process evaluates the saved adapter."""
    from lorakit.cli import main

    model, data = setup
    cases = {"lora": {}, "qlora": {"compute_dtype": "float32"}}
    jobs = [
        job(model, data, tmp_path / "fsdp" / v, v, o, batch_size=4, mode="fsdp") for v, o in cases.items()
    ]
    for one in jobs:
        one.data.eval_data = str(data)
    spawn_jobs(jobs)
    for variant, options in cases.items():
        out = tmp_path / "fsdp" / variant
        reference = single_process(setup, tmp_path, variant, options)
        assert_same_adapter(adapter(out), adapter(reference))  # whole tensors, the single process's values
        got, want, base = logits(model, out, data), logits(model, reference, data), logits(model, None, data)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert (got - base).abs().max() > 1e-3  # the adapter changes the outputs
        extra = json.loads((out / "metrics.json").read_text())["extra"]
        assert extra["distributed"] == "fsdp" and extra["base_fp32_bytes"] > 0
        if variant == "lora":  # dense fp32 base: each rank holds half of it
            assert extra["base_bytes_ratio"] == pytest.approx(1 / WORLD, abs=0.01)
        else:  # NF4 base: packed (4.5 bits of 32), never cast, and each rank holds half of it
            assert 0.12 / WORLD < extra["base_bytes_ratio"] <= 0.135 / WORLD
        got, want = (json.loads((where / "metrics.json").read_text()) for where in (out, reference))
        assert (got["trainable"], got["total"]) == (want["trainable"], want["total"])
        capsys.readouterr()
        assert main(["eval", "--adapter", str(out), "--data", str(data)]) == 0
        assert capsys.readouterr().out.strip() == ", ".join(f"{k} {v:.4f}" for k, v in got["metrics"].items())


# --- one process: sharding, refusals, bytes ---------------------------------------------------------------
def test_ranks_share_out_the_single_process_batches_and_resume_the_same_order():
    from lorakit.data.datasets import BatchSampler, TokenizedData
    from lorakit.distributed import Distributed, ShardedBatchSampler

    data = TokenizedData([[i, i + 1] for i in range(10)], list(range(10)), 0)
    single = BatchSampler(data, 6, seed=3)
    ranks = [ShardedBatchSampler(data, 3, 3, rank, 2) for rank in range(2)]
    for _ in range(4):  # crosses epoch boundaries (10 examples, 6 per global batch)
        want = next(single)["labels"]
        got = torch.cat([next(r)["labels"] for r in ranks])
        assert torch.equal(got, want)
    state = ranks[1].state_dict()
    resumed = ShardedBatchSampler(data, 3, 99, 1, 2)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)["labels"], next(ranks[1])["labels"])
    group = Distributed("ddp", 0, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"10 examples, fewer than one optimizer step's batch of 12"):
        group.sampler(data, 6, 0)
    group.sampler(data, 5, 0)  # exactly one global batch
    with pytest.raises(ValueError, match=r"batch of 12 \(--batch-size 3 x --grad-accum 2 x 2 ranks\)"):
        group.sampler(data, 3, 0, grad_accum=2)


def test_distributed_needs_torchrun_and_refuses_dp_sgd(setup, tmp_path, monkeypatch):
    from lorakit.cli import main
    from lorakit.distributed import LaunchError

    model, data = setup
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LaunchError, match="torchrun --nproc_per_node"):
        run_job(job(model, data, tmp_path / "a", "lora", {}, 4, "ddp"))
    private = job(model, data, tmp_path / "b", "lora", {}, 4, "fsdp")
    private.privacy.dp, private.privacy.noise_multiplier = True, 1.0
    with pytest.raises(ValueError, match="DP-SGD does not run distributed"):
        run_job(private)
    assert main(["train", "--distributed", "zero3", "--output-dir", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "c" / "adapter.json").exists()


def test_base_bytes_of_a_4bit_base_and_its_packed_digest(setup):
    from lorakit.distributed.memory import base_weight_bytes, packed_digest
    from lorakit.jobs.models import load_model

    model, _ = load_model(str(setup[0]), "classification")
    dense = base_weight_bytes(lorakit.apply(model, "lora", targets=["query", "value"]))
    assert dense == {"per_rank": 4 * 4 * 32 * 32, "fp32": 4 * 4 * 32 * 32, "ratio": 1.0}
    model, _ = load_model(str(setup[0]), "classification")
    lorakit.apply(model, "qlora", targets=["query", "value"], rank=4)
    packed = base_weight_bytes(model)
    assert packed["fp32"] == dense["fp32"] and 0.12 < packed["ratio"] <= 0.135
    before = packed_digest(model)
    layer = lorakit.adapted_layers(model)[0][1].base_layer
    layer.weight_packed[0] ^= 1  # one flipped bit in one 4-bit code
    assert packed_digest(model) != before


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``), children first."""
    found: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in map(int, children):
        found += [child, *descendants(child)]
    return found


def train_flags(setup, out: Path, steps: int) -> list[str]:
    """`lorakit train` flags for a 2-rank DDP run of LoRA on the test data (batch 4 per rank)."""
    model, data = setup
    flags = ["--model", str(model), "--data", str(data), "--targets", "query,value", "--rank", "4"]
    flags += ["--alpha", "8", "--dropout", "0", "--lr", "0.02", "--steps", str(steps), "--no-progress"]
    return [*flags, "--max-length", "16", "--output-dir", str(out), "--batch-size", "4"]


def torchrun(flags: list[str], *launcher: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 LAUNCHER -m lorakit train FLAGS``, stderr piped; by default with a static
    rendezvous on 127.0.0.1."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    launcher = launcher or ("--master_addr", "127.0.0.1", "--master_port", str(free_port()))
    command += [*launcher, "-m", "lorakit"]
    return subprocess.Popen(
        [*command, "train", *flags],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def wait_for_checkpoint(run: subprocess.Popen, out: Path) -> Path:
    """The run's checkpoint file, once it exists (the run is built in its staging directory beside the
    output directory, lorakit.jobs.rundir)."""
    checkpoint = locate(out).staging / "checkpoint" / "trainer.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and run.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    return checkpoint


@pytest.mark.slow
def test_a_killed_torchrun_run_resumes_to_the_uninterrupted_adapter(setup, tmp_path):
    out, steps = tmp_path / "killed", 400
    flags = [*train_flags(setup, out, steps), "--checkpoint-every", "5", "--distributed", "ddp"]
    first = torchrun(flags)
    checkpoint = wait_for_checkpoint(first, out)
    # torchrun starts each rank in a session of its own: kill the ranks themselves, then the launcher.
    for pid in [*descendants(first.pid), first.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    first.wait()
    assert not out.exists(), "the run finished before it could be killed"  # it appears when committed
    saved = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < saved < steps
    second = torchrun([*flags, "--resume"])
    _, err = second.communicate(timeout=300)
    errors = [line for line in err.decode().splitlines() if "error" in line.lower()]
    assert second.returncode == 0, "\n".join(errors[:10])
    assert_torchrun_equals_one_process(out, setup, tmp_path, steps)


@pytest.mark.slow
def test_torchrun_restarts_continue_from_the_checkpoint_with_resume_auto(setup, tmp_path):
    """torchrun's own restarts (--max-restarts) rerun the same command: with `--resume auto` the first
    attempt starts, and after one rank is killed the restarted ranks continue from the checkpoint."""
    out, steps = tmp_path / "elastic", 300
    flags = [*train_flags(setup, out, steps), "--checkpoint-every", "5", "--distributed", "ddp"]
    restarts = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # pytorch#135712, docs/distributed.md
    run = torchrun([*flags, "--resume", "auto"], "--standalone", "--max-restarts", "1", env=restarts)
    wait_for_checkpoint(run, out)
    assert run.poll() is None, "the run finished before a rank could be killed"
    os.kill(descendants(run.pid)[-1], signal.SIGKILL)  # one rank, not the launcher
    _, err = run.communicate(timeout=400)
    assert run.returncode == 0, "\n".join(line for line in err.decode().splitlines() if "lorakit" in line)
    assert json.loads((out / "job.json").read_text())["resume"] is True  # the restart resumed
    assert torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)["step"] == steps
    assert_torchrun_equals_one_process(out, setup, tmp_path, steps)


@pytest.mark.slow
def test_torchrun_without_distributed_stops_every_rank_before_it_writes(setup, tmp_path):
    out = tmp_path / "plain"
    run = torchrun(train_flags(setup, out, 4))
    _, err = run.communicate(timeout=300)
    refused = [line for line in err.decode().splitlines() if line.startswith("lorakit: error:")]
    # Every rank refuses; torchrun may stop a rank that has not printed yet once the first has exited.
    assert run.returncode != 0 and 1 <= len(refused) <= WORLD
    assert all("WORLD_SIZE=2" in line and "--distributed ddp" in line for line in refused)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_multi_node_torchrun_form_trains_like_one_process(setup, tmp_path):
    """Two "nodes" on this machine (two torchrun launchers, one process each, c10d rendezvous on 127.0.0.1):
    the form of ``docs/distributed.md``'s several-machine command, giving the single-process adapter."""
    out, steps, port = tmp_path / "nodes", 12, free_port()
    flags = [*train_flags(setup, out, steps), "--distributed", "ddp"]
    nodes = []
    for node in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        command += ["--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-id", "lorakit-test"]
        command += ["--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "lorakit", "train", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        nodes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env))
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err.decode()[-2000:]
    assert_torchrun_equals_one_process(out, setup, tmp_path, steps)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("node_1", "why"),
    [
        ([], "the job is not distributed"),  # --distributed left out on one node
        (["--distributed", "ddp", "--dp", "--noise-multiplier", "1"], "DP-SGD does not run distributed"),
        (["--distributed", "ddp", "--no-such-flag"], "its command line was refused"),
    ],
)
def test_a_node_refusing_its_command_stops_the_others_with_its_reason(setup, tmp_path, node_1, why):
    """One launcher per node, as on several machines: no launcher stops the others when a node's process
    exits before the group forms, so node 0 waited in it for the group's timeout (30 minutes)."""
    out, port = tmp_path / "nodes", free_port()
    flags = [*train_flags(setup, out, 4)]
    nodes = []
    for node, extra in enumerate([["--distributed", "ddp"], node_1]):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        command += ["--node-rank", str(node), "--rdzv-backend", "static", "--master-addr", "127.0.0.1"]
        command += ["--master-port", str(port), "-m", "lorakit", "train", *flags, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        nodes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env))
    errs = [node.communicate(timeout=240)[1].decode() for node in nodes]
    assert [node.returncode for node in nodes] == [1, 1]  # torchrun's code for a failed worker
    told = [line for line in errs[0].splitlines() if line.startswith("lorakit: error: rank 1 ")]
    assert len(told) == 1 and "stopped before training" in told[0] and why in told[0]
    assert why in errs[1] or why.startswith("its command line")  # a usage error reads argparse's way
    assert not out.exists()


def assert_torchrun_equals_one_process(out: Path, setup, tmp_path: Path, steps: int) -> None:
    """The LoRA adapter a 2-rank ``lorakit train`` run (batch 4 per rank) wrote to ``out`` equals one
    process's with batch 4 and grad-accum 2, to the float tolerance of the summation order over ``steps``."""
    model, data = setup
    assert json.loads((out / "metrics.json").read_text())["steps"] == steps
    reference = tmp_path / "single"
    one = job(model, data, reference, "lora", {}, batch_size=4, mode=None)
    one.train.steps, one.train.grad_accum = steps, WORLD
    run_job(one)
    got, want = adapter(out), adapter(reference)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():  # up to 400 steps of float reordering: a few 1e-6
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-5, msg=key)


def test_replicated_gradients_are_averaged_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FSDP2 path's averaging: within a step's earlier micro-batches gradients only accumulate; the last
    micro-batch all-reduces each accumulated gradient once and divides by the world size."""
    from lorakit.distributed import wrap

    reduced: list[torch.Tensor] = []
    monkeypatch.setattr(wrap.dist, "all_reduce", lambda t: reduced.append(t.clone()))  # one rank's sum
    layer = torch.nn.Linear(3, 2)
    averager = wrap.GradientAverager(list(layer.parameters()), world_size=2)
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    with averager.paused():
        layer(x1).square().sum().backward()
    assert reduced == []
    layer(x2).square().sum().backward()
    assert len(reduced) == 2  # weight and bias, once each
    want = torch.autograd.grad((layer(x1).square().sum() + layer(x2).square().sum()) / 2, [layer.weight])[0]
    torch.testing.assert_close(layer.weight.grad, want)


def test_dp_dylora_is_refused_by_lorakit_train_with_where_it_runs(setup, tmp_path, capsys) -> None:
    """Outside a federated run DP-DyLoRA would train plain LoRA: `lorakit train` refuses it, with or without
    --distributed, before anything is loaded or written."""
    from lorakit.cli import main

    model, data = setup
    flags = ["train", "--variant", "dp_dylora", "--model", str(model), "--data", str(data)]
    for extra in ([], ["--distributed", "ddp"]):
        out = tmp_path / f"run{len(extra)}"
        assert main([*flags, *extra, "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "lorakit federate" in err[0] and "variant 'dp_dylora'" in err[0]
        assert not out.exists()


def test_a_torchrun_process_without_distributed_is_refused(setup, tmp_path, monkeypatch, capsys) -> None:
    """One of several torchrun processes with no --distributed would train the whole job into the shared
    output directory: it stops with one line that names the fix, before anything is written."""
    from dist_harness import loopback_env

    from lorakit.cli import main

    model, data = setup
    for rank in range(WORLD):
        for name, value in loopback_env(rank, free_port()).items():
            monkeypatch.setenv(name, value)
        out = tmp_path / "out"
        assert main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "WORLD_SIZE=2" in err[0] and "--distributed ddp" in err[0]
        assert not out.exists() and not any(tmp_path.glob(".out*"))
        federate = ["federate", "--model", str(model), "--data", str(data), "--output-dir", str(out)]
        assert main(federate) == 2  # every process would run the whole simulation
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "WORLD_SIZE=2" in err[0] and "launch it without torchrun" in err[0]
        assert not out.exists() and not any(tmp_path.glob(".out*"))


def test_train_help_shows_the_torchrun_launches(capsys) -> None:
    from lorakit.cli import main

    assert main(["train", "--help"]) == 0
    shown = capsys.readouterr().out
    for form in ("--nproc_per_node", "--nnodes", "--node-rank", "--rdzv-endpoint", "--max-restarts"):
        assert form in shown
    assert "--resume auto" in shown


def test_a_dead_rank_is_named_and_its_run_resumes_in_its_own_layout_from_rank_0s_files(setup, tmp_path):
    """Rank 1 dies at step 6 of 8 (a checkpoint holds step 4): rank 0 stops with one line that names rank 1
    and --resume. The checkpoint records the 2-rank layout, so one process cannot resume it; a 2-rank
    relaunch with `--resume auto` continues from step 4 (4 steps x 2 micro-batches) to the adapter of one
    process with the same global batch. Rank 0 alone touches files: it also ends a swap an earlier run left
    half done (a rename every rank used to make)."""
    from lorakit.engine.checkpoint import ResumeError

    model, data = setup
    out = tmp_path / "run"
    two = job(model, data, out, "lora", {}, batch_size=4, mode="ddp")
    two.train.checkpoint_every = 2
    died = run_ranks(Jobs([[two]] * WORLD), Probes(exit_at=(1, 5)))
    assert died[1].died and died[0].error is not None
    assert died[0].error.startswith("PeerFailedError: rank 0 stopped because rank 1 of this 2-process run")
    assert "by peer" in died[0].error and "--resume (or --resume auto)" in died[0].error
    assert not out.exists() and (tmp_path / ".run.lorakit-new" / "checkpoint").is_dir()

    alone = dataclasses.replace(two, distributed=None, resume=True)
    with pytest.raises(ResumeError, match="setting distributed is unset but the checkpoint was trained with"):
        run_job(alone)

    earlier = tmp_path / ".run.lorakit-old"  # a kill between the renames of an earlier run's swap
    earlier.mkdir()
    (earlier / lorakit.adapters.io.CONFIG_FILE).write_text("{}")
    again = dataclasses.replace(two, resume="auto")
    ranks = run_ranks(Jobs([[again]] * WORLD), Probes(writes_under=str(tmp_path), batches=True))
    assert [r.error for r in ranks] == [None, None]
    assert ranks[1].writes == [] and any("os.rename" in w for w in ranks[0].writes)
    assert ranks[0].batches == ranks[1].batches == [4] * (8 - 4) * 2  # resumed at step 4
    assert_same_adapter(adapter(out), adapter(single_process(setup, tmp_path, "lora", {})))
    assert json.loads((out / "metrics.json").read_text())["extra"]["world_size"] == WORLD


def test_ranks_started_with_different_jobs_all_stop_before_training_naming_the_difference(setup, tmp_path):
    """Rank 1's launcher got another learning rate, a data file with flipped labels and fewer rows, and a
    copy of the base with one changed weight: both ranks stop before anything is written, with one line."""
    from safetensors.torch import save_file

    model, data = setup
    rows = [json.loads(line) for line in data.read_text().splitlines()][:40]
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text("".join(json.dumps({**row, "label": 1 - row["label"]}) + "\n" for row in rows))
    other = without_dropout(model, tmp_path / "other-bert")
    weights = load_file(str(other / "model.safetensors"))
    weights["bert.embeddings.word_embeddings.weight"][7] += 0.01  # a weight outside the adapted layers
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    first = job(model, data, out, "lora", {}, batch_size=4, mode="ddp")
    second = job(other, flipped, out, "lora", {}, batch_size=4, mode="ddp")
    second.train.lr = 1e-2
    ranks = run_ranks(Jobs([[first], [second]]))
    assert ranks[0].error == ranks[1].error and ranks[0].error is not None
    err = ranks[0].error
    want = "the ranks disagree before training: setting lr is 0.01 on rank 1 but 0.02 on rank 0"
    assert err.startswith(f"RanksDisagreeError: {want}"), err
    assert "; also training data on rank 1; also base model on rank 1." in err
    assert not out.exists() and not list(tmp_path.glob(".run.*"))


def test_ddp_never_broadcasts_the_frozen_buffers(setup):
    """A 4-bit base's packed codes are buffers, several times the adapter's gradients in bytes; they are
    checked identical before training and never broadcast (rank 1's changed code survives two steps)."""
    from dist_harness import BufferBroadcasts

    assert [r.error for r in run_ranks(BufferBroadcasts(setup[0]))] == [None, None]


def test_the_docs_say_what_is_exact_sharded_and_refused() -> None:
    root = Path(__file__).resolve().parents[1]
    readme = root.joinpath("README.md").read_text()
    section = readme[readme.index("## Distributed training") :].split("\n## ")[0]
    guide = root.joinpath("docs", "distributed.md").read_text()
    for text in (section, guide):
        assert "batch `b` and grad-accum `W x G`" in text  # exact against this one process, not batch W x b
        assert "0.127 / `W`" in text  # a 4-bit base sharded by FSDP2
        for refused in ("DP-SGD", "DP-DyLoRA", "world size", "--resume auto", "without"):
            assert refused in text, refused


def test_a_rank_that_cannot_reach_the_others_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken rendezvous (here: the address a restarted rank read from an earlier attempt) is one line that
    names the workaround, not an internal error."""
    import torch.distributed as dist
    from dist_harness import loopback_env

    from lorakit.distributed import LaunchError, join

    for name, value in loopback_env(1, free_port()).items():
        monkeypatch.setenv(name, value)
    gloo = "[pair.cc:152] timed out connecting: SO_ERROR: Connection refused, remote=[127.0.0.1]:44934"

    def refused(backend: str) -> None:
        raise RuntimeError(f"Gloo connectFullMesh failed with {gloo}")

    monkeypatch.setattr(dist, "init_process_group", refused)
    with pytest.raises(LaunchError, match="rank 1 could not connect to the other processes") as caught:
        join("ddp")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in str(caught.value) and "\n" not in str(caught.value)
