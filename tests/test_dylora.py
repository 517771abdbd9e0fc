"""DyLoRA: the truncated formula, per-step rank sampling, masked updates, any-rank inference, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.cli import main
from lorakit.train.loop import TrainConfig, train
from lorakit.variants.dylora import evaluate_all_ranks, set_rank

R, ALPHA = 4, 8.0


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 4)  # at least R = 4 wide: a rank above a layer is refused

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        out = self.fc2(torch.tanh(self.fc1(x)))
        return out if labels is None else (out - labels).square().mean()


class Batches:
    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(1)

    def __next__(self) -> dict[str, torch.Tensor]:
        x = torch.randn(8, 6, generator=self.gen)
        return {"x": x, "labels": x[:, :4].sin()}


def dylora(**config) -> Tiny:
    model = lorakit.apply(
        Tiny(), "dylora", targets=["fc1", "fc2"], rank=R, alpha=ALPHA, dropout=0.0, **config
    )
    with torch.no_grad():  # B starts at zero: perturb so every rank contributes
        for _, layer in lorakit.adapted_layers(model):
            layer.variant.B.normal_(0, 0.3)
    return model


def test_rank_b_is_lora_truncated_to_b_with_scale_alpha_over_b() -> None:
    model = dylora().eval()
    x = torch.randn(5, 6)
    for b in (1, 3, R):
        set_rank(model, b)
        v = model.fc1.variant
        w0, bias = model.fc1.base_layer.weight, model.fc1.base_layer.bias
        by_hand = x @ w0.T + bias + (ALPHA / b) * (x @ v.A[:b].T) @ v.B[:, :b].T  # paper: (alpha/b) B_b A_b x
        with torch.no_grad():
            torch.testing.assert_close(model.fc1(x), by_hand, atol=1e-6, rtol=1e-6)
        # the same as a plain rank-b LoRA (scale alpha/b) holding the first b ranks
        lora = lorakit.apply(nn.Sequential(nn.Linear(6, 10)), "lora", targets=["0"], rank=b, alpha=ALPHA)
        lora.eval()
        with torch.no_grad():
            lora[0].base_layer.load_state_dict(model.fc1.base_layer.state_dict())
            lora[0].variant.A.copy_(v.A[:b]), lora[0].variant.B.copy_(v.B[:, :b])
            torch.testing.assert_close(lora(x), model.fc1(x), atol=1e-6, rtol=1e-6)
            assert torch.equal(v.delta_weight(), lora[0].variant.delta_weight())
    set_rank(model, 2)
    with torch.no_grad():
        out = model(x)
        lorakit.merge(model, unload=False)  # merged at the chosen rank 2
        torch.testing.assert_close(model(x), out, atol=1e-6, rtol=1e-6)
        with pytest.raises(ValueError, match="unmerge"):
            set_rank(model, 3)
        for _, layer in lorakit.adapted_layers(model):  # training with a sampled rank 4 must not change
            layer.variant.sampled = 4  # what unmerge subtracts: the rank-2 delta that merge added
        model.train()
        lorakit.unmerge(model)
        torch.testing.assert_close(model.fc1.base_layer.weight, Tiny().fc1.weight, atol=1e-6, rtol=0)
    with pytest.raises(lorakit.ConfigError, match="'min_rank'"):
        lorakit.apply(Tiny(), "dylora", targets=["fc1"], rank=2, min_rank=3)
    with pytest.raises(lorakit.ConfigError, match="'mode'"):
        lorakit.apply(Tiny(), "dylora", targets=["fc1"], mode="both")


def run_recording(model: Tiny, steps: int, **cfg) -> tuple[list[tuple[int, str, int]], list[int]]:
    """Train through the loop; returns (step, layer, rank) for every training forward and the hook's ranks."""
    forwards: list[tuple[int, str, int]] = []
    step_box = [0]
    hooks = lorakit.make_hooks(model, steps)

    class StepMarker(lorakit.Hook):
        def on_step_start(self, step: int) -> None:
            step_box[0] = step

    for name, layer in lorakit.adapted_layers(model):
        layer.register_forward_hook(
            lambda m, i, o, name=name: forwards.append((step_box[0], name, m.variant.active_rank()))
        )
    config = TrainConfig(steps=steps, lr=1e-2, warmup_ratio=0.0, progress=False, **cfg)
    train(model, Batches(), config, hooks=[StepMarker(model, [], steps)])  # after the variant's own hook
    return forwards, [hooks[0].rank_at(s) for s in range(steps)]


def test_one_rank_per_optimizer_step_shared_by_layers_and_micro_batches() -> None:
    forwards, sampled = run_recording(dylora(seed=3), steps=10, grad_accum=2)
    assert len(forwards) == 10 * 2 * 2  # steps x micro-batches x layers
    for step in range(10):
        ranks = {r for s, _, r in forwards if s == step}
        assert ranks == {sampled[step]}, f"step {step}: ranks {ranks} differ across layers or micro-batches"
    assert len(set(sampled)) >= 3 and all(1 <= b <= R for b in sampled)
    # the draw depends on (seed, step) only: reproducible, and another seed gives another sequence
    assert run_recording(dylora(seed=3), steps=10, grad_accum=2)[1] == sampled
    assert run_recording(dylora(seed=4), steps=10, grad_accum=2)[1] != sampled
    lo = run_recording(dylora(seed=3, min_rank=3), steps=10)[1]
    assert set(lo) <= {3, 4}


@pytest.mark.parametrize("mode", ["frozen", "nonfrozen"])
def test_untrained_ranks_stay_bit_identical_under_adamw_with_weight_decay(mode: str) -> None:
    model = dylora(mode=mode, seed=1)
    steps = 6
    hooks = lorakit.make_hooks(model, steps)
    checked: list[int] = []

    class Check(lorakit.Hook):
        """Runs after DyLoRA's hook at every call point."""

        def on_step_start(self, step: int) -> None:
            self.before = [(v.A.detach().clone(), v.B.detach().clone()) for v in variants]

        def on_after_backward(self, step: int) -> None:
            b = variants[0].sampled
            for v in variants:
                assert v.A.grad[b - 1].abs().sum() > 0 and v.B.grad[:, b - 1].abs().sum() > 0
                assert not v.A.grad[b:].any() and not v.B.grad[:, b:].any()
                if mode == "frozen":  # ranks below b are detached: no gradient at all
                    assert not v.A.grad[: b - 1].any() and not v.B.grad[:, : b - 1].any()

        def on_after_step(self, step: int) -> None:
            trained = variants[0].trained_rows()
            for v, (a, up) in zip(variants, self.before, strict=True):
                assert torch.equal(v.A[~trained], a[~trained]) and torch.equal(
                    v.B[:, ~trained], up[:, ~trained]
                )
                assert not torch.equal(v.A[trained], a[trained])  # the trained ranks did move
            checked.append(int(trained.sum()))

    variants = [layer.variant for _, layer in lorakit.adapted_layers(model)]
    config = TrainConfig(steps=steps, lr=1e-2, weight_decay=0.1, warmup_ratio=0.0, progress=False)
    train(model, Batches(), config, hooks=[Check(model, [], steps)])
    sampled = [hooks[0].rank_at(s) for s in range(steps)]
    assert checked == ([1] * steps if mode == "frozen" else sampled)
    assert any(b < R for b in sampled) and (mode == "frozen" or any(b > 1 for b in sampled))


def test_evaluate_all_ranks_and_save_keeps_every_rank(tmp_path) -> None:
    model = dylora().eval()
    x = torch.randn(5, 6)
    set_rank(model, 2)
    table = evaluate_all_ranks(
        model, lambda m: {"sum": float(m(x).sum().detach()), "rank": m.fc2.variant.current_rank}
    )
    assert list(table) == [1, 2, 3, 4] and [t["rank"] for t in table.values()] == [1, 2, 3, 4]
    for b in (1, 4):
        set_rank(model, b)
        assert table[b]["sum"] == float(model(x).sum().detach())
    set_rank(model, 2)
    evaluate_all_ranks(model, lambda m: {})
    assert model.fc1.variant.current_rank == 2  # the chosen rank is restored
    lorakit.save(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter.safetensors")
    assert tensors["fc1.A"].shape == (R, 6) and tensors["fc1.B"].shape == (10, R)
    fresh = lorakit.load(Tiny(), tmp_path / "a").eval()
    assert fresh.lorakit.config.rank == R and fresh.fc1.variant.current_rank == 2  # as saved, every rank kept
    for b in range(1, R + 1):
        set_rank(model, b), set_rank(fresh, b)
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="no DyLoRA adapter"):
        evaluate_all_ranks(lorakit.apply(Tiny(), "lora", targets=["fc1"], rank=2), lambda m: {})


def test_cli_trains_then_evaluates_every_rank(tiny_bert_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_bert_dir), "--variant", "dylora", "--rank", "3", "--steps", "6"]
    argv += ["--batch-size", "8", "--lr", "0.02", "--targets", "query,value", "--output-dir", str(run)]
    argv += ["--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run)]) == 0
    plain = capsys.readouterr().out  # "accuracy A, loss L" at the full rank R = 3
    assert main(["eval", "--adapter", str(run), "--all-ranks"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "accuracy", "loss"]
    rows = {int(r.split()[0]): [float(v) for v in r.split()[1:]] for r in lines[1:]}
    assert list(rows) == [1, 2, 3]
    accuracy, loss = (float(part.split()[1]) for part in plain.strip().split(", "))
    assert rows[3] == pytest.approx([accuracy, loss], abs=1e-4)
    # each rank is a different model (the 4-decimal table of this barely trained model cannot show it)
    from lorakit.jobs.saved import load_adapted

    _, model, tokenizer = load_adapted(str(run))
    batch = tokenizer(["a joy to watch", "dull"], return_tensors="pt", padding=True)
    logits = {}
    for b in (1, 2, 3):
        set_rank(model, b)
        with torch.no_grad():
            logits[b] = model.eval()(**batch).logits
    assert not torch.equal(logits[1], logits[2]) and not torch.equal(logits[2], logits[3])


@pytest.mark.parametrize("variant", ["dylora", "dp_dylora"])
def test_the_rank_set_rank_chose_is_saved_and_loaded_back(tmp_path, variant) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 16)).eval()

    x = torch.randn(3, 16)
    model = lorakit.apply(build(), variant, targets=["0"], rank=4, alpha=8)
    with torch.no_grad():
        model[0].variant.B.normal_()
    lorakit.set_rank(model, 2)
    with torch.no_grad():
        at_two = model(x)
    lorakit.save(model, tmp_path / "two")
    lorakit.set_rank(model, None)
    with torch.no_grad():
        full = model(x)
    lorakit.save(model, tmp_path / "full")
    assert (full - at_two).abs().max() > 1e-2  # the ranks really differ
    loaded = lorakit.load(build(), tmp_path / "two")
    assert loaded[0].variant.rank == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), at_two)
    assert "chosen_rank" not in json.loads((tmp_path / "full" / "adapter.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(lorakit.load(build(), tmp_path / "full")(x), full)
