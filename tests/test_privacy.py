"""DP-SGD for any variant: per-example gradients, clipping, calibrated noise, the accountant, the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from layer_zoo import LAYERS, make_case
from variant_cases import case_config

import lorakit
from lorakit.cli import main
from lorakit.core.variant import Hook
from lorakit.data import datasets as D
from lorakit.privacy import DPConfig, PrivacyError, require
from lorakit.privacy.accountant import Accountant, noise_for_budget
from lorakit.privacy.dp_sgd import per_example_loss, train_dp
from lorakit.privacy.grad_sample import AdapterGradSampleModule
from lorakit.train.loop import TrainConfig

# Adapters whose inputs need no gradient make PyTorch warn on every backward through Opacus' hooks.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

ZOO = [(name, kind) for name, cls in lorakit.VARIANTS.items() for kind in LAYERS if kind in cls.kinds]


@pytest.mark.parametrize(("name", "kind"), ZOO, ids=[f"{n}-{k}" for n, k in ZOO])
def test_per_example_gradients_equal_autograd_for_every_variant_and_kind(name: str, kind: str) -> None:
    model, x = make_case(kind)
    lorakit.apply(model, name, targets=["layer"], **{**case_config(name), "dropout": 0.0})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from init, so every factor has a non-zero gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = AdapterGradSampleModule(model)
    out = gsm(x)
    (out.reshape(len(x), -1) ** 2).sum(1).mean().backward()  # mean of per-example losses
    samples = [p.grad_sample.clone() for p in params]
    gsm.to_standard_module()
    for i in range(len(x)):
        loss = (model(x[i : i + 1]).reshape(-1) ** 2).sum()
        refs = torch.autograd.grad(loss, params, allow_unused=True)
        for sample, ref in zip(samples, refs, strict=True):
            ref = torch.zeros_like(sample[i]) if ref is None else ref
            assert sample.shape == (len(x), *ref.shape)
            torch.testing.assert_close(sample[i], ref, rtol=1e-4, atol=1e-5)
    assert any(s.abs().sum() > 0 for s in samples)


def tiny_classifier(path, variant: str):
    from lorakit.jobs.models import head_modules, load_model

    model, tokenizer = load_model(str(path), "classification")
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():  # deterministic forward, so per-example gradients can be compared exactly
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    cfg = {"rank": 4, "dropout": 0.0}
    lorakit.apply(
        model, variant, targets=["query", "value"], train_modules=head_modules(model, "classification"), **cfg
    )
    return model, tokenizer


def demo_data(tokenizer, n: int = 64) -> D.TokenizedData:
    return D.tokenize_classification(D.demo_rows("train")[:n], tokenizer, "sentence", "label", 24, "demo")


@pytest.mark.parametrize("variant", ["lora", "dora", "vera", "loha", "lokr"])
def test_model_per_example_gradients_cover_adapters_and_head(tiny_bert_dir, variant: str) -> None:
    model, tokenizer = tiny_classifier(tiny_bert_dir, variant)
    data = demo_data(tokenizer, 5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = AdapterGradSampleModule(model)
    per_example_loss(gsm, data.batch(list(range(5)))).mean().backward()
    samples = [p.grad_sample.clone() for p in params]
    gsm.to_standard_module()
    for i in range(5):
        refs = torch.autograd.grad(per_example_loss(model, data.batch([i])).sum(), params)
        for sample, ref in zip(samples, refs, strict=True):
            torch.testing.assert_close(sample[i], ref, rtol=1e-4, atol=1e-6)


class Capture(Hook):
    """Keeps the privatised gradient the optimizer is about to apply."""

    def __init__(self, model) -> None:
        super().__init__(model, [], 1)
        self.grads: list[list[torch.Tensor]] = []

    def on_after_backward(self, step: int) -> None:
        self.grads.append([p.grad.clone() for p in self.model.parameters() if p.requires_grad])


class Recording(D.TokenizedData):
    def batch(self, indices):
        self.seen.append(list(indices))
        return super().batch(indices)


@pytest.mark.parametrize("sigma", [0.0, 3.0])
def test_step_is_clipped_sum_plus_calibrated_noise_over_expected_batch(tiny_bert_dir, sigma: float) -> None:
    model, tokenizer = tiny_classifier(tiny_bert_dir, "lora")
    base = demo_data(tokenizer, 200)
    data = Recording(base.input_ids, base.labels, base.pad_id)
    data.seen = []
    start = copy.deepcopy(model)
    capture = Capture(model)
    clip, cfg = 0.05, TrainConfig(steps=1, batch_size=20, lr=1e-4, progress=False, seed=1)
    train_dp(model, data, cfg, DPConfig(dp=True, noise_multiplier=sigma, max_grad_norm=clip), hooks=[capture])
    batch = [i for chunk in data.seen for i in chunk]  # one Poisson sample, in physical chunks of 20
    start.train()
    params = [p for p in start.parameters() if p.requires_grad]
    clipped = [torch.zeros_like(p) for p in params]
    norms = []
    for i in batch:  # an independent DP-SGD step: per-example autograd, clip to C, sum, / expected batch
        grads = torch.autograd.grad(per_example_loss(start, base.batch([i])).sum(), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(float(norm))
        for acc, g in zip(clipped, grads, strict=True):
            acc += g * min(1.0, clip / (float(norm) + 1e-6))
    assert max(norms) > clip  # clipping really happened
    got = capture.grads[0]
    if sigma == 0:
        for g, ref in zip(got, clipped, strict=True):
            torch.testing.assert_close(g * 20, ref, rtol=1e-4, atol=1e-7)
        contribution = torch.sqrt(sum(g.pow(2).sum() for g in got)) * 20
        assert contribution <= clip * len(batch) + 1e-6
    else:
        noise = torch.cat([(g * 20 - ref).reshape(-1) for g, ref in zip(got, clipped, strict=True)])
        n = noise.numel()
        assert n > 1000
        # Fresh noise every run: five standard errors (of the std ~ 1/sqrt(2n), of the mean ~ 1/sqrt(n))
        assert abs(float(noise.std()) / (sigma * clip) - 1) < 5 / math.sqrt(2 * n)
        assert abs(float(noise.mean())) < 5 / math.sqrt(n) * sigma * clip


def clipped_sum(model, data: D.TokenizedData, indices: list[int], clip: float) -> dict[str, torch.Tensor]:
    """An independent sum of per-example gradients clipped to ``clip``, by name."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in named.items()}
    for i in indices:
        grads = torch.autograd.grad(per_example_loss(model, data.batch([i])).sum(), list(named.values()))
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        for n, g in zip(named, grads, strict=True):
            total[n] += g * min(1.0, clip / (norm + 1e-6))
    return total


def private_step(tiny_bert_dir, insecure: bool, seed: int = 7):
    """One DP-SGD step over every example (q = 1) of 32; returns the model before, the data and the
    privatised gradient by name."""
    model, tokenizer = tiny_classifier(tiny_bert_dir, "lora")
    data = demo_data(tokenizer, 32)
    start = copy.deepcopy(model)
    names = {p: n for n, p in model.named_parameters()}
    capture = Capture(model)
    cfg = TrainConfig(steps=1, batch_size=32, lr=1e-4, progress=False, seed=seed)
    dp = DPConfig(dp=True, noise_multiplier=2.0, max_grad_norm=0.05, dp_insecure_seed=insecure)
    train_dp(model, data, cfg, dp, hooks=[capture])
    trained = [names[p] for p in model.parameters() if p.requires_grad]
    return start, data, cfg, dict(zip(trained, capture.grads[0], strict=True))


def test_secure_runs_with_the_same_seed_draw_different_noise(tiny_bert_dir) -> None:
    _, _, _, first = private_step(tiny_bert_dir, insecure=False)
    _, _, _, second = private_step(tiny_bert_dir, insecure=False)
    diff = max(float((first[n] - second[n]).abs().max()) for n in first)
    assert diff > 2.0 * 0.05 / 32  # of the order of the noise std over the batch, not of rounding
    with pytest.warns(UserWarning, match="NOT a guarantee"):
        _, _, _, again = private_step(tiny_bert_dir, insecure=True)
    with pytest.warns(UserWarning, match="NOT a guarantee"):
        _, _, _, repeat = private_step(tiny_bert_dir, insecure=True)
    assert all(torch.equal(again[n], repeat[n]) for n in again)  # the insecure mode is reproducible


@pytest.mark.parametrize("insecure", [True, False])
def test_noise_regenerated_from_the_recorded_seed_recovers_the_clipped_sum_only_when_insecure(
    tiny_bert_dir, insecure: bool
) -> None:
    """The attack: with the seed that job.json records, regenerate DP-SGD's noise as the code draws it
    (Opacus' secure-mode Gaussian, one call per tensor in the optimizer's order) and subtract it."""
    from opacus.optimizers.optimizer import _generate_noise

    from lorakit.privacy.randomness import NOISE_STREAM, derived_seed
    from lorakit.train.loop import make_optimizer

    if insecure:
        with pytest.warns(UserWarning, match="NOT a guarantee"):
            start, data, cfg, grads = private_step(tiny_bert_dir, insecure)
    else:
        start, data, cfg, grads = private_step(tiny_bert_dir, insecure)
    start.train()
    truth = clipped_sum(start, data, list(range(32)), 0.05)
    names = {p: n for n, p in start.named_parameters()}
    order = [names[p] for g in make_optimizer(start, cfg).param_groups for p in g["params"]]
    generator = torch.Generator().manual_seed(derived_seed(cfg.seed, NOISE_STREAM))
    noise = {n: _generate_noise(2.0 * 0.05, grads[n], generator, secure_mode=True) for n in order}
    error = torch.cat([(grads[n] * 32 - noise[n] - truth[n]).reshape(-1) for n in order]).norm()
    scale = torch.cat([t.reshape(-1) for t in truth.values()]).norm()
    if insecure:
        assert error < 1e-3 * scale  # the exact sum of clipped gradients is exposed
    else:
        noise_norm = torch.cat([t.reshape(-1) for t in noise.values()]).norm()
        assert error > 0.5 * noise_norm and error > 2 * scale  # what is left: the run's unknown noise


def test_epsilon_grows_every_step_and_training_stops_before_the_target(tiny_bert_dir) -> None:
    model, tokenizer = tiny_classifier(tiny_bert_dir, "dora")
    data = demo_data(tokenizer, 256)
    dp = DPConfig(dp=True, noise_multiplier=0.9, target_epsilon=2.5, delta=1e-4)
    with pytest.warns(UserWarning, match="stopped after"):
        result = train_dp(model, data, TrainConfig(steps=500, batch_size=16, progress=False), dp)
    assert 1 < result.steps < 500 and result.stopped
    eps = result.epsilons
    assert len(eps) == result.steps and all(b > a for a, b in zip(eps, eps[1:], strict=False))
    assert eps[-1] <= 2.5 and result.epsilon == pytest.approx(eps[-1])
    accountant = Accountant("rdp")
    accountant.step(0.9, 16 / 256, result.steps + 1)
    assert accountant.epsilon(1e-4) > 2.5  # one more step would have exceeded the target
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus' hooks are gone


def test_target_epsilon_chooses_the_noise_that_spends_it(tiny_bert_dir) -> None:
    model, tokenizer = tiny_classifier(tiny_bert_dir, "vera")
    data = demo_data(tokenizer, 128)
    cfg = TrainConfig(steps=6, batch_size=16, progress=False)
    result = train_dp(model, data, cfg, DPConfig(dp=True, target_epsilon=4.0, delta=1e-3, accountant="prv"))
    assert result.steps == 6 and result.stopped is None
    assert result.noise_multiplier == pytest.approx(noise_for_budget(4.0, 1e-3, 16 / 128, 6, "prv"))
    assert 3.9 <= result.epsilon <= 4.0
    assert result.losses == [] and math.isnan(result.final_loss)  # no unnoised statistic of the data leaves


def closed_form_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """RDP of the Poisson-subsampled Gaussian at integer orders (Mironov et al. 2019, Sec. 3.3, binomial
    expansion), composed over ``steps``, converted with Balle et al. 2020 Thm. 21; minimum over orders."""
    best = math.inf
    for a in range(2, 65):
        terms = [
            math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1)
            + (a - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
            for k in range(a + 1)
        ]  # fmt: skip
        top = max(terms)
        rdp = steps * (top + math.log(sum(math.exp(t - top) for t in terms))) / (a - 1)
        eps = rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        best = min(best, eps)
    return best


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "delta"),
    [(1.0, 0.01, 1000, 1e-5), (1.5, 0.05, 200, 1e-6), (0.8, 0.1, 50, 1e-5), (4.0, 0.5, 20, 1e-3)],
)
def test_accountant_matches_an_independent_rdp_computation(sigma, q, steps, delta) -> None:
    from opacus.accountants import RDPAccountant

    reference = closed_form_epsilon(sigma, q, steps, delta)
    engine = RDPAccountant()
    engine.history = [(sigma, q, steps)]
    assert engine.get_epsilon(delta, alphas=list(range(2, 65))) == pytest.approx(reference, rel=1e-6)
    accountant = Accountant("rdp")
    accountant.step(sigma, q, steps)
    ours = accountant.epsilon(delta)
    # lorakit's accountant also tries fractional orders, so it may be a little tighter, never looser.
    assert reference * 0.95 <= ours <= reference + 1e-9
    assert accountant.steps == steps and accountant.history == [(sigma, q, steps)]


def test_accountant_edge_cases_and_range_errors() -> None:
    accountant = Accountant()
    assert accountant.epsilon(1e-5) == 0.0
    accountant.step(0.0, 0.1)
    assert accountant.epsilon(1e-5) == math.inf
    with pytest.raises(PrivacyError, match="delta"):
        accountant.epsilon(1.5)
    with pytest.raises(PrivacyError, match="sample rate"):
        accountant.step(1.0, 0.0)
    with pytest.raises(PrivacyError, match="epsilon"):
        noise_for_budget(-1.0, 1e-5, 0.1, 10)
    with pytest.raises(PrivacyError, match="budget or a noise level"):
        DPConfig(dp=True)
    with pytest.raises(PrivacyError, match="accountant"):
        DPConfig(accountant="moments")
    with pytest.raises(ImportError, match=r"lorakit\[privacy\]"):
        require("opacus_not_installed_anywhere")


def test_cli_trains_with_dp_and_reports_epsilon(tiny_bert_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    args = [
        "train",
        "--model",
        str(tiny_bert_dir),
        "--targets",
        "query,value",
        "--rank",
        "2",
        "--dropout",
        "0",
    ]
    args += ["--steps", "4", "--batch-size", "16", "--no-progress", "--output-dir", str(run)]
    dp = ["--dp", "--target-epsilon", "3", "--delta", "1e-4", "--max-grad-norm", "0.5", "--num-labels", "2"]
    assert main([*args, *dp]) == 0
    saved = json.loads((run / "metrics.json").read_text())
    extra = saved["extra"]
    assert 2.9 <= extra["epsilon"] <= 3.0 and extra["delta"] == 1e-4 and extra["max_grad_norm"] == 0.5
    assert extra["private"] is True and "os.urandom" in extra["randomness"]
    assert saved["final_loss"] is None  # the training loss is a statistic of the private data (strict JSON)
    assert "final train loss not released" in capsys.readouterr().out
    assert "training losses" in extra["not_released"]
    adapter = json.loads((run / "adapter.json").read_text())
    assert adapter["privacy"]["private"] is True and adapter["privacy"]["epsilon"] == extra["epsilon"]
    assert json.loads((run / "job.json").read_text())["privacy"]["dp"] is True
    assert main(["eval", "--adapter", str(run)]) == 0  # job.json with a privacy section loads back
    assert main([*args, *dp, "--overwrite", "--dp-insecure-seed"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "NOT a guarantee" in line]
    assert len(warned) == 1 and warned[0].startswith("lorakit: warning: ")  # one line, as the CLI's errors
    assert json.loads((run / "metrics.json").read_text())["extra"]["private"] is False
    assert json.loads((run / "adapter.json").read_text())["privacy"]["private"] is False
    assert json.loads((run / "job.json").read_text())["privacy"]["dp_insecure_seed"] is True
    capsys.readouterr()
    assert main([*args, "--overwrite", "--dp", "--delta", "2"]) == 2
    assert "delta must be in (0, 1)" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--dp"]) == 2
    assert "--target-epsilon" in capsys.readouterr().err


def test_a_non_finite_private_gradient_stops_training(tiny_bert_dir) -> None:
    """DP-SGD privatises inside the optimizer step; the released gradient is checked right after it, so a
    NaN stops the run before any checkpoint or adapter is written (post-processing: no privacy cost)."""
    from lorakit.adapters.io import NonFiniteError

    model, tokenizer = tiny_classifier(tiny_bert_dir, "lora")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("variant.B")).fill_(float("nan"))
    cfg = TrainConfig(steps=3, batch_size=16, progress=False)
    with pytest.raises(NonFiniteError, match="training stopped at step 1: the gradient norm is nan"):
        train_dp(model, demo_data(tokenizer), cfg, DPConfig(dp=True, noise_multiplier=1.0, max_grad_norm=1.0))


def small_tsv(path, rows: int = 20) -> str:
    lines = ["sentence\tlabel"] + [f"a {'good' if i % 2 else 'bad'} film {i}\t{i % 2}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def dp_train_args(model_dir, data: str, run) -> list[str]:
    return [
        "train", "--model", str(model_dir), "--data", data, "--targets", "query,value", "--rank", "2",
        "--dropout", "0", "--steps", "2", "--batch-size", "4", "--no-progress", "--output-dir", str(run),
        "--dp", "--num-labels", "2",
    ]  # fmt: skip


def refused(argv: list[str], run, capsys) -> str:
    """Run ``argv``; expect exit 2, one error line (returned) and nothing written into or beside ``run``."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lorakit: error:")
    assert not run.exists() and sorted(p.name for p in run.parent.iterdir()) == ["train.tsv"]
    return err


def test_a_delta_of_at_least_one_over_n_is_refused_before_anything_is_written(
    tiny_bert_dir, tmp_path, capsys
) -> None:
    """With delta >= 1/N an (epsilon, delta)-DP mechanism may publish an example outright; on 20 examples the
    run is refused naming 1/N and the fix, instead of training and recording it as private."""
    run = tmp_path / "run"
    args = dp_train_args(tiny_bert_dir, small_tsv(tmp_path / "train.tsv"), run)
    for delta in ("0.5", "0.05"):  # 0.05 = 1/20 exactly
        err = refused([*args, "--noise-multiplier", "1", "--delta", delta], run, capsys)
        assert "1/N = 1/20 = 0.05 for N = 20 training examples" in err and "pass --delta below 0.05" in err
    err = refused([*args, "--target-epsilon", "8", "--delta", "0.5"], run, capsys)
    assert "1/N = 1/20" in err
    # Clipping only (no noise) has epsilon = inf at any delta: it runs and is recorded as not private.
    assert main([*args, "--noise-multiplier", "0", "--delta", "0.5"]) == 0
    extra = json.loads((run / "metrics.json").read_text())["extra"]
    assert extra["private"] is False and extra["epsilon"] is None


def test_the_accountant_never_reports_a_negative_epsilon() -> None:
    accountant = Accountant("rdp")
    accountant.step(1.0, 0.125, 2)
    assert accountant.epsilon(0.5) == 0.0  # Opacus' conversion gives about -0.64 here
    assert accountant.epsilon_after(0.5, 1.0, 0.125) == 0.0
    assert accountant.epsilon(1e-5) > 0


def test_a_budget_that_cannot_pay_for_one_step_is_refused_before_training(
    tiny_bert_dir, tmp_path, capsys
) -> None:
    """The first step's epsilon depends only on sigma, q and delta: a target below it is refused up front,
    not answered with an untrained adapter recorded as private."""
    run = tmp_path / "run"
    args = dp_train_args(tiny_bert_dir, small_tsv(tmp_path / "train.tsv"), run)
    err = refused(
        [*args, "--noise-multiplier", "0.3", "--target-epsilon", "0.05", "--delta", "1e-3"], run, capsys
    )
    assert "--target-epsilon 0.05 cannot pay for one step" in err and "spends epsilon" in err
    assert "--noise-multiplier" in err
    err = refused([*args, "--noise-multiplier", "0", "--target-epsilon", "5"], run, capsys)
    assert "noise_multiplier 0 adds no noise, so no target_epsilon can hold" in err
    with pytest.raises(PrivacyError, match="adds no noise"):
        DPConfig(dp=True, noise_multiplier=0.0, target_epsilon=5.0)
    model, tokenizer = tiny_classifier(tiny_bert_dir, "lora")
    cfg = TrainConfig(steps=3, batch_size=8, progress=False)
    dp = DPConfig(dp=True, noise_multiplier=0.3, target_epsilon=0.05, delta=1e-3)
    with pytest.raises(PrivacyError, match="cannot pay for one step"):
        train_dp(model, demo_data(tokenizer), cfg, dp)


def test_training_data_truncation_counts_are_withheld_under_dp(chat_llama_dir, tmp_path, capsys) -> None:
    """How many of the training data's answers max length cut, or left out, is a statistic of the private
    data: under DP it is neither printed nor stored; the evaluation data's counts still are."""
    long = "the answer is " + "very " * 80 + "long"
    rows = [{"prompt": f"What is {i} plus 2?", "response": f"The answer is {i + 2}."} for i in range(10)]
    rows += [{"prompt": "Tell me a long one.", "response": long}]
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    for path in (train, dev):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    argv = [
        "train", "--model", str(chat_llama_dir), "--data", str(train), "--eval-data", str(dev),
        "--max-length", "64", "--steps", "2", "--batch-size", "4", "--targets", "all-linear",
        "--no-progress", "--output-dir", str(run),
    ]  # fmt: skip
    capsys.readouterr()
    assert main([*argv, "--dp", "--noise-multiplier", "1", "--delta", "1e-3"]) == 0
    out = capsys.readouterr()
    extra = json.loads((run / "metrics.json").read_text())["extra"]
    assert "train_answers_cut" not in extra and "train_examples_left_out" not in extra
    assert extra["eval_answers_cut"] >= 1 and "truncation counts" in extra["not_released"]
    printed = out.out + out.err
    assert f"{train}:" not in printed and f"{dev}: " in printed and "answers cut" in printed
    assert main([*argv, "--overwrite"]) == 0  # without DP both are reported
    extra = json.loads((run / "metrics.json").read_text())["extra"]
    assert extra["train_answers_cut"] == extra["eval_answers_cut"] >= 1
    assert f"{train}: " in capsys.readouterr().err


def test_classes_are_never_read_from_the_private_data(tiny_bert_dir, tmp_path, capsys) -> None:
    """The number and names of the classes are saved with the adapter: under DP they come from --num-labels
    (class ids) or --labels (names), never from counting the private data."""
    run = tmp_path / "run"
    args = dp_train_args(tiny_bert_dir, small_tsv(tmp_path / "train.tsv"), run)
    args = args[: args.index("--num-labels")] + args[args.index("--num-labels") + 2 :]
    flags = ["--noise-multiplier", "1", "--delta", "1e-3"]
    err = refused([*args, *flags], run, capsys)
    assert "DP training takes its classes from the settings, not from the private data" in err
    named = tmp_path / "train.tsv"
    named.write_text(named.read_text().replace("\t0\n", "\tneg\n").replace("\t1\n", "\tpos\n"))
    err = refused([*args, *flags, "--num-labels", "2"], run, capsys)
    assert "--labels NAMES for named classes" in err
    assert main([*args, *flags, "--labels", "neg,pos"]) == 0
    assert json.loads((run / "job.json").read_text())["labels"] == ["neg", "pos"]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--target-epsilon", "8"], "--target-epsilon"),
        (["--noise-multiplier", "1"], "--noise-multiplier"),
        (["--max-grad-norm", "0.5"], "--max-grad-norm"),
        (["--accountant", "prv"], "--accountant"),
        # given as the defaults are: still asked for, and still not honoured without --dp
        (["--max-grad-norm", "1"], "--max-grad-norm"),
        (["--delta", "1e-5"], "--delta"),
        (["--accountant", "rdp"], "--accountant"),
    ],
)
def test_a_dp_setting_without_dp_is_refused_not_trained_without_privacy(
    tiny_bert_dir, tmp_path, capsys, flags, named
) -> None:
    run = tmp_path / "run"
    args = [a for a in dp_train_args(tiny_bert_dir, small_tsv(tmp_path / "train.tsv"), run) if a != "--dp"]
    err = refused([*args, *flags], run, capsys)
    assert f"{named} (" in err and "applies to DP training, which is off" in err and "add --dp" in err


def test_prv_reports_the_rdp_bound_where_its_numerics_saturate_or_fail() -> None:
    for sigma in (0.02, 1e-4):  # PRV: epsilon capped near 709.8; a histogram beyond memory
        prv, rdp = Accountant("prv"), Accountant("rdp")
        prv.step(sigma, 0.1)
        rdp.step(sigma, 0.1)
        with pytest.warns(UserWarning, match="the RDP bound, always valid, is reported instead"):
            reported = prv.epsilon(1e-3)
        assert reported == rdp.epsilon(1e-3) > 1000  # the exact epsilon at 0.02 is about 1363
    typical = Accountant("prv")
    typical.step(1.0, 0.1, 50)
    assert typical.epsilon(1e-3) < Accountant.epsilon_after(Accountant("rdp"), 1e-3, 1.0, 0.1, 50)  # tighter


@pytest.mark.parametrize(("kind", "target"), [("prv", 1000.0), ("rdp", 1e20)])
def test_a_budget_beyond_what_the_accountant_computes_is_refused_not_searched_forever(kind, target) -> None:
    with pytest.raises(PrivacyError, match=f"beyond what the {kind} accountant computes reliably"):
        noise_for_budget(target, 1e-3, 0.1, 1, kind)


@pytest.mark.parametrize("sigma", [1e-300, 1e300])
def test_a_noise_multiplier_the_accountants_cannot_compute_with_is_refused(sigma) -> None:
    with pytest.raises(PrivacyError, match="must be 0 \\(no noise\\) or between 1e-06 and 1e\\+06"):
        DPConfig(dp=True, noise_multiplier=sigma)


def test_batch_norm_is_refused_under_dp_even_frozen(tiny_bert_dir) -> None:
    from lorakit.privacy.grad_sample import _check_trainable_modules

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    lorakit.apply(model, "lora", targets=["0"], rank=2, train_modules=["2"])
    assert not any(p.requires_grad for p in model[1].parameters())  # frozen: its statistics still mix
    with pytest.raises(PrivacyError, match="'1' \\(BatchNorm1d\\) normalises by the batch's statistics"):
        _check_trainable_modules(model)
    model[1] = torch.nn.GroupNorm(2, 4)
    _check_trainable_modules(model)


def test_a_private_rows_label_is_not_quoted_in_the_refusal(tiny_bert_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    data = tmp_path / "train.tsv"
    small_tsv(data)
    data.write_text(data.read_text().replace("film 3\t1", "film 3\tHIV-positive"))
    args = [*dp_train_args(tiny_bert_dir, str(data), run), "--noise-multiplier", "1", "--delta", "1e-3"]
    err = refused(args, run, capsys)
    assert "HIV-positive" not in err and "row" in err and "not shown under DP" in err
    assert "HIV-positive" in refused([a for a in args[:-4] if a != "--dp"], run, capsys)  # not private: named


def test_dp_settings_without_dp_are_refused_in_a_users_job_and_a_saved_one_still_reads() -> None:
    from lorakit.jobs.cliargs import job_from_values

    assert DPConfig(accountant="prv").accountant == "prv"  # as an earlier run's job.json may hold it
    for values, flag in (({"delta": 1e-3}, "--delta"), ({"dp_insecure_seed": True}, "--dp-insecure-seed")):
        with pytest.raises(PrivacyError, match=f"{flag} \\(.*\\) applies to DP training, which is off"):
            job_from_values(values)  # a YAML config or bench run, as the command line
    assert job_from_values({"dp": True, "delta": 1e-3, "noise_multiplier": 1.0}).privacy.delta == 1e-3


def test_the_sample_rate_counts_the_private_rows_not_the_answers_max_length_kept(
    chat_llama_dir, tmp_path
) -> None:
    """The released sampling rate is B / N: N must be the number of training rows, which DP-SGD treats as
    public, not the number whose answers fit in max length, which would reveal how many private prompts
    are long. A row whose answer was cut away stays an example that trains nothing."""
    rows = [{"prompt": f"What is {i} plus 2?", "response": f"The answer is {i + 2}."} for i in range(20)]
    long = [dict(rows[0], prompt="Please. " * 40 + rows[0]["prompt"])]
    rates = []
    for name, data in (("short", rows), ("long", long + rows[1:])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        run = tmp_path / name
        argv = [
            "train", "--model", str(chat_llama_dir), "--data", str(path), "--max-length", "48", "--steps",
            "2", "--batch-size", "4", "--targets", "all-linear", "--no-progress", "--output-dir", str(run),
            "--dp", "--noise-multiplier", "1", "--delta", "1e-3",
        ]  # fmt: skip
        assert main(argv) == 0
        rates.append(json.loads((run / "adapter.json").read_text())["privacy"]["sample_rate"])
    assert rates == [4 / 20, 4 / 20]


def test_a_private_conversations_problem_is_named_without_its_row(chat_llama_dir, tmp_path, capsys) -> None:
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}]}
            for i in range(12)]  # fmt: skip
    rows[7]["messages"][1]["role"] = "SECRET-ROLE-bob"
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    argv = [
        "train", "--model", str(chat_llama_dir), "--data", str(data), "--messages-column", "messages",
        "--steps", "1", "--batch-size", "4", "--no-progress", "--output-dir", str(run),
    ]  # fmt: skip
    for private in (True, False):
        capsys.readouterr()
        assert main([*argv, "--dp", "--noise-multiplier", "1", "--delta", "1e-3"] if private else argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and not run.exists()
        if private:
            assert "SECRET" not in err and "row 8" not in err and "not shown under DP" in err
        else:
            assert "row 8" in err and "SECRET-ROLE-bob" in err


def test_dp_sgd_refuses_gradient_checkpointing_and_bf16_trained_tensors() -> None:
    """Checkpointed blocks capture their activations twice (per-example gradients 2.9x off in one case), and
    bf16 gradients clip to above the bound: both are refused by train_dp's module check, as by the CLI."""
    from conftest import tiny_llama

    from lorakit.jobs.cliargs import job_from_values
    from lorakit.privacy.grad_sample import _check_trainable_modules

    model = lorakit.apply(tiny_llama(), "lora", targets="all-linear", rank=2)
    _check_trainable_modules(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(PrivacyError, match="gradient checkpointing.*per-example gradients wrong"):
        _check_trainable_modules(model)
    model = lorakit.apply(tiny_llama(), "lora", targets="all-linear", rank=2, adapter_dtype="bfloat16")
    with pytest.raises(PrivacyError, match="cannot clip bfloat16 gradients exactly"):
        _check_trainable_modules(model)
    dp = {"dp": True, "noise_multiplier": 1.0, "delta": 1e-3}
    with pytest.raises(PrivacyError, match="cannot clip bfloat16 gradients exactly"):
        job_from_values({**dp, "options": {"adapter_dtype": "bfloat16"}})
