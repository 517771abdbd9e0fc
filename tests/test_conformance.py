"""Properties every registered variant must satisfy on every layer kind it declares (VARIANTS.md, top).

Generated from the registry: a variant registered later joins automatically. Every case asserts numbers.
"""

from __future__ import annotations

import pytest
import torch
from layer_zoo import LAYERS, make_case
from variant_cases import case_config

import lorakit

CASES = [(name, kind) for name, cls in lorakit.VARIANTS.items() for kind in LAYERS if kind in cls.kinds]
IDS = [f"{name}-{kind}" for name, kind in CASES]


def adapted(name: str, kind: str, seed: int = 0):
    model, x = make_case(kind, seed)
    model.eval()
    with torch.no_grad():
        base_out = model(x)
    lorakit.apply(model, name, targets=["layer"], **case_config(name))
    return model, x, base_out


def perturb(model: torch.nn.Module, seed: int = 7) -> None:
    """Move every adapter tensor away from its init, so merge checks are not trivially true."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.adapted_layers(model):
            for p in layer.variant.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen).to(p) * 0.2)


@pytest.mark.parametrize(("name", "kind"), CASES, ids=IDS)
def test_identity_at_init(name: str, kind: str) -> None:
    model, x, base_out = adapted(name, kind)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base_out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("name", "kind"), CASES, ids=IDS)
def test_disabled_equals_base_and_merge_equals_forward(name: str, kind: str) -> None:
    model, x, base_out = adapted(name, kind)
    perturb(model)
    layer = model.layer
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        out = model(x)
        assert (out - base_out).abs().max() > 1e-3, "perturbing the adapter must change the output"
        with lorakit.disabled(model):
            torch.testing.assert_close(model(x), base_out, atol=0, rtol=0)
        lorakit.merge(model, unload=False)
        assert not torch.equal(layer.base_layer.weight, w0), "merge must write the base weight"
        torch.testing.assert_close(model(x), out, atol=2e-5, rtol=1e-4)
        lorakit.unmerge(model)
        torch.testing.assert_close(layer.base_layer.weight, w0, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(model(x), out, atol=2e-5, rtol=1e-4)
        plain = lorakit.merge(model)
        assert not any(isinstance(m, lorakit.AdaptedLayer) for m in plain.modules())
        torch.testing.assert_close(plain(x), out, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "kind"), CASES, ids=IDS)
def test_a_float64_model_merges_and_unmerges_in_float64(name: str, kind: str) -> None:
    """An fp64 layer's adapter is kept in fp64, so the forward and the merge both form the change in fp64:
    the merged model equals the adapted one, and unmerge gives the weight back, to fp64 rounding."""
    if name == "qlora":
        pytest.skip("a 4-bit base has no float64 weight")
    model, x = make_case(kind, 0)
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    lorakit.apply(model, name, targets=["layer"], **case_config(name))
    perturb(model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float64}
    w0 = model.layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        out = model(x)
        for _ in range(3):
            lorakit.merge(model, unload=False)
            torch.testing.assert_close(model(x), out, atol=1e-12, rtol=1e-12)
            lorakit.unmerge(model)
        torch.testing.assert_close(model.layer.base_layer.weight, w0, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize(("name", "kind"), CASES, ids=IDS)
def test_a_bf16_stored_adapter_merges_into_a_float32_model_exactly(name: str, kind: str) -> None:
    """``adapter_dtype="bfloat16"`` on an fp32 model: the forward and the merge both form the change from the
    bf16 tensors in fp32, so merging changes the outputs by fp32 rounding only (a change formed in bf16 would
    be off by its own rounding, 2**-8 of it)."""
    if name == "qlora":
        pytest.skip("merging into a 4-bit base is covered by test_conformance_4bit.py")
    model, x = make_case(kind, 0)
    model.eval()
    lorakit.apply(model, name, targets=["layer"], **case_config(name), adapter_dtype="bfloat16")
    perturb(model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    with torch.no_grad():
        out = model(x)
        for _ in range(2):
            lorakit.merge(model, unload=False)
            torch.testing.assert_close(model(x), out, atol=2e-5, rtol=1e-4)
            lorakit.unmerge(model)
            torch.testing.assert_close(model(x), out, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "kind"), CASES, ids=IDS)
def test_only_adapter_trains_and_every_trainable_gets_gradient(name: str, kind: str) -> None:
    model, x, _ = adapted(name, kind)
    perturb(model)
    model.train()
    adapter_ids = {id(p) for _, layer in lorakit.adapted_layers(model) for p in layer.variant.parameters()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "a variant must have trainable parameters"
    assert all(id(p) in adapter_ids for _, p in trainable), "base parameters must stay frozen"
    out = model(x)
    (out.float().square().mean()).backward()
    for n, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
    assert all(p.grad is None for p in model.layer.base_layer.parameters())


@pytest.mark.parametrize(("name", "kind"), CASES, ids=IDS)
def test_save_load_round_trip_is_exact(name: str, kind: str, tmp_path) -> None:
    model, x, _ = adapted(name, kind)
    perturb(model)
    lorakit.save(model, tmp_path / "adapter")
    fresh, _ = make_case(kind)
    lorakit.load(fresh, tmp_path / "adapter")
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize(("name", "kind"), CASES, ids=IDS)
def test_bf16_forward_and_backward(name: str, kind: str) -> None:
    model, x, base_out = adapted(name, kind)
    perturb(model)
    model.to(torch.bfloat16).train()
    xb = x.to(torch.bfloat16) if x.is_floating_point() else x
    out = model(xb)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
