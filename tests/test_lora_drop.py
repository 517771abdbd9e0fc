"""LoRA-drop: cumulative-importance selection, importance = sum ||dW x||^2, shared pairs held once, stages."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.cli import main
from lorakit.core.contract import Driver
from lorakit.data.datasets import TokenizedData
from lorakit.train.loop import TrainConfig, stage_run
from lorakit.train.stages import run_stages
from lorakit.variants.lora_drop_stages import importance, select, stratified_sample


class Stack(nn.Module):
    """Four 8x8 layers and one 8x5 layer; ``attention_mask`` is accepted (and ignored) like a transformer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l0, self.l1, self.l2, self.l3 = (nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in (self.l0, self.l1, self.l2, self.l3):
            x = torch.tanh(layer(x))
        return self.head(x)


NAMES = ["l0", "l1", "l2", "l3", "head"]


def drop_model(kept: list[str] | None) -> Stack:
    model = lorakit.apply(Stack(), "lora_drop", targets=NAMES, rank=2, alpha=4.0, dropout=0.0, kept=kept)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B starts at zero: perturb so the adapters act
        for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def test_selection_keeps_modules_until_cumulative_importance_reaches_threshold() -> None:
    g = {"a": 10.0, "b": 50.0, "c": 10.0, "d": 30.0}  # I = .1 .5 .1 .3; order by importance: b d a c
    assert select(g, 0.5) == ["b"]
    assert select(g, 0.8) == ["b", "d"]
    assert select(g, 0.81) == ["b", "d", "a"]  # ties keep module order: a before c
    assert select(g, 1.0) == ["b", "d", "a", "c"]
    assert select({"a": 0.0, "b": 0.0}, 0.9) == ["a", "b"]  # nothing tells them apart: keep all
    with pytest.raises(lorakit.ConfigError, match="'threshold'"):
        lorakit.apply(Stack(), "lora_drop", targets=NAMES, threshold=1.5)


def test_importance_is_the_sum_of_squared_adapter_outputs_over_real_tokens() -> None:
    model = drop_model(kept=None).eval()
    x = torch.randn(3, 4, 8)  # (batch, tokens, features)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    by_hand = {}
    h = x
    with torch.no_grad():
        for name in NAMES:
            layer = getattr(model, name)
            v = layer.variant
            delta = v.scale * h @ v.A.T @ v.B.T  # dW_i x_i, the adapter's own output
            by_hand[name] = float((delta.square().sum(-1) * mask).sum())
            h = torch.tanh(layer(h)) if name != "head" else h
    scores = importance(
        model, [{"x": x[:2], "attention_mask": mask[:2]}, {"x": x[2:], "attention_mask": mask[2:]}]
    )
    assert scores.keys() == by_hand.keys()
    for name in NAMES:
        assert scores[name] == pytest.approx(by_hand[name], rel=1e-5)
    assert all(g > 0 for g in scores.values())


def test_stratified_sample_keeps_class_proportions() -> None:
    labels = [0] * 80 + [1] * 20
    sample = stratified_sample(labels, 0.1, seed=0)
    assert sorted(labels[i] for i in sample) == [0] * 8 + [1] * 2
    assert stratified_sample(labels, 0.1, seed=0) == sample


def test_shared_pairs_are_one_tensor_in_optimizer_and_file_and_reload_exactly(tmp_path) -> None:
    model = drop_model(kept=["l2"])
    v = {n: getattr(model, n).variant for n in NAMES}
    assert v["l0"].A is v["l1"].A is v["l3"].A and v["l0"].B is v["l3"].B  # one 8x8 pair for the rest
    assert v["l2"].A is not v["l0"].A and v["head"].A is not v["l0"].A  # kept / the only 5x8 layer
    groups = lorakit.param_groups(model, 1e-3)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == 6  # shared 8x8, kept l2, head's own pair
    optimizer = torch.optim.AdamW(groups)
    model(torch.randn(2, 8)).square().mean().backward()
    optimizer.step()  # the shared pair received the gradients of l0, l1 and l3 once, summed
    lorakit.save(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter.safetensors")
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert sorted(tensors) == ["head.A", "head.B", "l0.A", "l0.B", "l2.A", "l2.B"]
    assert meta["tied"] == {"l1.A": "l0.A", "l1.B": "l0.B", "l3.A": "l0.A", "l3.B": "l0.B"}
    assert meta["config"]["kept"] == ["l2"]
    fresh = lorakit.load(Stack(), tmp_path / "a")
    f = {n: getattr(fresh, n).variant for n in NAMES}
    assert f["l0"].A is f["l1"].A is f["l3"].A and f["l2"].A is not f["l0"].A  # sharing rebuilt from config
    x = torch.randn(4, 8)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        with lorakit.disabled(model):
            assert not torch.equal(model(x), fresh(x))
    with pytest.raises(lorakit.ConfigError, match="'kept'"):
        lorakit.apply(Stack(), "lora_drop", targets=NAMES, rank=2, kept=["nope"])


class Classifier(nn.Module):
    """Token ids -> embedding -> two 8x8 layers -> mean over real tokens -> a new head (fully trained)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.l0, self.l1 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask, labels) -> torch.Tensor:
        h = torch.tanh(self.l1(torch.tanh(self.l0(self.emb(input_ids)))))
        pooled = (h * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
        return nn.functional.cross_entropy(self.head(pooled), labels)


def test_stages_select_then_start_the_main_run_from_fresh_adapters_and_head() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = [
        torch.randint(1, 20, (int(n),), generator=gen).tolist()
        for n in torch.randint(2, 6, (64,), generator=gen)
    ]
    data = TokenizedData(ids, [int(i[0] < 10) for i in ids], 0)
    model = lorakit.apply(Classifier(), "lora_drop", targets=["l0", "l1"], train_modules=["head"], rank=2)
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    cfg = TrainConfig(steps=20, lr=0.05, warmup_ratio=0.0, progress=False)
    decided = run_stages(model, data, cfg, Driver.LOOP, stage_run)
    scores = decided["importance"]
    assert set(scores) == {"l0", "l1"} and min(scores.values()) > 0  # stage 1 trained B away from zero
    assert decided["kept"] == select(scores, 0.9) and model.lorakit.config.kept == decided["kept"]
    for name in ("l0", "l1"):  # stage 3: fresh adapters (B = 0), the head back to its initial weights
        assert not getattr(model, name).variant.B.any()
        assert getattr(model, name).variant.is_shared == (name not in decided["kept"])
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head.items())
    assert model.head.weight.requires_grad and not model.l0.base_layer.weight.requires_grad


def test_stage_scoring_shows_a_bar_over_the_sample_batches(capsys) -> None:
    data = TokenizedData([[1 + i % 19, 2] for i in range(40)], [i % 2 for i in range(40)], 0)
    # a sample of 20 of the 40 examples: 3 batches of 8
    model = lorakit.apply(Classifier(), "lora_drop", targets=["l0", "l1"], rank=2, sample_ratio=0.5)
    cfg = TrainConfig(steps=4, batch_size=8, lr=0.05, warmup_ratio=0.0)
    run_stages(model, data, cfg, Driver.LOOP, stage_run, progress=True)
    err = capsys.readouterr().err
    assert "stage scoring" in err and "3/3" in err
    quiet = lorakit.apply(Classifier(), "lora_drop", targets=["l0"], rank=2)
    run_stages(quiet, data, cfg, Driver.LOOP, stage_run)
    assert "stage scoring" not in capsys.readouterr().err


def test_train_runs_every_stage_and_reports_kept_modules(tiny_bert_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_bert_dir), "--variant", "lora_drop", "--steps", "10"]
    argv += ["--batch-size", "16", "--lr", "0.01", "--targets", "query,value,dense", "--output-dir", str(run)]
    argv += ["--set", "sample_ratio=0.3", "--set", "threshold=0.6", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    kept, scores = metrics["extra"]["kept"], metrics["extra"]["importance"]
    assert len(scores) == 11 and sum(scores.values()) == pytest.approx(1.0, abs=1e-5)  # 2 x 5 + pooler
    assert 0 < len(kept) < len(scores) and kept == select(scores, 0.6)
    assert f"kept ({len(kept)}): {', '.join(kept)}" in out
    meta = json.loads((run / "adapter.json").read_text())
    assert meta["config"]["kept"] == kept and meta["tied"]  # the rest share one pair per shape
    tensors = load_file(run / "adapter.safetensors")
    stored_b = [f"{n}.B" for n in kept] + [k for k in meta["tied"].values() if k.endswith(".B")]
    assert metrics["steps"] == 10 and all(
        tensors[k].abs().sum() > 0 for k in stored_b
    )  # the main run trained
    assert main(["eval", "--adapter", str(run)]) == 0  # reloads the sharing from adapter.json
    assert f"accuracy {metrics['metrics']['accuracy']:.4f}" in capsys.readouterr().out
