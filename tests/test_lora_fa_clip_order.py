"""LoRA-FA's v2 correction runs after gradient clipping, as in PEFT's optimizer, in every driver.

Each test captures the gradient the driver hands to ``optimizer.step`` and compares it with the gradient
before clipping, transformed by hand in float64: clip first, then ``(1/s^2) g_B (A A^T)^-1`` (PEFT's order)
must match; precondition first, then clip (the old order) must not.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import Tensor, nn
from transformers import TrainerCallback, TrainingArguments

import lorakit
from lorakit.core.variant import Hook
from lorakit.integrations.transformers import LorakitTrainer
from lorakit.train.loop import TrainConfig, train

CLIP = 0.05


class Seen(Hook):
    """Runs after the variant's hook: keeps the gradients after backward and those the optimizer applies."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, [], 1)
        self.raw: list[Tensor] = []
        self.applied: list[Tensor] = []

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def on_after_backward(self, step: int) -> None:
        self.raw = [p.grad.detach().double().clone() for p in self.trainable()]

    def on_before_optimizer_step(self, step: int) -> None:
        self.applied = [p.grad.detach().double().clone() for p in self.trainable()]


def preconditioned(model: nn.Module, grads: list[Tensor]) -> list[Tensor]:
    """``(1/s^2) g_B (A A^T)^-1`` on every ``B`` gradient in float64; other gradients unchanged."""
    by_B = {id(layer.variant.B): layer.variant for _, layer in lorakit.adapted_layers(model)}
    out = []
    for p, g in zip([p for p in model.parameters() if p.requires_grad], grads, strict=True):
        v = by_B.get(id(p))
        if v is None:
            out.append(g)
            continue
        A = v.A.detach().double()
        out.append(g @ torch.linalg.inv(A @ A.t()) / v.scale**2)
    return out


def clipped(grads: list[Tensor], max_norm: float) -> list[Tensor]:
    """``torch.nn.utils.clip_grad_norm_``'s rule: one factor ``min(1, C / (||g|| + 1e-6))`` for all."""
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    return [g * min(1.0, max_norm / (float(norm) + 1e-6)) for g in grads]


def assert_equal_tensors(got: list[Tensor], want: list[Tensor]) -> None:
    """Equal up to float32 rounding (the variant computes in float32, the reference in float64)."""
    for g, w in zip(got, want, strict=True):
        assert float((g - w).norm()) <= 1e-5 * float(w.norm()), float((g - w).norm() / w.norm())


def assert_clip_then_precondition(model: nn.Module, raw: list[Tensor], applied: list[Tensor]) -> None:
    assert float(torch.sqrt(sum(g.square().sum() for g in raw))) > 2 * CLIP, "clipping must be active"
    expected = preconditioned(model, clipped(raw, CLIP))
    old_order = clipped(preconditioned(model, raw), CLIP)
    assert_equal_tensors(applied, expected)
    gap = max(float((a - b).norm() / b.norm()) for a, b in zip(old_order, expected, strict=True))
    assert gap > 0.1, "the two orders must differ here, or the test could not tell them apart"


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return (self.fc2(torch.tanh(self.fc1(x))) - labels).square().mean()


class Batches:
    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(1)

    def __next__(self) -> dict[str, Tensor]:
        x = torch.randn(8, 16, generator=self.gen)
        return {"x": x, "labels": 3 * x[:, :8]}


def test_loop_preconditions_the_clipped_gradient() -> None:
    model = lorakit.apply(Regression(), "lora_fa", rank=4, alpha=8.0, dropout=0.0, precondition=True)
    seen = Seen(model)
    cfg = TrainConfig(steps=1, grad_accum=2, clip=CLIP, warmup_ratio=0.0, progress=False)
    train(model, Batches(), cfg, hooks=[seen])
    assert_clip_then_precondition(model, seen.raw, seen.applied)


class Applied(TrainerCallback):
    """Added after lorakit's callback: sees the gradient ``optimizer.step`` is about to apply."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.grads: list[Tensor] = []

    def on_pre_optimizer_step(self, args: object, state: object, control: object, **kwargs: object) -> None:
        self.grads = [p.grad.detach().double().clone() for p in self.model.parameters() if p.requires_grad]


def test_trainer_preconditions_the_clipped_gradient(tmp_path, monkeypatch) -> None:
    model = lorakit.apply(tiny_llama(), "lora_fa", rank=4, alpha=8.0, dropout=0.0, precondition=True)
    ids = torch.arange(48).reshape(4, 12) % 64
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        max_grad_norm=CLIP,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = LorakitTrainer(model=model, args=args, train_dataset=data)
    applied = Applied(model)
    trainer.add_callback(applied)
    raw: list[Tensor] = []
    clip = trainer.accelerator.clip_grad_norm_

    def record_then_clip(parameters: object, max_norm: float) -> Tensor:
        raw.extend(p.grad.detach().double().clone() for p in model.parameters() if p.requires_grad)
        return clip(parameters, max_norm)

    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", record_then_clip)
    trainer.train()
    assert_clip_then_precondition(model, raw, applied.grads)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dp_sgd_preconditions_the_privatised_gradient(tiny_bert_dir) -> None:
    """DP-SGD clips per example and adds noise; the correction then acts on that privatised gradient."""
    pytest.importorskip("opacus")
    from lorakit.data import datasets as D
    from lorakit.jobs.models import head_modules, load_model
    from lorakit.privacy import DPConfig
    from lorakit.privacy.dp_sgd import train_dp

    model, tokenizer = load_model(str(tiny_bert_dir), "classification")
    heads = head_modules(model, "classification")
    lorakit.apply(model, "lora_fa", targets=["query", "value"], train_modules=heads, precondition=True)
    data = D.tokenize_classification(D.demo_rows("train")[:40], tokenizer, "sentence", "label", 24, "demo")
    seen = Seen(model)
    cfg = TrainConfig(steps=1, batch_size=20, progress=False, seed=1)
    dp = DPConfig(dp=True, noise_multiplier=1.0, max_grad_norm=CLIP)
    train_dp(model, data, cfg, dp, hooks=[seen])
    expected = preconditioned(model, seen.raw)
    assert any(
        float((a - b).norm()) > 1e-3 * float(b.norm()) for a, b in zip(expected, seen.raw, strict=True)
    )
    assert_equal_tensors(seen.applied, expected)
