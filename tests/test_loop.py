"""The training loop: hook call points and order, schedules, gradient accumulation, exact resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.contract import Driver, GradientSource
from lorakit.engine.placement import Placement
from lorakit.engine.run import Engine
from lorakit.train.loop import TrainConfig, TrainResult, lr_lambda, train


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (self.body(x) - labels).square().mean()


class Batches:
    """Seeded batches with state, like lorakit.data.datasets.BatchSampler."""

    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(1)

    def __next__(self) -> dict[str, torch.Tensor]:
        x = torch.randn(8, 4, generator=self.gen)
        return {"x": x, "labels": x.flip(-1) * 2}

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


class Recorder(lorakit.Hook):
    def __init__(self, model, layers, total_steps) -> None:
        super().__init__(model, layers, total_steps)
        self.calls: list[tuple[str, int]] = []
        self.grad_seen_after_step = []

    def on_step_start(self, step: int) -> None:
        self.calls.append(("start", step))

    def extra_loss(self, step: int):
        self.calls.append(("loss", step))
        return self.layers[0].variant.B.square().sum()

    def on_after_backward(self, step: int) -> None:
        self.calls.append(("backward", step))

    def on_before_optimizer_step(self, step: int) -> None:
        self.calls.append(("optimizer", step))

    def on_after_step(self, step: int) -> None:
        self.calls.append(("step", step))
        self.grad_seen_after_step.append(self.layers[0].variant.B.grad is not None)


def adapted() -> nn.Module:
    return lorakit.apply(Regression(), "lora", rank=2, dropout=0.0)


def test_hooks_run_at_fixed_points_once_per_optimizer_step() -> None:
    model = adapted()
    hook = Recorder(model, [layer for _, layer in lorakit.adapted_layers(model)], 3)
    train(model, Batches(), TrainConfig(steps=3, grad_accum=2, progress=False), hooks=[hook])
    expected = []
    for s in range(3):
        expected += [("start", s), ("loss", s), ("loss", s), ("backward", s), ("optimizer", s), ("step", s)]
    assert hook.calls == expected
    assert all(hook.grad_seen_after_step), "gradients must still be readable in on_after_step"


def test_loss_drops_and_schedule_has_warmup_then_decay() -> None:
    model = adapted()
    result = train(model, Batches(), TrainConfig(steps=80, lr=5e-2, progress=False))
    assert sum(result.losses[-10:]) < 0.5 * sum(result.losses[:10])
    f = lr_lambda(TrainConfig(steps=100, warmup_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(99) == pytest.approx(1 / 90)
    cos = lr_lambda(TrainConfig(steps=100, warmup_ratio=0.0, schedule="cosine"))
    assert cos(50) == pytest.approx(0.5)


def test_resume_from_checkpoint_is_exact(tmp_path) -> None:
    cfg = TrainConfig(steps=10, lr=1e-2, checkpoint_every=4, progress=False)
    full = adapted()
    train(full, Batches(), cfg)
    interrupted = adapted()
    train(interrupted, Batches(), TrainConfig(**{**cfg.__dict__, "steps": 10}), output_dir=tmp_path)
    assert (tmp_path / "checkpoint" / "trainer.pt").exists()
    resumed = adapted()  # a new process would rebuild the model and continue from step 8
    result = train(resumed, Batches(), cfg, output_dir=tmp_path, resume=True)
    assert result.steps == 10 and len(result.losses) == 10
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_trains_with_fp32_parameters() -> None:
    model = adapted()
    result = train(model, Batches(), TrainConfig(steps=60, lr=5e-2, precision="bf16", progress=False))
    assert sum(result.losses[-10:]) < 0.5 * sum(result.losses[:10])
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bad_training_settings_are_named() -> None:
    with pytest.raises(ValueError, match="precision='fp8'"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="schedule='warm'"):
        TrainConfig(schedule="warm")
    with pytest.raises(ValueError, match="steps=0"):
        TrainConfig(steps=0)


class Reseeding(Placement):
    """A placement that reseeds each step, as a distributed run does per rank."""

    def __init__(self, seeds: list[int]) -> None:
        self.seeds = seeds

    def step_seed(self, seed: int, step: int) -> int | None:
        return self.seeds[step]


def test_a_placement_reseeds_every_step_so_ranks_draw_their_own_dropout():
    """Processes sharing a run seed must not share dropout masks: each step's masks follow the placement's
    step seed (per rank in a distributed run), not the seed the run started from."""
    from lorakit.distributed.group import Distributed

    def trained(seeds: list[int]) -> torch.Tensor:
        model = lorakit.apply(Regression(), "lora", targets=["body"], rank=2, dropout=0.5)
        train(model, Batches(), TrainConfig(steps=3, lr=0.05, progress=False), placement=Reseeding(seeds))
        return model.body.variant.B.detach().clone()

    same, again, other = trained([1, 2, 3]), trained([1, 2, 3]), trained([4, 2, 3])
    assert torch.equal(same, again) and not torch.equal(same, other)
    ranks = [Distributed("ddp", rank, 2, torch.device("cpu")) for rank in range(2)]
    seeds = {(r.rank, step): r.step_seed(7, step) for r in ranks for step in range(50)}
    assert len(set(seeds.values())) == len(seeds)  # every (rank, step) its own stream
    assert ranks[1].step_seed(7, 3) == seeds[(1, 3)]  # and the same again on resume
    assert Placement().step_seed(7, 3) is None  # one process keeps its stream


def test_gradients_left_on_the_model_do_not_reach_the_first_step() -> None:
    """An earlier run in the same process that failed after its backward left gradients (NaN here) on the
    parameters; a new run starts from none."""
    from conftest import tiny_llama

    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    models = [lorakit.apply(tiny_llama(), "lora", targets="all-linear", rank=2, dropout=0.0) for _ in "ab"]
    for p in models[1].parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, float("nan"))
    cfg = TrainConfig(steps=2, lr=1e-2, warmup_ratio=0.0, progress=False)
    losses = [train(m, iter(lambda: batch, None), cfg).losses for m in models]
    assert losses[0] == losses[1]


class CountingSource(GradientSource):
    """A gradient source of its own (not the loop's LossBackward) whose position is part of the run."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.drawn = model, 0

    def backward(self, step: int, extra_loss) -> float:
        gen = torch.Generator().manual_seed(self.drawn)  # the batch depends on the source's position
        self.drawn += 1
        x = torch.randn(8, 4, generator=gen)
        loss = self.model(x, x.flip(-1) * 2)
        loss.backward()
        return loss.item()

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = state["drawn"]


def test_the_engine_checkpoints_and_resumes_any_gradient_source_through_its_seam(tmp_path) -> None:
    cfg = TrainConfig(steps=6, lr=1e-2, checkpoint_every=4, progress=False)
    full = adapted()
    Engine(full, cfg, driver=Driver.LOOP).run(CountingSource(full), TrainResult(steps=0, seconds=0.0))
    interrupted = adapted()
    Engine(interrupted, cfg, driver=Driver.LOOP).run(
        CountingSource(interrupted), TrainResult(steps=0, seconds=0.0), output_dir=tmp_path
    )
    resumed = adapted()
    source = CountingSource(resumed)
    result = Engine(resumed, cfg, driver=Driver.LOOP).run(
        source, TrainResult(steps=0, seconds=0.0), output_dir=tmp_path, resume=True
    )
    assert result.steps == 6 and source.drawn == 6  # restored at 4, then two more draws
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_a_users_hooks_run_beside_the_variants_own_rules() -> None:
    model = lorakit.apply(Regression(), "adalora", init_r=4, target_r=1, t_init=1, t_final=2, dropout=0.0)
    layers = [layer for _, layer in lorakit.adapted_layers(model)]

    class Steps(lorakit.Hook):
        def on_after_step(self, step: int) -> None:
            seen.append(step)

    seen: list[int] = []
    train(model, Batches(), TrainConfig(steps=6, lr=1e-2, progress=False), hooks=[Steps(model, layers, 6)])
    assert seen == list(range(6))
    assert layers[0].variant.rank == 1  # AdaLoRA's budget still pruned to its final mask


def test_passing_the_variants_own_hook_again_is_refused() -> None:
    model = lorakit.apply(Regression(), "adalora", init_r=4, target_r=1, t_init=1, t_final=2, dropout=0.0)
    twice = lorakit.make_hooks(model, 6)
    with pytest.raises(lorakit.SettingError, match="AdaLoRAHook, which the variant declares"):
        train(model, Batches(), TrainConfig(steps=6, lr=1e-2, progress=False), hooks=twice)


@pytest.mark.parametrize("writer", [True, False])
def test_only_the_writing_process_prints_evaluations(capsys, writer: bool) -> None:
    """Every rank evaluates (the evaluation may be a collective) but only rank 0 reports, with or without a
    progress bar."""

    class Rank(Placement):
        is_writer = writer

    model = adapted()
    cfg = TrainConfig(steps=3, lr=0.05, progress=False, eval_every=1)
    result = train(model, Batches(), cfg, evaluate=lambda m: {"score": 1.5}, placement=Rank())
    assert [step for step, _ in result.evals] == [1, 2, 3]
    out = capsys.readouterr()
    assert ("step 1: score 1.5000" in out.out + out.err) is writer
