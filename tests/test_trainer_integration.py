"""LorakitTrainer: hooks run at lorakit's call points inside transformers.Trainer, extra losses count once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

import lorakit
from lorakit.common.errors import SettingError
from lorakit.engine.checkpoint import ResumeError
from lorakit.integrations.transformers import HOOKS_FILE, LorakitCallback, LorakitTrainer
from lorakit.train.loop import TrainConfig, train
from lorakit.variants.adalora import rank_pattern
from lorakit.variants.dylora import DyLoRAHook

STEPS, ACCUM, BATCH, LR = 20, 2, 4, 1e-2


def sequences(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Counting sequences ``s, s+1, ...`` (mod 64): learnable, so the loss must drop."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 64, (n,), generator=gen)
    return [{"input_ids": ids, "labels": ids} for ids in (starts[:, None] + torch.arange(12)) % 64]


def loss_on(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def trainer_for(model: torch.nn.Module, data: list, tmp_path, eval_dataset=None, **args) -> LorakitTrainer:
    args = {"save_strategy": "no", "max_steps": STEPS, **args}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        **args,
    )
    return LorakitTrainer(model=model, args=args, train_dataset=data, eval_dataset=eval_dataset)


def test_dylora_rank_is_resampled_each_step_at_the_loop_call_points(tmp_path, monkeypatch) -> None:
    events: list[tuple] = []
    for point in ("on_step_start", "on_after_backward", "on_after_step"):
        original = getattr(DyLoRAHook, point)

        def record(self, step: int, point=point, original=original) -> None:
            events.append((point, step))
            original(self, step)

        monkeypatch.setattr(DyLoRAHook, point, record)
    model = lorakit.apply(
        tiny_llama(), "dylora", targets="all-linear", rank=4, alpha=8.0, dropout=0.0, seed=2
    )
    first = lorakit.adapted_layers(model)[0][1]
    first.register_forward_hook(
        lambda m, i, o: events.append(("forward", m.variant.active_rank())) if m.training else None
    )
    data, held_out = sequences(STEPS * ACCUM * BATCH, 0), sequences(16, 1)
    before = loss_on(model, held_out)
    trainer = trainer_for(model, data, tmp_path)
    clip = trainer.accelerator.clip_grad_norm_
    monkeypatch.setattr(
        trainer.accelerator, "clip_grad_norm_", lambda *a, **k: events.append(("clip",)) or clip(*a, **k)
    )
    trainer.train()
    ranks = [DyLoRAHook(model, [first], STEPS).rank_at(step) for step in range(STEPS)]
    expected = []
    for step, b in enumerate(ranks):  # lorakit's order, with the step's one rank in every micro-batch
        expected += [("on_step_start", step), *[("forward", b)] * ACCUM]
        expected += [("on_after_backward", step), ("clip",), ("on_after_step", step)]
    assert events == expected
    assert len(set(ranks)) >= 2
    assert loss_on(model, held_out) < before - 0.1  # it learnt to count (on unseen starts)


def test_adalora_under_trainer_equals_the_lorakit_loop_so_extra_loss_counts_once(tmp_path) -> None:
    """Same batches, optimizer and schedule: the Trainer run must reproduce lorakit's loop, where the
    orthogonality penalty enters each optimizer step once (the Trainer would add it per micro-batch)."""
    config = {"init_r": 4, "target_r": 2, "t_init": 1, "t_final": 1, "alpha": 8.0, "dropout": 0.0}
    data = sequences(STEPS * ACCUM * BATCH, 0)
    ours = lorakit.apply(tiny_llama(), "adalora", targets="all-linear", **config)
    rows = [data[i : i + BATCH] for i in range(0, len(data), BATCH)]
    batches = iter([{k: torch.stack([r[k] for r in chunk]) for k in data[0]} for chunk in rows])
    cfg = TrainConfig(STEPS, BATCH, ACCUM, LR, warmup_ratio=0.0, schedule="constant", progress=False)
    train(ours, batches, cfg)

    theirs = lorakit.apply(tiny_llama(), "adalora", targets="all-linear", **config)
    before = loss_on(theirs, data[:16])
    trainer = trainer_for(theirs, data, tmp_path)
    assert trainer.model_accepts_loss_kwargs  # the task loss arrives already scaled for accumulation
    penalty: list[tuple[int, float]] = []
    extra = trainer.lorakit_callback.extra_loss

    def recorded(step: int) -> torch.Tensor | None:
        value = extra(step)
        penalty.append((step, float(value.detach())))
        return value

    trainer.lorakit_callback.extra_loss = recorded
    trainer.train()
    assert [s for s, _ in penalty] == [s for s in range(STEPS) for _ in range(ACCUM)]  # every micro-batch
    assert penalty[0][1] > 0.1 and penalty[-1][1] < penalty[0][1] / 2  # a real term, and optimised
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)
    pattern = rank_pattern(theirs)
    assert sum(pattern.values()) == 2 * len(pattern)  # the budget hook ran to its final mask
    assert loss_on(theirs, data[:16]) < before - 0.05


def test_a_non_finite_gradient_stops_the_trainer_before_the_weights_change(tmp_path) -> None:
    """As lorakit's own loop: a NaN gradient raises NonFiniteError before ``optimizer.step``."""
    from lorakit.adapters.io import NonFiniteError

    model = lorakit.apply(tiny_llama(), "lora", targets="all-linear", rank=2, alpha=4.0, dropout=0.0)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("variant.B")).fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stopped = r"stopped at step 1: the gradient norm is nan \(not finite\); the Trainer's checkpoints"
    with pytest.raises(NonFiniteError, match=stopped):
        trainer_for(model, sequences(16, 0), tmp_path).train()
    for n, p in model.named_parameters():
        if p.requires_grad:  # the NaN factor stays as it was set, every other weight untouched
            assert torch.equal(p, before[n]) or torch.isnan(before[n]).all()


@pytest.mark.parametrize(
    ("optim", "expected"),
    [("adamw_torch", "AdamW"), ("sgd", "SGD"), ("adafactor", "Adafactor"), ("adamw_bnb_8bit", "AdamW")],
)
def test_the_optimizer_is_the_one_training_arguments_name(tmp_path, optim: str, expected: str) -> None:
    if "bnb" in optim:
        pytest.importorskip("bitsandbytes")
    model = lorakit.apply(tiny_llama(), "lora_plus", targets=["q_proj", "v_proj"], rank=4, ratio=4.0)
    trainer = trainer_for(model, sequences(8, 0), tmp_path, optim=optim, adam_beta1=0.8)
    optimizer = trainer.create_optimizer()
    assert type(optimizer).__name__ == expected
    module = type(optimizer).__module__
    assert module.startswith("bitsandbytes") == ("bnb" in optim)
    if "adamw" in optim:
        assert all(g["betas"][0] == 0.8 for g in optimizer.param_groups)  # the Trainer's arguments
    if "bnb" in optim:
        assert optimizer.args.optim_bits == 8  # 8-bit state, as the Trainer builds it
    rates = sorted({g["lr"] for g in optimizer.param_groups})
    assert rates == [LR, 4.0 * LR]  # lorakit's groups: LoRA+'s rate for B


def test_an_optimizer_that_builds_its_own_groups_is_refused(tmp_path) -> None:
    model = lorakit.apply(tiny_llama(), "lora", targets=["q_proj"], rank=4)
    trainer = trainer_for(model, sequences(8, 0), tmp_path)
    trainer.optimizer_cls_and_kwargs = (torch.optim.SGD, {"params": list(model.parameters()), "lr": 0.1})
    with pytest.raises(SettingError, match="builds its own params, so lorakit's parameter groups"):
        trainer.create_optimizer()
    missing = trainer_for(model, sequences(8, 0), tmp_path, optim="galore_adamw")
    missing.optimizer_cls_and_kwargs = None
    with pytest.raises(SettingError, match="TrainingArguments.optim='galore_adamw': "):
        missing.create_optimizer()


def test_an_optimizer_not_following_the_variants_rates_is_refused_before_a_step(tmp_path) -> None:
    """LoRA+ trains B at ratio x A's rate: a user's optimizer over one group (LorakitTrainer's optimizers=,
    or a plain Trainer with LorakitCallback) trained both at one rate, silently; one leaving a tensor out
    never trained it."""
    from transformers import Trainer

    from lorakit.integrations.transformers import LorakitCallback

    def lora_plus():
        return lorakit.apply(tiny_llama(), "lora_plus", targets=["q_proj", "v_proj"], rank=4, ratio=16.0)

    model = lora_plus()
    trainable = [p for p in model.parameters() if p.requires_grad]
    one_rate = trainer_for(model, sequences(8, 0), tmp_path)
    one_rate.optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    before = [p.detach().clone() for p in trainable]
    with pytest.raises(SettingError, match="learning rates do not follow the ones variant 'lora_plus' sets"):
        one_rate.train()
    assert all(torch.equal(p, q) for p, q in zip(trainable, before, strict=True))  # refused before a step
    plain = Trainer(
        model=model, args=one_rate.args, train_dataset=sequences(8, 0), callbacks=[LorakitCallback(model)]
    )
    with pytest.raises(SettingError, match="learning rates do not follow"):
        plain.train()  # the Trainer's own optimizer: its weight-decay groups at one rate
    own = trainer_for(model, sequences(8, 0), tmp_path)
    own.optimizer = torch.optim.SGD(
        lorakit.param_groups(model, 3e-3), lr=3e-3
    )  # any base rate, in proportion
    own.train()
    partial = trainer_for(lora_plus(), sequences(8, 0), tmp_path)
    partial.optimizer = torch.optim.SGD(
        [next(p for p in partial.model.parameters() if p.requires_grad)], lr=0.1
    )
    with pytest.raises(SettingError, match="the optimizer leaves out 7 of the 8 trainable tensors"):
        partial.train()


def test_a_plain_trainer_refuses_a_variant_whose_loss_it_cannot_add(tmp_path) -> None:
    from transformers import Trainer

    from lorakit.integrations.transformers import LorakitCallback

    model = lorakit.apply(
        tiny_llama(), "adalora", targets=["q_proj"], target_r=2, init_r=4, total_steps=STEPS
    )
    args = trainer_for(model, sequences(8, 0), tmp_path).args
    plain = Trainer(model=model, args=args, train_dataset=sequences(8, 0), callbacks=[LorakitCallback(model)])
    with pytest.raises(SettingError, match="adds a term of its own to the loss .* use LorakitTrainer"):
        plain.train()  # trained without AdaLoRA's orthogonality penalty
    trainer_for(model, sequences(8, 0), tmp_path).train()  # LorakitTrainer adds it


def test_reloading_the_best_weights_is_refused_where_the_rules_keep_state_beside_them(tmp_path) -> None:
    """The Trainer reloads only the best checkpoint's weights: AdaLoRA then ran them with the last step's rank
    masks, a model that matched no checkpoint (0.067 off the best one's logits)."""
    config = {"target_r": 2, "init_r": 4, "total_steps": STEPS}
    model = lorakit.apply(tiny_llama(), "adalora", targets=["q_proj"], **config)
    best = {"eval_strategy": "steps", "eval_steps": 5, "save_strategy": "steps", "save_steps": 5}
    best |= {"load_best_model_at_end": True, "eval_dataset": sequences(4, 1)}
    trainer = trainer_for(model, sequences(8, 0), tmp_path, **best)
    with pytest.raises(SettingError, match="load_best_model_at_end reloads only the best checkpoint's"):
        trainer.train()
    lora = lorakit.apply(tiny_llama(), "lora", targets=["q_proj"], rank=2)
    trainer_for(lora, sequences(8, 0), tmp_path / "lora", **best).train()  # its state is all in the weights


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step


def whole_and_stopped(build, data: list, tmp_path) -> tuple[torch.nn.Module, Path]:
    """A model trained ``STEPS`` steps straight, and the checkpoint of a ``build()`` run stopped halfway."""
    whole = build()
    trainer_for(whole, data, tmp_path / "whole").train()
    half = STEPS // 2
    stopped = trainer_for(build(), data, tmp_path / "part", save_strategy="steps", save_steps=half)
    stopped.add_callback(_StopAt(half))
    stopped.train()
    return whole, tmp_path / "part" / f"checkpoint-{half}"


def test_a_resumed_trainer_run_continues_the_rules_as_the_uninterrupted_one(tmp_path) -> None:
    """AdaLoRA's importance averages and masks are saved with each Trainer checkpoint and read back on
    resume, so the budget ends as in the uninterrupted run (they were rebuilt fresh, and it pruned
    differently)."""
    data = sequences(STEPS * BATCH * ACCUM, 0)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        options = dict(init_r=4, target_r=2, t_init=2, t_final=2, alpha=8.0, dropout=0.0)
        return lorakit.apply(tiny_llama(), "adalora", targets="all-linear", **options)

    whole, checkpoint = whole_and_stopped(build, data, tmp_path)
    half = STEPS // 2
    assert (checkpoint / HOOKS_FILE).is_file()
    resumed = build()
    trainer_for(resumed, data, tmp_path / "part").train(resume_from_checkpoint=True)
    ranks = [[layer.variant.rank for _, layer in lorakit.adapted_layers(m)] for m in (whole, resumed)]
    assert ranks[0] == ranks[1] and sum(ranks[0]) < 4 * len(ranks[0])  # pruned, and alike
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    (checkpoint / HOOKS_FILE).unlink()  # a checkpoint without the rules' state cannot resume them
    with pytest.raises(ResumeError, match=f"checkpoint-{half} holds no {HOOKS_FILE}: the state of variant"):
        trainer_for(build(), data, tmp_path / "part").train(resume_from_checkpoint=str(checkpoint))


def test_an_adapter_sharing_tensors_saves_resumes_and_saves_in_lorakits_format(tmp_path) -> None:
    # VeRA's layers share their projections: checkpoints keep one copy (safetensors holds no aliases),
    # resuming fills the others, and save_model writes lorakit's adapter, which lorakit.load reads.
    data = sequences(STEPS * BATCH * ACCUM, 0)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return lorakit.apply(tiny_llama(), "vera", targets="all-linear", rank=8, dropout=0.0)

    whole, checkpoint = whole_and_stopped(build, data, tmp_path)
    resumed = build()
    trainer = trainer_for(resumed, data, tmp_path / "part")
    trainer.train(resume_from_checkpoint=checkpoint)  # a Path, as the Trainer takes
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    trainer.save_model(str(tmp_path / "final"))
    loaded = lorakit.load(tiny_llama(), tmp_path / "final")
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, resumed.eval()(ids).logits, rtol=0, atol=1e-6)
    plain = Trainer(
        model=build(), args=trainer.args, train_dataset=data
    )  # its save_model could not hold them
    plain.add_callback(LorakitCallback(plain.model))
    with pytest.raises(
        SettingError, match="'vera' adapter shares tensors between layers, .* use LorakitTrainer"
    ):
        plain.train()


def test_resuming_with_another_max_steps_is_refused_where_the_rules_depend_on_it(tmp_path) -> None:
    data = sequences(STEPS * BATCH * ACCUM, 0)
    options = dict(init_r=4, target_r=2, t_init=2, t_final=2, alpha=8.0, dropout=0.0)
    model = lorakit.apply(tiny_llama(), "adalora", **options)
    first = trainer_for(model, data, tmp_path, save_strategy="steps", save_steps=6, max_steps=6)
    first.train()
    longer = trainer_for(lorakit.apply(tiny_llama(), "adalora", **options), data, tmp_path, max_steps=10)
    with pytest.raises(ResumeError, match="checkpoint-6 was trained for max_steps=6 and this run has 10"):
        longer.train(resume_from_checkpoint=True)


def test_a_tensor_trainable_outside_the_adapter_or_none_at_all_is_refused(tmp_path) -> None:
    model = lorakit.apply(tiny_llama(), "lora", rank=2)
    model.lm_head.weight.requires_grad_(True)  # by hand, not through train_modules: it would never move
    with pytest.raises(SettingError, match="lm_head.weight is trainable but neither part of the adapter"):
        trainer_for(model, sequences(16, 0), tmp_path).train()
    with pytest.raises(SettingError, match="lm_head.weight is trainable"):
        train(model, [sequences(4, 0)[0]], TrainConfig(steps=1))
    # A plain Trainer's own optimizer takes every trainable tensor: that one trains there, as the user meant.
    plain = Trainer(model=model, args=trainer_for(model, [], tmp_path).args, train_dataset=sequences(64, 0))
    plain.add_callback(LorakitCallback(model))
    before = model.lm_head.weight.detach().clone()
    plain.train()
    assert not torch.equal(model.lm_head.weight, before)
    # LorakitTrainer's save_model writes the adapter and train_modules: an optimizer of one's own that takes
    # the tensor would train what is then not saved.
    own = torch.optim.AdamW([*lorakit.param_groups(model, LR), {"params": [model.lm_head.weight]}], lr=LR)
    theirs = LorakitTrainer(
        model=model, args=plain.args, train_dataset=sequences(64, 0), optimizers=(own, None)
    )
    with pytest.raises(SettingError, match="lm_head.weight is trainable .* neither train nor save it"):
        theirs.train()
    model.lm_head.weight.requires_grad_(False)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(SettingError, match="'lora' adapter has no trainable tensors"):
        trainer_for(model, sequences(16, 0), tmp_path).train()
    plain = Trainer(model=model, args=plain.args, train_dataset=sequences(64, 0))
    plain.add_callback(LorakitCallback(model))
    with pytest.raises(SettingError, match="'lora' adapter has no trainable tensors"):
        plain.train()


def test_fp16_on_a_cpu_keeps_the_non_finite_check_and_a_skipped_step_runs_no_rule(tmp_path) -> None:
    from lorakit.adapters.io import NonFiniteError

    model = lorakit.apply(tiny_llama(), "lora", rank=2, dropout=0.0)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("variant.B")).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="stopped at step 1"):  # no loss scaler on a CPU: nothing skips
        trainer_for(model, sequences(16, 0), tmp_path, fp16=True).train()
    # A step the loss scaler skipped (non-finite gradients, on a GPU) runs no rule: AdaLoRA's importance
    # would take in the non-finite gradients and prune by NaN scores.
    from accelerate.optimizer import AcceleratedOptimizer

    model = lorakit.apply(tiny_llama(), "adalora", init_r=4, target_r=2, t_init=0, t_final=0, dropout=0.0)
    callback = LorakitCallback(model, adds_loss=True)
    state = TrainerState(max_steps=3)
    callback.on_train_begin(trainer_for(model, [], tmp_path).args, state, None)
    ran = []
    callback.hooks.after_step = ran.append
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), device_placement=False)
    for skipped, step in [(True, 0), (False, 1)]:
        optimizer._is_overflow = skipped
        state.global_step = step
        callback.on_optimizer_step(None, state, None, optimizer=optimizer)
    assert ran == [1]
