"""The conformance properties on a 4-bit NF4 base (QLoRA): every registered variant x every linear kind.

Generated from the registry like tests/test_conformance.py, so a variant registered later joins. The linear
kinds are ``nn.Linear`` and GPT-2's ``Conv1D`` (quantised transposed, as ``(out, in)``). The base
layer is quantised with ``lorakit.quantize`` computing in fp32, so "merge equals forward" can be checked as
tightly as on a dense base; the default bf16 compute is checked on its own. A variant declaring
``writes_base = True`` would need a dense base and is skipped.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from layer_zoo import make_case
from test_conformance import perturb
from torch import nn
from variant_cases import case_config

import lorakit
from lorakit.core.nf4_linear import NF4Linear

LINEAR_KINDS = ("linear", "conv1d_gpt2")
CASES = [(n, k) for n, cls in lorakit.VARIANTS.items() for k in LINEAR_KINDS if k in cls.kinds]
IDS = [f"{n}-{k}" for n, k in CASES]


def _skip_writers(name: str) -> None:
    if getattr(lorakit.get_variant(name), "writes_base", False):
        pytest.skip(f"{name} writes into its base weight, which a 4-bit base cannot take")


def config_4bit(name: str, compute_dtype: torch.dtype = torch.float32, **overrides: object) -> dict:
    cfg = {**case_config(name), **overrides}
    fields = {f.name for f in dataclasses.fields(lorakit.get_variant(name).config_class)}
    if "base_quantization" in fields:  # QLoRA quantises in apply: ask for the settings the base already has
        cfg.update(base_quantization="nf4", compute_dtype=compute_dtype, double_quant=True)
    return cfg


def quantized_case(
    kind: str = "linear", seed: int = 0, compute_dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, torch.Tensor]:
    model, x = make_case(kind, seed)
    lorakit.quantize(model, compute_dtype=compute_dtype, targets=["layer"])
    assert isinstance(model.layer, NF4Linear) and model.layer.lorakit_kind == kind
    return model, x


def dense_type(kind: str) -> type[nn.Module]:
    """The layer type a merge or dequantisation must give back."""
    return type(make_case(kind)[0].layer)


def adapted(name: str, kind: str = "linear", compute_dtype: torch.dtype = torch.float32, **overrides: object):
    _skip_writers(name)
    model, x = quantized_case(kind, compute_dtype=compute_dtype)
    model.eval()
    with torch.no_grad():
        base_out = model(x)
    lorakit.apply(model, name, targets=["layer"], **config_4bit(name, compute_dtype, **overrides))
    return model, x, base_out


def stored(model: nn.Module) -> dict[str, torch.Tensor]:
    """The 4-bit base's stored tensors (packed codes, scales, bias), copied."""
    return {k: v.detach().clone() for k, v in model.layer.base_layer.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("name", "kind"), CASES, ids=IDS)
def test_identity_at_init_is_exact(name: str, kind: str) -> None:
    model, x, base_out = adapted(name, kind)
    assert isinstance(model.layer.base_layer, NF4Linear) and model.layer.kind.name == kind
    with torch.no_grad():
        assert torch.equal(model(x), base_out)


@pytest.mark.parametrize(("name", "kind"), CASES, ids=IDS)
def test_disabled_is_the_4bit_base_and_merge_gives_a_dense_layer(name: str, kind: str) -> None:
    model, x, base_out = adapted(name, kind)
    perturb(model)
    layer = model.layer
    quantised = layer.base_layer
    w0 = quantised.dequantized_weight(torch.float32)
    with torch.no_grad():
        out = model(x)
        assert (out - base_out).abs().max() > 1e-3, "perturbing the adapter must change the output"
        with lorakit.disabled(model):
            assert torch.equal(model(x), base_out)
        lorakit.merge(model, unload=False)
        # Merging dequantises: the layer is dense and holds W0 + dW, never a re-quantised weight.
        assert type(layer.base_layer) is dense_type(kind) and not layer.base_layer.weight.requires_grad
        assert not torch.equal(layer.base_layer.weight, w0)
        torch.testing.assert_close(model(x), out, atol=2e-5, rtol=1e-4)
        lorakit.unmerge(model)
        assert layer.base_layer is quantised  # the 4-bit layer itself, not a dense copy of its weights
        assert torch.equal(model(x), out)
        plain = lorakit.merge(model)
        assert type(plain.layer) is dense_type(kind)
        torch.testing.assert_close(plain(x), out, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "kind"), CASES, ids=IDS)
def test_every_trainable_gets_a_gradient_and_the_base_none(name: str, kind: str) -> None:
    model, x, _ = adapted(name, kind)
    perturb(model)
    model.train()
    before = stored(model)
    adapter_ids = {id(p) for _, layer in lorakit.adapted_layers(model) for p in layer.variant.parameters()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(id(p) in adapter_ids for _, p in trainable)
    model(x).square().mean().backward()
    for n, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
    assert all(p.grad is None for p in model.layer.base_layer.parameters())
    assert_same(stored(model), before)


@pytest.mark.parametrize(("name", "kind"), CASES, ids=IDS)
def test_save_load_round_trip_is_exact(name: str, kind: str, tmp_path) -> None:
    model, x, _ = adapted(name, kind)
    perturb(model)
    lorakit.save(model, tmp_path / "adapter")
    fresh, _ = quantized_case(kind)
    lorakit.load(fresh, tmp_path / "adapter")
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def train_steps(model: nn.Module, x: torch.Tensor, steps: int) -> None:
    """The training loop's call order (hooks included) on a regression target."""
    target = torch.randn(x.shape[:-1] + (10,), generator=torch.Generator().manual_seed(5))
    hooks = lorakit.make_hooks(model, steps)
    opt = torch.optim.AdamW(lorakit.param_groups(model, 1e-2))
    model.train()
    for step in range(steps):
        for h in hooks:
            h.on_step_start(step)
        loss = (model(x) - target).square().mean()
        extra = [t for h in hooks if (t := h.extra_loss(step)) is not None]
        (loss + sum(extra)).backward()
        for h in hooks:
            h.on_after_backward(step)
        for h in hooks:
            h.on_before_optimizer_step(step)
        opt.step()
        for h in hooks:
            h.on_after_step(step)
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("name", "kind"), CASES, ids=IDS)
def test_training_with_hooks_never_writes_the_4bit_base(name: str, kind: str) -> None:
    model, x, base_out = adapted(name, kind)
    before = stored(model)
    train_steps(model, x, 8)  # AdaLoRA's case masks within 8 steps
    assert_same(stored(model), before)
    model.eval()
    with torch.no_grad():
        assert (model(x) - base_out).abs().max() > 1e-3, "training must change the output"


def test_delta_lora_past_its_start_step_keeps_the_packed_bytes() -> None:
    model, x, _ = adapted("delta_lora", start_step=1)
    variant = model.layer.variant
    before = stored(model)
    train_steps(model, x, 4)
    assert variant.active_now, "the W update must have started (step > K)"
    assert not torch.equal(variant.B_K, torch.zeros_like(variant.B_K))
    assert_same(stored(model), before)
    # The moved W lives in the stop-gradient term: W_eff - W0 = s BA + lam s (BA - B_K A_K).
    s, lam = variant.scale, variant.config.lam
    ba, ba_k = variant.B @ variant.A, variant.B_K @ variant.A_K
    torch.testing.assert_close(variant.delta_weight(), s * ba + lam * s * (ba - ba_k))


@pytest.mark.parametrize(("name", "kind"), CASES, ids=IDS)
def test_bf16_compute(name: str, kind: str) -> None:
    model, x, base_out = adapted(name, kind, compute_dtype=torch.bfloat16)
    perturb(model)
    model.train()
    out = model(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        out = model(x)
        plain = lorakit.merge(model)  # dense fp32 layer: differs from the bf16 matmul only by its rounding
        torch.testing.assert_close(plain(x), out, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_dora_with_dropout_keeps_no_full_precision_copy_of_the_4bit_weight(kind: str) -> None:
    model, x = quantized_case(kind)
    lorakit.apply(model, "dora", targets=["layer"], rank=4, alpha=8.0, dropout=0.1)
    perturb(model)
    model.train()
    out_features, in_features = model.layer.out_features, model.layer.in_features
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(2)
        loss = model(x.requires_grad_()).square().sum()
    weight_sized = [t for t in saved if t.is_floating_point() and t.numel() == out_features * in_features]
    assert weight_sized == []  # the dequantised W0 is rebuilt in backward by the 4-bit layer, not kept
    loss.backward()
    # the same step on a dense twin holding the dequantised weight (DoRA's fused function there), same mask
    twin = copy.deepcopy(model)
    twin.layer.base_layer = twin.layer.base_layer.to_dense().requires_grad_(False)
    twin.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(2)
    twin_loss = twin(x2).square().sum()
    twin_loss.backward()
    torch.testing.assert_close(loss, twin_loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    for name, param in model.layer.variant.named_parameters():
        assert param.grad.abs().sum() > 0
        torch.testing.assert_close(
            param.grad, dict(twin.layer.variant.named_parameters())[name].grad, atol=1e-4, rtol=1e-4
        )
