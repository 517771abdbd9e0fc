"""Public API: target selection, bad input gives clear errors, save/load safety, summary, parameter groups."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.adapters.api import TargetError
from lorakit.adapters.io import AdapterFileError
from lorakit.core.kinds import LINEAR, KindSet


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_all_linear_skips_the_output_head() -> None:
    model = tiny_llama()
    lorakit.apply(model, "lora", targets="all-linear")
    names = [n for n, _ in lorakit.adapted_layers(model)]
    assert "lm_head" not in names and len(names) == 2 * 7  # q k v o gate up down per layer
    gpt2 = tiny_gpt2()
    lorakit.apply(gpt2, "lora", targets="all-linear")
    kinds = {layer.kind.name for _, layer in lorakit.adapted_layers(gpt2)}
    assert kinds == {"conv1d_gpt2"} and len(lorakit.adapted_layers(gpt2)) == 2 * 4


def test_targets_by_suffix_and_regex() -> None:
    model = tiny_llama()
    lorakit.apply(model, "lora", targets=["q_proj", "v_proj"])
    assert len(lorakit.adapted_layers(model)) == 4
    model = tiny_llama()
    lorakit.apply(model, "lora", targets=r".*layers\.0\.self_attn\.(q|k)_proj")
    assert [n.split(".")[-1] for n, _ in lorakit.adapted_layers(model)] == ["q_proj", "k_proj"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "lorra"}, "unknown variant 'lorra'"),
        ({"rank": 0}, "'rank' = 0 is invalid"),
        ({"dropout": 1.5}, "'dropout' = 1.5"),
        ({"ranks": 4}, "unknown config field(s) ['ranks']"),
        ({"targets": ["q_prj"]}, "'q_proj'"),
    ],
)
def test_bad_input_gets_one_clear_error(kwargs: dict, message: str) -> None:
    model = tiny_llama()
    variant = kwargs.pop("variant", "lora")
    with pytest.raises(ValueError) as err:
        lorakit.apply(model, variant, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unsupported_kind_is_refused_with_the_supported_list() -> None:
    model = nn.Sequential(nn.Embedding(5, 4))

    class LinearOnly(lorakit.get_variant("lora")):
        kinds = KindSet([LINEAR])

    with pytest.raises(TargetError, match="supports"):
        lorakit.adapters.api.find_targets(model, ["0"], LinearOnly.kinds)


def test_apply_twice_is_refused_and_disable_restores_base() -> None:
    model = mlp()
    x = torch.randn(4, 6)
    base = model(x)
    lorakit.apply(model, "lora", rank=2)
    with pytest.raises(ValueError, match="already has a lorakit adapter"):
        lorakit.apply(model, "lora")
    with torch.no_grad():
        model[0].variant.B.fill_(0.5)
    assert not torch.allclose(model(x), base)
    with lorakit.disabled(model):
        assert torch.equal(model(x), base)
    assert not torch.allclose(model(x), base)


def test_save_refuses_overwrite_and_load_refuses_other_base(tmp_path) -> None:
    model = mlp()
    lorakit.apply(model, "lora", rank=2)
    lorakit.save(model, tmp_path / "a")
    with pytest.raises(FileExistsError, match="already holds an adapter"):
        lorakit.save(model, tmp_path / "a")
    lorakit.save(model, tmp_path / "a", overwrite=True)
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert meta["variant"] == "lora" and meta["config"]["rank"] == 2 and meta["lorakit_version"]
    other = mlp()
    with torch.no_grad():
        other[0].weight.add_(1e-3)
    with pytest.raises(AdapterFileError, match="different base model"):
        lorakit.load(other, tmp_path / "a")
    assert not lorakit.adapted_layers(other), "a refused load leaves the model as it was"
    with pytest.raises(AdapterFileError, match="not a lorakit adapter directory"):
        lorakit.load(mlp(), tmp_path / "missing")
    (tmp_path / "a" / "adapter.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterFileError, match="cannot read"):
        lorakit.load(mlp(), tmp_path / "a")


def test_train_modules_are_trained_and_saved(tmp_path) -> None:
    model = mlp()
    lorakit.apply(model, "lora", targets=["0"], train_modules=["2"], rank=2)
    assert all(p.requires_grad for p in model[2].parameters())
    with torch.no_grad():
        model[2].weight.add_(1.0)
    lorakit.save(model, tmp_path / "a")
    fresh = lorakit.load(mlp(), tmp_path / "a")
    assert torch.equal(fresh[2].weight, model[2].weight)


def test_summary_counts_trainable_parameters() -> None:
    model = mlp()
    lorakit.apply(model, "lora", rank=2)
    s = lorakit.summary(model)
    assert s.trainable == 2 * (6 + 8) + 2 * (8 + 3)
    assert s.total == s.trainable + sum(p.numel() for p in mlp().parameters())
    assert "trainable 50 of" in str(s)


def test_param_groups_hold_each_trainable_once() -> None:
    model = mlp()
    lorakit.apply(model, "lora", targets=["0"], train_modules=["2"], rank=2)
    groups = lorakit.param_groups(model, 1e-3, 0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
