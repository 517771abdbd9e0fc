"""VeRA: the paper's formula, shared frozen projections (in memory and in the file), and PEFT parity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit


class Tiny(nn.Module):
    """Three matrix layers of different shapes, so each uses a different slice of the shared projections."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, 16)
        self.proj = Conv1D(6, 16)  # GPT-2 layout: (in, out) = (16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


TARGETS = ["fc1", "fc2", "proj"]


def tiny() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def adapted(**config: object) -> Tiny:
    model = lorakit.apply(tiny(), "vera", targets=TARGETS, rank=8, dropout=0.0, **config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lorakit.adapted_layers(model):
            layer.variant.b.add_(torch.randn(layer.variant.b.shape, generator=gen))
            layer.variant.d.add_(torch.randn(layer.variant.d.shape, generator=gen))
    return model


def test_formula_matches_explicit_diag_b_B_diag_d_A() -> None:
    model = adapted()
    x = torch.randn(4, 10)
    layer, v = model.fc2, model.fc2.variant
    assert v.A.shape == (8, 16) and v.B.shape == (16, 8)  # (r, d_in_max), (d_out_max, r)
    delta = torch.diag(v.b) @ v.B[:16] @ torch.diag(v.d) @ v.A[:, :10]  # diag(b) B diag(d) A, top-left slices
    expected = x @ (layer.base_layer.weight + delta).t() + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.delta_weight(), delta, atol=1e-6, rtol=1e-6)
    # Kaiming uniform bounds sqrt(6 / fan_in) (fan_in = d_in_max for A, r for B), drawn from the seed.
    assert v.A.abs().max() <= math.sqrt(6 / 16) and v.B.abs().max() <= math.sqrt(6 / 8)
    assert v.A.abs().max() > 0.9 * math.sqrt(6 / 16) and v.B.abs().max() > 0.9 * math.sqrt(6 / 8)
    other = lorakit.apply(tiny(), "vera", targets=TARGETS, rank=8, projection_seed=1)
    assert not torch.equal(other.fc1.variant.A, v.A)


def test_projections_shared_frozen_and_counted_once(tmp_path) -> None:
    model = adapted()
    layers = [layer for _, layer in lorakit.adapted_layers(model)]
    first = layers[0].variant
    assert all(layer.variant.A is first.A and layer.variant.B is first.B for layer in layers)
    assert not layers[0].variant.A.requires_grad and not layers[0].variant.B.requires_grad
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(8 + layer.out_features for layer in layers) == 3 * 8 + 10 + 16 + 6
    grouped = [p for g in lorakit.param_groups(model, 1e-2) for p in g["params"]]
    assert sum(p.numel() for p in grouped) == trainable

    path = lorakit.save(model, tmp_path / "adapter")
    with safe_open(str(path / "adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sorted(k for k in keys if k.endswith((".A", ".B"))) == ["fc1.A", "fc1.B"]
    meta = json.loads((path / "adapter.json").read_text())
    assert meta["config"]["projection_seed"] == 0 and meta["config"]["projection_shape"] == [16, 16]
    assert set(meta["tied"]) == {f"{n}.{k}" for n in ("fc2", "proj") for k in "AB"}
    fresh = lorakit.load(tiny(), path)
    assert fresh.fc2.variant.A is fresh.proj.variant.A
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_without_saved_projections_they_are_redrawn_from_seed_and_shape(tmp_path) -> None:
    model = adapted(save_projection=False, projection_seed=5, projection_shape=[20, 30])
    path = lorakit.save(model, tmp_path / "adapter")
    with safe_open(str(path / "adapter.safetensors"), "pt") as f:
        assert not any(k.endswith((".A", ".B")) for k in f.keys())
    fresh = lorakit.load(tiny(), path)
    assert fresh.fc1.variant.A.shape == (8, 30) and torch.equal(fresh.fc1.variant.B, model.fc1.variant.B)
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(lorakit.ConfigError, match="projection_shape"):
        lorakit.apply(tiny(), "vera", targets=TARGETS, projection_shape=[8, 30])


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")  # PEFT sets it itself for the Conv1D layer
def test_peft_parity_same_projections_outputs_and_merged_weights() -> None:
    from peft import VeraConfig, get_peft_model

    cfg = VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=0, vera_dropout=0.0, d_initial=0.1)
    ref = get_peft_model(tiny(), cfg)
    ours = lorakit.apply(tiny(), "vera", targets=TARGETS, rank=8, dropout=0.0, projection_seed=0)
    # Same generator, same order (A then B), same bounds: our projections equal PEFT's bit for bit.
    assert torch.equal(ours.fc1.variant.A, ref.base_model.vera_A["default"])
    assert torch.equal(ours.fc1.variant.B, ref.base_model.vera_B["default"])
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in TARGETS:
            layer, v = getattr(ref.base_model.model, name), getattr(ours, name).variant
            b, d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
            b.add_(torch.randn(b.shape, generator=gen)), d.add_(torch.randn(d.shape, generator=gen))
            v.b.copy_(b), v.d.copy_(d)
    x = torch.randn(4, 12)
    ref.eval(), ours.eval()
    with torch.no_grad():
        out = ours(x)
        assert (out - ref(x)).abs().max() <= 1e-5
        with lorakit.disabled(ours):
            assert (out - ours(x)).abs().max() > 1e-2  # the copied vectors really change the output
        ref_model, plain = ref.merge_and_unload(), lorakit.merge(ours)
        for name in TARGETS:
            merged, expected = getattr(plain, name).weight, getattr(ref_model, name).weight
            torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-6)


def test_an_alpha_is_refused_since_nothing_scales_by_it() -> None:
    """Eq. 1 has no alpha / r: an alpha was kept in the config and changed nothing (1, 16 and 1000 trained
    the same)."""
    from lorakit.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"'alpha' = 32.0 is invalid: it must be left unset: VeRA has no"):
        lorakit.apply(nn.Sequential(nn.Linear(8, 8)), "vera", targets=["0"], rank=4, alpha=32.0)
    lorakit.apply(nn.Sequential(nn.Linear(8, 8)), "vera", targets=["0"], rank=4)  # unset: fine
