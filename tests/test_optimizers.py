"""bitsandbytes optimizers by name: 8-bit AdamW trains on CPU, paged ones fall back off CUDA, clear errors."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import lorakit
from lorakit.train.loop import TrainConfig, make_optimizer, train

pytest.importorskip("bitsandbytes")
import bitsandbytes.optim as bnb_optim  # noqa: E402


class Regression(nn.Module):
    """A 512 -> 16 layer learning a rank-2 change: the (8, 512) LoRA A holds 4096 values, enough for 8-bit
    optimizer state (bitsandbytes keeps 32-bit state below 4096)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(512, 16)
        shift = torch.randn(16, 2) @ torch.randn(2, 512) * 0.05
        self.register_buffer("target", (self.body.weight + shift).detach())

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (self.body(x) - labels).square().mean()


class Batches:
    def __init__(self, model: Regression) -> None:
        self.gen = torch.Generator().manual_seed(1)
        self.target = model.target.cpu()

    def __next__(self) -> dict[str, torch.Tensor]:
        x = torch.randn(32, 512, generator=self.gen)
        return {"x": x, "labels": x @ self.target.t()}


def adapted(quantized: bool = False) -> Regression:
    model = Regression()
    if quantized:
        lorakit.quantize(model, compute_dtype=torch.float32)
    return lorakit.apply(model, "lora", targets=["body"], rank=8, alpha=8.0, dropout=0.0)


@pytest.mark.parametrize("quantized", [False, True], ids=["dense-base", "nf4-base"])
def test_adamw8bit_trains_on_cpu(quantized: bool) -> None:
    model = adapted(quantized)
    cfg = TrainConfig(
        steps=40, lr=1e-2, warmup_ratio=0.0, schedule="constant", optimizer="adamw8bit", progress=False
    )
    result = train(model, Batches(model), cfg)
    assert result.losses[-1] < 0.3 * result.losses[0]
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, bnb_optim.AdamW8bit)
    # The moments of A really are 8-bit codes after a step.
    model(**next(Batches(model))).backward()
    opt.step()
    state = opt.state[model.body.variant.A]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


@pytest.mark.parametrize(("name", "expected"), [("paged_adamw", "AdamW"), ("paged_adamw8bit", "AdamW8bit")])
def test_paged_optimizers_fall_back_on_cpu_with_a_warning(name: str, expected: str) -> None:
    model = adapted()
    with pytest.warns(UserWarning, match="page GPU memory only"):
        opt = make_optimizer(model, TrainConfig(optimizer=name))
    assert type(opt) is getattr(bnb_optim, expected)
    assert [g["lr"] for g in opt.param_groups] == [TrainConfig().lr]


def test_group_learning_rates_are_kept() -> None:
    # LoRA+ sets B's rate to ratio x lr: the 8-bit optimizer must keep each group's own rate.
    model = lorakit.apply(Regression(), "lora_plus", targets=["body"], rank=8, ratio=4.0)
    opt = make_optimizer(model, TrainConfig(optimizer="adamw8bit", lr=1e-3))
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([1e-3, 4e-3])


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'sgd8bit'; choose one of: adamw, adamw8bit"):
        make_optimizer(adapted(), TrainConfig(optimizer="sgd8bit"))


def test_missing_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(ImportError, match=r"pip install 'lorakit\[quant\]'"):
        make_optimizer(adapted(), TrainConfig(optimizer="adamw8bit"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paging needs CUDA")
def test_paged_adamw_is_paged_on_cuda() -> None:
    model = adapted().cuda()
    opt = make_optimizer(model, TrainConfig(optimizer="paged_adamw8bit"))
    assert type(opt) is bnb_optim.PagedAdamW8bit
    batch = {k: v.cuda() for k, v in next(Batches(model)).items()}
    model(**batch).backward()
    opt.step()
    assert getattr(opt.state[model.body.variant.A]["state1"], "is_paged", False)
