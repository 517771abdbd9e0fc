"""The causal-LM token loss: the fused linear cross-entropy equals the plain form (loss and every gradient),
never forms the full-vocabulary logits, equals the model's own loss, and a step's loss is the mean over all
its labelled tokens whatever the micro-batches."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit
from lorakit.data.datasets import TokenizedData, eval_batches
from lorakit.engine import token_loss
from lorakit.engine.gradients import LossBackward
from lorakit.engine.token_loss import TokenLoss, linear_cross_entropy, takes_token_loss
from lorakit.jobs.job import evaluate
from lorakit.kernels import cross_entropy
from lorakit.kernels.cross_entropy import fused_linear_cross_entropy
from lorakit.train.loop import TrainConfig


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.numel = max(self.numel, value.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_cross_entropy_equals_the_plain_form_with_every_gradient(dtype, bias, monkeypatch) -> None:
    monkeypatch.setattr(cross_entropy, "_CHUNK_ELEMENTS", 7 * 50)  # 7 rows a chunk: several chunks, one short
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(30, 16, dtype=dtype, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, dtype=dtype, generator=gen, requires_grad=True)
    b = torch.randn(50, dtype=dtype, generator=gen, requires_grad=True) if bias else None
    t = torch.randint(0, 50, (30,), generator=gen)
    logits = F.linear(h, w, b)
    plain = F.cross_entropy(logits.to(torch.promote_types(dtype, torch.float32)), t, reduction="sum")
    grads = torch.autograd.grad(plain * 0.7, [x for x in (h, w, b) if x is not None])
    fused = fused_linear_cross_entropy(h, w, b, t)
    fused_grads = torch.autograd.grad(fused * 0.7, [x for x in (h, w, b) if x is not None])
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(fused, plain, **tol)
    for got, want in zip(fused_grads, grads, strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_fused_cross_entropy_never_forms_the_full_logits(monkeypatch) -> None:
    monkeypatch.setattr(cross_entropy, "_CHUNK_ELEMENTS", 8 * 64)
    head = nn.Linear(16, 64)
    h = torch.randn(100, 16, requires_grad=True)
    t = torch.randint(0, 64, (100,))
    with LargestTensor() as seen:
        loss = linear_cross_entropy(h, head, t)
        loss.backward()
    assert seen.numel <= max(8 * 64, 100 * 16) < 100 * 64  # a chunk's logits, or h's gradient
    assert h.grad is not None and head.weight.grad is not None and head.bias.grad is not None


def test_rows_without_a_label_cost_nothing_and_count_nothing() -> None:
    head = nn.Linear(8, 20)
    h = torch.randn(6, 8)
    t = torch.tensor([3, -100, 5, -100, -100, 7])
    keep = t != -100
    expected = F.cross_entropy(head(h[keep]), t[keep], reduction="sum")
    torch.testing.assert_close(linear_cross_entropy(h, head, t), expected)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("on", [True, False], ids=["kernels", "plain"])
def test_token_loss_equals_the_models_own_loss_and_gradients(build, on) -> None:
    with lorakit.kernels.plain() if not on else contextlib.nullcontext():
        check_token_loss(build)


def check_token_loss(build) -> None:
    model = build().eval()  # no dropout: two forwards compare
    lorakit.apply(model, "lora", targets="all-linear", rank=4, dropout=0.0)
    with torch.no_grad():
        for _, layer in lorakit.adapted_layers(model):
            layer.variant.B.normal_(0, 0.1)
    assert takes_token_loss(model)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 5:9] = -100
    own = model(input_ids=ids, labels=labels).loss
    own_grads = torch.autograd.grad(own, [p for p in model.parameters() if p.requires_grad])
    summed, count = TokenLoss.of(model)(labels=labels, input_ids=ids)
    assert int(count) == int((labels[:, 1:] != -100).sum())
    mine = summed / count
    mine_grads = torch.autograd.grad(mine, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(mine, own, rtol=1e-5, atol=1e-6)
    for got, want in zip(mine_grads, own_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_model_whose_logits_are_not_its_heads_keeps_its_own_loss() -> None:
    class Scaled(type(tiny_llama())):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    model = Scaled(tiny_llama().config)
    assert not takes_token_loss(model)
    assert takes_token_loss(tiny_llama())
    assert not takes_token_loss(nn.Linear(3, 3))


def test_a_steps_loss_is_the_mean_over_all_its_labelled_tokens() -> None:
    """Two micro-batches with 4 and 22 labelled tokens: the step's gradient is the one-batch mean's (a mean
    of the two micro-batch means would weigh each of the 4 tokens over five times as much)."""
    model = tiny_llama()
    lorakit.apply(model, "lora", targets="all-linear", rank=4, dropout=0.0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 12), generator=gen)
    labels = ids.clone()
    labels[:2, :10] = -100  # the first micro-batch (rows 0, 1) predicts positions 10 and 11 only
    data = TokenizedData(ids.tolist(), labels.tolist(), 0)
    params = [p for p in model.parameters() if p.requires_grad]
    whole = next(eval_batches(data, 4))
    summed, count = TokenLoss.of(model)(**whole)
    want = torch.autograd.grad(summed / count, params)
    cfg = TrainConfig(steps=1, batch_size=2, grad_accum=2, progress=False)
    source = LossBackward(model, eval_batches(data, 2), cfg)
    loss = source.backward(0, lambda step: None)
    torch.testing.assert_close(loss, (summed / count).item(), rtol=1e-5, atol=1e-6)
    for p, g in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    assert source.tokens == 48


def test_evaluation_sums_over_tokens_and_never_holds_a_batchs_logits(monkeypatch) -> None:
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(cross_entropy, "_CHUNK_ELEMENTS", 4 * 512)
    config = tiny_llama().config
    config.vocab_size = 512  # the logits outgrow every activation of this tiny model
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 512, (6, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :4] = -100
    data = TokenizedData(ids.tolist(), labels.tolist(), 0)
    with LargestTensor() as seen:
        metrics = evaluate(model, data, batch_size=6)
    assert seen.numel < 6 * 6 * 512  # less than the logits of the batch's labelled positions
    with torch.no_grad():
        own = model(input_ids=ids, labels=labels).loss.item()
    assert metrics["loss"] == pytest.approx(own, rel=1e-5)
    assert token_loss.takes_token_loss(model)


def _softcapped():
    """A tiny Gemma-2, whose logits are soft-capped after the head: it keeps its own loss (a token mean)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=3.0,
    )  # fmt: skip
    return Gemma2ForCausalLM(config).eval()


def _uneven_answers() -> TokenizedData:
    """Three rows whose answers have 1, 9 and 2 labelled tokens."""
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :11], labels[1, :3], labels[2, :10] = -100, -100, -100
    return TokenizedData(ids.tolist(), labels.tolist(), 0)


def test_a_model_keeping_its_own_loss_is_evaluated_over_tokens_whatever_the_batch() -> None:
    model, data = _softcapped(), _uneven_answers()
    assert not takes_token_loss(model)
    ids, labels = (torch.tensor(x) for x in (data.input_ids, data.labels))
    with torch.no_grad():
        whole = model(input_ids=ids, labels=labels).loss.item()  # the mean over all 12 predicted tokens
    for batch_size in (1, 2, 3):  # batch 1 gave the mean of the rows' means (3.59 against 2.53 in one case)
        assert evaluate(model, data, batch_size=batch_size)["loss"] == pytest.approx(whole, rel=1e-5)


def test_a_model_keeping_its_own_loss_steps_on_the_mean_over_all_its_labelled_tokens() -> None:
    model, data = _softcapped(), _uneven_answers()
    lorakit.apply(model, "lora", targets="all-linear", rank=4, dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for batch_size, accum in ((3, 1), (1, 3)):
        model.zero_grad()
        cfg = TrainConfig(steps=1, batch_size=batch_size, grad_accum=accum, progress=False)
        loss = LossBackward(model, eval_batches(data, batch_size), cfg).backward(0, lambda step: None)
        results.append((loss, [p.grad.clone() for p in params]))
    (one, one_grads), (accumulated, accumulated_grads) = results
    assert accumulated == pytest.approx(one, rel=1e-5)  # was the mean of the three micro-batch means
    assert any(float(g.abs().max()) > 0 for g in one_grads)
    for got, want in zip(accumulated_grads, one_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
