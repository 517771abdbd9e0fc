"""PEFT files are checked, not trusted: exact shapes, only what the adapter owns, typed config fields, no
network for a local path; every refusal names the file or tensor and leaves the model as it was."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from layer_zoo import perturb
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.adapters.io import AdapterFileError
from lorakit.interop import load_peft, save_peft


class Small(nn.Module):
    """A linear layer, a LayerNorm (a base weight a file must never overwrite) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm, self.classifier = nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(self.fc(x)))


X = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def saved(tmp_path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    base = Small().eval()
    ours = lorakit.apply(copy.deepcopy(base), "lora", targets=["fc"], rank=2)
    perturb(ours)
    save_peft(ours, tmp_path)
    return base, tmp_path


def refused(base: nn.Module, path: Path | str, message: str) -> None:
    """``load_peft`` raises naming the problem, and the model is exactly as before."""
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(AdapterFileError, match=message):
        load_peft(model, path)
    assert not hasattr(model, "lorakit") and not any(
        isinstance(m, lorakit.AdaptedLayer) for m in model.modules()
    )
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == grads


def edit_tensors(path: Path, change) -> None:
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights)


def edit_config(path: Path, change) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    change(config)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_a_transposed_tensor_with_the_same_element_count_is_refused(saved) -> None:
    base, path = saved
    key = "base_model.model.fc.lora_A.weight"
    edit_tensors(path, lambda t: t.update({key: t[key].T.contiguous()}))
    refused(base, path, r"fc.lora_A.weight: the saved tensor's shape \(6, 2\) is not PEFT's \(2, 6\)")


def test_an_extra_tensor_never_overwrites_a_base_weight(saved) -> None:
    base, path = saved
    edit_tensors(path, lambda t: t.update({"base_model.model.norm.weight": torch.full((4,), 7.0)}))
    refused(
        base,
        path,
        r"base_model.model.norm.weight is not part of the adapter \(norm is not in modules_to_save",
    )


def test_a_head_is_loaded_only_when_modules_to_save_lists_it(saved) -> None:
    base, path = saved
    head = {"base_model.model.classifier.weight": torch.full((2, 4), 0.5)}
    edit_tensors(path, lambda t: t.update(head))
    refused(base, path, "classifier is not in modules_to_save")
    edit_config(path, lambda c: c.update(modules_to_save=["classifier"]))
    model = load_peft(copy.deepcopy(base), path)
    assert torch.equal(model.classifier.weight, head["base_model.model.classifier.weight"])
    assert lorakit.info(model).train_modules == ["classifier"]
    assert model.classifier.weight.requires_grad and not model.norm.weight.requires_grad


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("r"), "field 'r' is missing"),
        (lambda c: c.pop("lora_alpha"), "field 'lora_alpha' is missing"),
        (lambda c: c.update(r="8"), "field 'r' = '8' must be int"),
        (lambda c: c.update(r=True), "field 'r' = True must be int"),
        (lambda c: c.update(r=0), "r = 0 and alpha"),
        (lambda c: c.update(lora_alpha="x"), "field 'lora_alpha' = 'x' must be int or float"),
        (lambda c: c.update(use_dora="yes"), "field 'use_dora' = 'yes' must be bool"),
        (
            lambda c: c.update(modules_to_save="classifier"),
            "field 'modules_to_save' = 'classifier' must be list",
        ),
        (lambda c: c.update(modules_to_save=[3]), "modules_to_save' must be a list of module names"),
        (lambda c: c.update(peft_type=None), "peft_type None"),
    ],
)
def test_a_missing_or_mistyped_config_field_names_the_file_and_field(saved, change, message) -> None:
    base, path = saved
    edit_config(path, change)
    refused(base, path, f"adapter_config.json: .*{message}")


@pytest.mark.parametrize(
    ("config_text", "message"),
    [("{not json", "cannot read .*adapter_config.json"), ("[1]", "adapter_config.json holds a JSON list")],
)
def test_unreadable_config_and_weights_are_refused(saved, config_text, message) -> None:
    base, path = saved
    (path / "adapter_config.json").write_text(config_text)
    refused(base, path, message)


def test_damaged_weights_are_refused(saved) -> None:
    base, path = saved
    weights = path / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:40])
    refused(base, path, "cannot read .*adapter_model.safetensors")
    key = "base_model.model.fc.lora_B.weight"
    weights.write_bytes(good)
    edit_tensors(path, lambda t: t.update({key: torch.full_like(t[key], float("nan"))}))
    refused(base, path, "hold NaN or infinite values")


def test_only_an_owner_name_string_that_is_not_local_asks_the_hub(saved, tmp_path, monkeypatch) -> None:
    import huggingface_hub

    base, path = saved
    asked: list[str] = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo, allow_patterns: asked.append(repo) or path
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for missing in [
        "./missing/adapter",
        "runs/adapter",
        "missing",
        Path("owner/name"),
        "/abs/owner/name",
        "a/../b",
    ]:
        refused(base, missing, "no adapter directory")
    assert asked == []
    (path / "adapter_model.safetensors").rename(tmp_path / "elsewhere.safetensors")  # a file, not a directory
    refused(base, tmp_path / "elsewhere.safetensors", "is a file; pass the directory")
    (tmp_path / "elsewhere.safetensors").rename(path / "adapter_model.safetensors")
    load_peft(copy.deepcopy(base), "owner/name")
    assert asked == ["owner/name"]
