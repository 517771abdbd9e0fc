"""LoRA+: lr_B = ratio * lr_A, embedding adapters at their own rate, weight decay as given, PEFT parity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.kinds import KINDS
from lorakit.core.layer import AdaptedLayer
from lorakit.variants.lora_plus import LoRAPlus, LoRAPlusConfig

LR, WD, RATIO, EMB_LR = 1e-3, 0.05, 8.0, 2e-6


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(self.emb(ids))))))


TARGETS = ["emb", "fc1", "fc2", "out"]


def ours() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    return lorakit.apply(model, "lora_plus", targets=TARGETS, rank=4, ratio=RATIO, embedding_lr=EMB_LR)


def lr_of(groups: list[dict], p: torch.Tensor) -> float:
    hits = [g for g in groups if any(q is p for q in g["params"])]
    assert len(hits) == 1, "every trainable parameter must be in exactly one group"
    return hits[0]["lr"]


def test_group_learning_rates_and_partition() -> None:
    model = ours()
    groups = lorakit.param_groups(model, LR, WD)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) == 8
    assert all(g["weight_decay"] == WD for g in groups), "weight decay stays as the user set it"
    for name, layer in lorakit.adapted_layers(model):
        v = layer.variant
        if name == "emb":
            assert lr_of(groups, v.A) == lr_of(groups, v.B) == EMB_LR
        else:
            assert lr_of(groups, v.A) == LR and lr_of(groups, v.B) == pytest.approx(LR * RATIO)


def test_formula_one_sgd_step_moves_B_ratio_times_faster() -> None:
    model = ours()
    with torch.no_grad():
        model.fc1.variant.B.normal_()
    opt = torch.optim.SGD(lorakit.param_groups(model, LR, 0.0))
    v = model.fc1.variant
    a0, b0 = v.A.detach().clone(), v.B.detach().clone()
    model(torch.randint(0, 30, (4, 5))).square().mean().backward()
    ga, gb = v.A.grad.clone(), v.B.grad.clone()
    opt.step()
    torch.testing.assert_close(v.A.detach(), a0 - LR * ga)  # eta_A = lr
    torch.testing.assert_close(v.B.detach(), b0 - LR * RATIO * gb)  # eta_B = ratio * lr


@pytest.mark.parametrize("one_d_at_ratio", [True, False])
def test_one_dimensional_parameters_follow_the_option(one_d_at_ratio: bool) -> None:
    class WithBias(LoRAPlus):  # a subclass with a 1-D trainable, as DoRA's magnitude would be
        def __init__(self, config: LoRAPlusConfig, base: AdaptedLayer, shared: dict) -> None:
            super().__init__(config, base, shared)
            self.b = nn.Parameter(torch.zeros(base.out_features))

    cfg = LoRAPlusConfig(rank=2, ratio=RATIO, one_d_at_ratio=one_d_at_ratio)
    layer = AdaptedLayer(nn.Linear(5, 4), KINDS["linear"], WithBias, cfg, {})
    groups = layer.variant.param_groups(LR, WD)
    assert lr_of(groups, layer.variant.b) == pytest.approx(LR * RATIO if one_d_at_ratio else LR)
    assert lr_of(groups, layer.variant.A) == LR


def test_scheduler_keeps_the_ratio() -> None:
    model = ours()
    opt = torch.optim.AdamW(lorakit.param_groups(model, LR, WD))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    v = model.fc2.variant
    for _ in range(3):
        model(torch.randint(0, 30, (2, 3))).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    lr_b, lr_a = lr_of(opt.param_groups, v.B), lr_of(opt.param_groups, v.A)
    assert lr_a == pytest.approx(LR * 0.125)
    assert lr_b / lr_a == pytest.approx(RATIO)
    assert lr_of(opt.param_groups, model.emb.variant.A) == pytest.approx(EMB_LR * 0.125)


def test_config_rejects_bad_ratio() -> None:
    with pytest.raises(lorakit.ConfigError, match="ratio"):
        LoRAPlusConfig(ratio=0.0)


def test_group_learning_rates_match_peft_create_loraplus_optimizer() -> None:
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    base = Tiny()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    opt = create_loraplus_optimizer(
        theirs,
        torch.optim.AdamW,
        lr=LR,
        loraplus_lr_ratio=RATIO,
        loraplus_lr_embedding=EMB_LR,
        loraplus_weight_decay=WD,
    )
    peft_lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    peft_wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    peft_params = dict(theirs.named_parameters())
    model = lorakit.apply(base, "lora_plus", targets=TARGETS, rank=4, ratio=RATIO, embedding_lr=EMB_LR)
    groups = lorakit.param_groups(model, LR, WD)
    checked = 0
    for name, layer in lorakit.adapted_layers(model):
        prefix = f"base_model.model.{name}."
        pa, pb = (
            ("lora_embedding_A.default", "lora_embedding_B.default")
            if name == "emb"
            else ("lora_A.default.weight", "lora_B.default.weight")
        )
        for mine, key in ((layer.variant.A, pa), (layer.variant.B, pb)):
            theirs_p = peft_params[prefix + key]
            assert lr_of(groups, mine) == pytest.approx(peft_lr[id(theirs_p)])
            assert peft_wd[id(theirs_p)] == WD
            checked += 1
    assert checked == len(peft_lr) == 8


class WithHead(nn.Module):
    """A head PEFT's suffix matching finds alone (a module named ``out`` also matches ``lora_dropout``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.classifier = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("one_d_at_ratio", [True, False])
def test_trained_head_bias_follows_the_one_d_rule(one_d_at_ratio: bool) -> None:
    torch.manual_seed(0)
    model = lorakit.apply(
        WithHead(),
        "lora_plus",
        targets=["fc1", "fc2"],
        train_modules=["classifier"],
        rank=4,
        ratio=RATIO,
        one_d_at_ratio=one_d_at_ratio,
    )
    groups = lorakit.param_groups(model, LR, WD)
    assert lr_of(groups, model.classifier.bias) == pytest.approx(LR * RATIO if one_d_at_ratio else LR)
    assert lr_of(groups, model.classifier.weight) == LR  # 2-D: the authors' group A
    assert lr_of(groups, model.fc1.variant.B) == pytest.approx(LR * RATIO)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) == 6


def test_trained_head_rates_match_peft_create_loraplus_optimizer() -> None:
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    base = WithHead()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["classifier"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    peft_lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    peft_params = dict(theirs.named_parameters())
    model = lorakit.apply(
        base, "lora_plus", targets=["fc1", "fc2"], train_modules=["classifier"], ratio=RATIO
    )
    groups = lorakit.param_groups(model, LR, WD)
    head = "base_model.model.classifier.modules_to_save.default"
    for tensor in ("weight", "bias"):
        theirs_p = peft_params[f"{head}.{tensor}"]
        assert lr_of(groups, getattr(model.classifier, tensor)) == pytest.approx(peft_lr[id(theirs_p)])
    assert peft_lr[id(peft_params[f"{head}.bias"])] == pytest.approx(LR * RATIO)
