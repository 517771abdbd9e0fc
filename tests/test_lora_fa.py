"""LoRA-FA: frozen random A, trained B, no input-sized saved tensor, the optional v2 gradient correction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.emb(ids))))


def tiny(**config: object) -> Tiny:
    torch.manual_seed(0)
    return lorakit.apply(Tiny(), "lora_fa", targets=["emb", "fc1", "fc2"], rank=4, alpha=8.0, **config)


def test_formula_frozen_random_A_trained_B() -> None:
    model = tiny(dropout=0.0)
    for _, layer in lorakit.adapted_layers(model):
        v = layer.variant
        assert isinstance(v.A, nn.Parameter) and not v.A.requires_grad and v.B.requires_grad
        assert v.A.abs().min() > 0, "A must be random on every kind, embeddings included"
        assert torch.count_nonzero(v.B) == 0
    groups = lorakit.param_groups(model, 1e-3)
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(layer.variant.B) for _, layer in lorakit.adapted_layers(model)}
    with torch.no_grad():
        model.fc1.variant.B.normal_()
    x = torch.randn(3, 12)
    v, w0, b0 = model.fc1.variant, model.fc1.base_layer.weight, model.fc1.base_layer.bias
    expected = x @ w0.t() + b0 + v.scale * (x @ v.A.t()) @ v.B.t()  # y = W0 x + b0 + s B A x
    torch.testing.assert_close(model.fc1(x), expected, atol=1e-6, rtol=1e-6)


def test_training_moves_B_only_and_loss_drops() -> None:
    model = tiny(dropout=0.1, precondition=True)
    model.train()
    a_before = {n: layer.variant.A.detach().clone() for n, layer in lorakit.adapted_layers(model)}
    hooks = lorakit.make_hooks(model, 20)
    opt = torch.optim.AdamW(lorakit.param_groups(model, 1e-2, 0.01))
    ids, target = torch.randint(0, 30, (8, 5)), torch.randn(8, 5, 6)
    losses = []
    for step in range(20):
        loss = (model(ids) - target).square().mean()
        loss.backward()
        for h in hooks:
            h.on_after_backward(step)
            h.on_before_optimizer_step(step)
        opt.step()
        for h in hooks:
            h.on_after_step(step)
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    for n, layer in lorakit.adapted_layers(model):
        assert torch.equal(layer.variant.A, a_before[n])
        assert layer.variant.A.grad is None


def _saved_numels(layer: nn.Module, x: torch.Tensor) -> list[int]:
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return sizes


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_no_input_sized_tensor_is_saved(dropout: float) -> None:
    n, d_in, d_out, r = 384, 1024, 1000, 8
    x = torch.randn(2, n // 2, d_in, requires_grad=True)  # a hidden state: dL/dx is needed
    saved = {}
    for name in ("lora_fa", "lora"):
        torch.manual_seed(0)
        model = lorakit.apply(
            nn.Sequential(nn.Linear(d_in, d_out)), name, targets=["0"], rank=r, dropout=dropout
        )
        model.train()
        saved[name] = _saved_numels(model, x)
        assert n * r in saved[name], "the hook must see the adapter's saved z = A x (N x r)"
    assert n * d_in not in saved["lora_fa"], f"LoRA-FA kept an N x d_in tensor: {saved['lora_fa']}"
    assert n * d_in in saved["lora"], "plain LoRA saves its input for dL/dA (the contrast)"


def test_precondition_matches_hand_computation_and_projects_full_gradient() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(10, 7)
    model = lorakit.apply(
        nn.Sequential(lin), "lora_fa", targets=["0"], rank=3, alpha=6.0, dropout=0.0, precondition=True
    )
    v = model[0].variant
    with torch.no_grad():
        v.B.normal_()
    x, t = torch.randn(5, 10), torch.randn(5, 7)
    (model(x) - t).square().sum().backward()
    g_B = v.B.grad.clone()
    lorakit.make_hooks(model, 1)[0].on_before_optimizer_step(0)
    A, s = v.A.detach().double(), v.scale
    hand = (1.0 / s**2) * g_B.double() @ torch.linalg.inv(A @ A.t())  # (1/s^2) g_B (A A^T)^-1
    torch.testing.assert_close(v.B.grad.double(), hand, atol=1e-5, rtol=1e-4)
    assert (v.B.grad - g_B).abs().max() > 1e-3, "the correction must change the gradient"
    # s dB A equals the projection of the full-weight gradient G onto row(A): G A^T (A A^T)^-1 A.
    w = (lin.weight + s * v.B @ v.A).detach().requires_grad_(True)
    (torch.nn.functional.linear(x, w, lin.bias) - t).square().sum().backward()
    proj = w.grad.double() @ A.t() @ torch.linalg.inv(A @ A.t()) @ A
    torch.testing.assert_close(s * v.B.grad.double() @ A, proj, atol=1e-5, rtol=1e-5)


def test_precondition_off_leaves_gradient_alone() -> None:
    model = tiny(dropout=0.0)
    with torch.no_grad():
        model.fc2.variant.B.normal_()
    model(torch.randint(0, 30, (2, 3))).square().sum().backward()
    before = [layer.variant.B.grad.clone() for _, layer in lorakit.adapted_layers(model)]
    lorakit.make_hooks(model, 1)[0].on_before_optimizer_step(0)
    for g, (_, layer) in zip(before, lorakit.adapted_layers(model), strict=True):
        assert torch.equal(layer.variant.B.grad, g)
