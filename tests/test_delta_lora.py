"""Delta-LoRA: the stop-gradient form equals the paper's explicit W update, saves compactly, merges fully."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_zoo import LAYERS, make_case
from torch import nn

import lorakit
from lorakit.adapters.io import AdapterFileError

RANK, ALPHA, LAM, K, STEPS, ACCUM, LR = 4, 8.0, 2.0, 2, 7, 2, 1e-2


class Tiny(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class RefLayer(nn.Module):
    """Plain LoRA with the base weight W in a separate tensor that the paper's rule updates by hand."""

    def __init__(self, lin: nn.Linear, A: torch.Tensor, B: torch.Tensor, s: float) -> None:
        super().__init__()
        self.W, self.b, self.s = lin.weight.detach().clone(), lin.bias.detach().clone(), s
        self.A, self.B = nn.Parameter(A.detach().clone()), nn.Parameter(B.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.W, self.b) + self.s * F.linear(F.linear(x, self.A), self.B)


def data() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 6, generator=g), torch.randn(5, 4, generator=g)) for _ in range(STEPS * ACCUM)]
    return batches, torch.randn(9, 6, generator=g)


def delta_model(seed: int = 0, start_step: int = K) -> Tiny:
    model = Tiny(seed)
    return lorakit.apply(
        model, "delta_lora", targets=["fc1", "fc2"], rank=RANK, alpha=ALPHA, lam=LAM, start_step=start_step
    )


def train_ours(model: nn.Module) -> list[torch.Tensor]:
    """The loop's call order with gradient accumulation; returns probe outputs after each optimizer step."""
    batches, probe = data()
    hooks = lorakit.make_hooks(model, STEPS)
    opt = torch.optim.AdamW(lorakit.param_groups(model, LR, 0.1))
    outs = []
    for step in range(STEPS):
        for h in hooks:
            h.on_step_start(step)
        for x, t in batches[step * ACCUM : (step + 1) * ACCUM]:
            ((model(x) - t).square().mean() / ACCUM).backward()
        for h in hooks:
            h.on_after_backward(step)
        opt.step()
        for h in hooks:
            h.on_after_step(step)
        opt.zero_grad()
        with torch.no_grad():
            outs.append(model(probe))
    return outs


def train_reference(model: Tiny, first_update_step: int) -> tuple[list[torch.Tensor], list[RefLayer], list]:
    """The paper's rule by hand: after each optimizer step t >= first_update_step,
    W += lam s (B_{t+1} A_{t+1} - B_t A_t)."""
    batches, probe = data()
    refs = []
    for name in ("fc1", "fc2"):
        layer = getattr(model, name)
        refs.append(RefLayer(layer.base_layer, layer.variant.A, layer.variant.B, layer.variant.scale))
    net = lambda x: refs[1](torch.tanh(refs[0](x)))  # noqa: E731
    opt = torch.optim.AdamW([p for r in refs for p in (r.A, r.B)], lr=LR, weight_decay=0.1)
    outs, after_k = [], []
    for step in range(STEPS):
        for x, t in batches[step * ACCUM : (step + 1) * ACCUM]:
            ((net(x) - t).square().mean() / ACCUM).backward()
        old = [(r.B @ r.A).detach().clone() for r in refs]
        opt.step()
        with torch.no_grad():
            if step >= first_update_step:  # W is not in the optimizer: no grad, no moments, no decay
                for r, prev in zip(refs, old, strict=True):
                    r.W += LAM * r.s * (r.B @ r.A - prev)
            if step == K:
                after_k = [(r.A.clone(), r.B.clone()) for r in refs]
            outs.append(net(probe))
        opt.zero_grad()
    return outs, refs, after_k


def test_stop_gradient_form_equals_paper_update_with_accumulation() -> None:
    ref_outs, refs, after_k = train_reference(delta_model(), first_update_step=K + 1)  # t > K
    model = delta_model()
    w0 = [model.fc1.base_layer.weight.clone(), model.fc2.base_layer.weight.clone()]
    outs = train_ours(model)
    diffs = [(a - b).abs().max().item() for a, b in zip(outs, ref_outs, strict=True)]
    assert max(diffs) <= 1e-5, diffs
    assert (ref_outs[-1] - train_reference(delta_model(), STEPS)[0][-1]).abs().max() > 1e-3, "W must move"
    wrong = train_reference(delta_model(), first_update_step=K)[0]  # capture one step early
    assert (outs[-1] - wrong[-1]).abs().max() > 1e-4, "the test must tell the capture points apart"
    for layer, w, (a_k, b_k) in zip((model.fc1, model.fc2), w0, after_k, strict=True):
        assert torch.equal(layer.base_layer.weight, w), "the base weight is never written"
        torch.testing.assert_close(layer.variant.A_K, a_k, atol=1e-6, rtol=1e-5)  # A_{K+1}
        torch.testing.assert_close(layer.variant.B_K, b_k, atol=1e-6, rtol=1e-5)
    plain = lorakit.merge(model)  # merge folds W0 + s B A + lam s (B A - B_K A_K)
    for lin, r in zip((plain.fc1, plain.fc2), refs, strict=True):
        torch.testing.assert_close(lin.weight, r.W + r.s * r.B @ r.A, atol=1e-5, rtol=1e-5)


def test_save_load_reproduces_trained_model_and_refuses_other_base(tmp_path) -> None:
    model = delta_model()
    train_ours(model)
    assert all(layer.variant.active_now for _, layer in lorakit.adapted_layers(model))
    lorakit.save(model, tmp_path / "a")
    fresh = lorakit.load(Tiny(0), tmp_path / "a")
    _, probe = data()
    with torch.no_grad():
        assert torch.equal(fresh(probe), model(probe))
        assert (fresh(probe) - Tiny(0)(probe)).abs().max() > 1e-3
    assert all(layer.variant.active_now for _, layer in lorakit.adapted_layers(fresh))
    resumed = delta_model()
    resumed.load_state_dict(model.state_dict())  # plain torch loading switches the extra term on too
    with torch.no_grad():
        assert torch.equal(resumed(probe), model(probe))
    with pytest.raises(AdapterFileError, match="different base"):
        lorakit.load(Tiny(1), tmp_path / "a")


@pytest.mark.parametrize("kind", list(LAYERS))
def test_captured_pair_merges_and_round_trips_on_every_kind(kind: str, tmp_path) -> None:
    model, x = make_case(kind)
    lorakit.apply(model, "delta_lora", targets=["layer"], rank=3, lam=0.5, start_step=0)
    v = model.layer.variant
    with torch.no_grad():
        for p in (v.A, v.B):
            p.add_(torch.randn_like(p) * 0.3)
        lorakit.make_hooks(model, 1)[0].on_after_step(0)
        assert torch.equal(v.B_K, v.B) and v.active_now
        for p in (v.A, v.B):
            p.add_(torch.randn_like(p) * 0.3)
        out = model(x)
        lorakit.save(model, tmp_path / "a")
        fresh, _ = make_case(kind)
        assert torch.equal(lorakit.load(fresh, tmp_path / "a")(x), out)
        assert torch.allclose(lorakit.merge(model)(x), out, atol=2e-5, rtol=1e-4)


def test_dropout_is_rejected_and_defaults_to_zero() -> None:
    with pytest.raises(lorakit.ConfigError, match=r"'dropout'.*set dropout=0"):
        lorakit.apply(Tiny(), "delta_lora", targets=["fc1"], dropout=0.1)
    model = lorakit.apply(Tiny(), "delta_lora", targets=["fc1"], rank=4)
    assert model.lorakit.config.dropout == 0.0 and model.fc1.variant.dropout is None
    assert (model.lorakit.config.lam, model.lorakit.config.start_step) == (2.0, 500)


def test_works_on_an_nf4_base_without_writing_it() -> None:
    from lorakit.core.nf4_linear import NF4Linear

    model = Tiny(0)
    model.fc1 = NF4Linear.from_linear(model.fc1, compute_dtype=torch.float32)
    packed = model.fc1.weight_packed.clone()
    lorakit.apply(model, "delta_lora", targets=["fc1"], rank=RANK, alpha=ALPHA, lam=LAM, start_step=0)
    train_ours(model)
    layer, v = model.fc1, model.fc1.variant
    assert v.active_now and torch.equal(layer.base_layer.weight_packed, packed)
    _, probe = data()
    w_eff = layer.weight_2d() + v.scale * (1 + LAM) * v.B @ v.A - LAM * v.scale * v.B_K @ v.A_K
    with torch.no_grad():
        torch.testing.assert_close(layer(probe), F.linear(probe, w_eff, layer.bias), atol=1e-5, rtol=1e-5)
        assert (v.B @ v.A - v.B_K @ v.A_K).abs().max() > 1e-4, "B A must have moved after the capture"
