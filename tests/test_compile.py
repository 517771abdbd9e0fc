"""torch.compile with fullgraph=True: adapted models trace without graph breaks, and compiled gradients equal
eager ones, with dropout too (the fused functions take their mask as a tensor drawn by one operator). Every
registered variant on linear layers, with every dropout rate its config accepts (0.1: the CPU kernels that
read the dropped positions; 0.3: those with a mask)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._inductor.config
from torch import nn
from variant_cases import config_with_dropout

import lorakit
from lorakit.core.dropout import dropout
from lorakit.kernels import dora_positions


def _cases(*rates: float) -> list[tuple[str, float]]:
    linear = [n for n, cls in lorakit.VARIANTS.items() if "linear" in cls.kinds]
    return [(n, p) for n in linear for p in rates if config_with_dropout(n, p) is not None]


def _model(variant: str, dropout: float) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
    model = lorakit.apply(base, variant, targets=["0", "2"], **config_with_dropout(variant, dropout)).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # every factor non-zero, so every gradient is generic
    return model


@pytest.mark.parametrize(("variant", "dropout"), _cases(0.0, 0.1, 0.3))
def test_compiled_fullgraph_gradients_equal_eager(variant: str, dropout: float) -> None:
    # With dropout the compiled graph draws each mask's seed from the global generator as eager does, so
    # with the same global seed the masks, hence the gradients, are the same.
    model = _model(variant, dropout=dropout)
    compiled = copy.deepcopy(model)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    model(x).square().sum().backward()
    torch._dynamo.reset()
    torch.manual_seed(7)
    torch.compile(compiled, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    eager = [p.grad for p in model.parameters() if p.requires_grad]
    ours = [p.grad for p in compiled.parameters() if p.requires_grad]
    assert len(ours) == len(eager) and all(g.abs().max() > 0 for g in eager)
    for got, want in zip(ours, eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [n for n, _ in _cases(0.5)])
def test_dropout_keeps_the_graph_whole(variant: str) -> None:
    model = _model(variant, dropout=0.5)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)  # raises on a graph break
    with torch.no_grad(), lorakit.disabled(model):
        base = model(x)
    assert out.shape == base.shape and (out - base).abs().max() > 1e-3  # the adapter (with dropout) acts
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters() if p.requires_grad)


def test_compiled_dropout_draws_the_eager_mask() -> None:
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    torch.manual_seed(3)
    eager = dropout(x, 0.25)
    torch._dynamo.reset()
    torch.manual_seed(3)
    with torch._inductor.config.patch(fallback_random=True):  # the seed from ATen's generator, as eager
        compiled = torch.compile(lambda t: dropout(t, 0.25), fullgraph=True, backend="inductor")(x)
    torch.testing.assert_close(compiled, eager)
    kept = eager != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # 16,384 draws: 5 standard deviations is 0.017
    torch.testing.assert_close(eager[kept], x[kept] / 0.75)
    compiled.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)  # dL/dx = keep / (1 - p)


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        out = self.head(torch.relu(self.fc1(x)))
        return nn.functional.cross_entropy(out, labels) if labels is not None else out


def test_the_public_api_takes_a_compiled_model(tmp_path) -> None:
    """torch.compile's wrapper names every module ``_orig_mod.<name>``; the API works on the module inside
    and hands the compiled model back, so files and names are those of the plain model."""
    from lorakit.train.loop import TrainConfig, train

    torch.manual_seed(0)
    base = _Classifier()
    fresh = copy.deepcopy(base)
    torch._dynamo.reset()
    compiled = torch.compile(base, backend="eager")
    assert lorakit.apply(compiled, "lora", targets=["fc1"], train_modules=["head"], rank=2) is compiled
    assert [name for name, _ in lorakit.adapted_layers(compiled)] == ["fc1"]
    assert sum(len(g["params"]) for g in lorakit.param_groups(compiled, 1e-2)) == 4  # A, B, head w and b

    def batches():
        gen = torch.Generator().manual_seed(1)
        while True:
            yield {
                "x": torch.randn(16, 8, generator=gen),
                "labels": torch.randint(0, 2, (16,), generator=gen),
            }

    result = train(compiled, batches(), TrainConfig(steps=20, lr=1e-2, warmup_ratio=0.0))
    assert result.losses[-1] < result.losses[0]
    assert lorakit.adapted_layers(compiled)[0][1].variant.B.abs().max() > 0  # the adapter trained
    lorakit.save(compiled, tmp_path / "adapter")
    x = torch.randn(4, 8)
    loaded = lorakit.load(torch.compile(fresh, backend="eager"), tmp_path / "adapter").eval()
    compiled.eval()  # no adapter dropout
    torch.testing.assert_close(loaded(x), compiled(x))
    merged = lorakit.merge(loaded)
    assert merged is loaded and not lorakit.adapted_layers(merged)
    torch.testing.assert_close(merged(x), compiled(x), atol=1e-5, rtol=1e-5)


def test_compiled_dora_forms_its_masked_products_from_the_dropped_inputs(monkeypatch) -> None:
    calls = []
    forward, grads = dora_positions.products_on_kept, dora_positions.input_grads_on_kept
    monkeypatch.setattr(dora_positions, "products_on_kept", lambda *a: calls.append("f") or forward(*a))
    monkeypatch.setattr(dora_positions, "input_grads_on_kept", lambda *a: calls.append("b") or grads(*a))
    model = _model("dora", dropout=0.1)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    assert sorted(calls) == ["b", "b", "f", "f"]  # two adapted layers, through the operators


def test_the_public_api_takes_a_data_parallel_model(tmp_path) -> None:
    """nn.DataParallel names every module ``module.<name>``: the API works on the module inside, so an
    adapter saved from the wrapped model loads into the bare one, and the other way round."""
    torch.manual_seed(0)
    base = _Classifier()
    bare, twin = copy.deepcopy(base), copy.deepcopy(base)
    wrapped = nn.DataParallel(base)
    assert lorakit.apply(wrapped, "lora", targets=["fc1"], rank=2) is wrapped
    assert [name for name, _ in lorakit.adapted_layers(wrapped)] == ["fc1"]
    torch.nn.init.normal_(lorakit.adapted_layers(wrapped)[0][1].variant.B)
    lorakit.save(wrapped, tmp_path / "from-wrapped")
    x = torch.randn(4, 8)
    loaded = lorakit.load(bare, tmp_path / "from-wrapped").eval()
    torch.testing.assert_close(loaded(x), wrapped.eval()(x))
    lorakit.save(loaded, tmp_path / "from-bare")
    rewrapped = lorakit.load(nn.DataParallel(twin), tmp_path / "from-bare").eval()
    torch.testing.assert_close(rewrapped(x), loaded(x))
    assert lorakit.merge(rewrapped) is rewrapped and not lorakit.adapted_layers(rewrapped)


def test_qlora_on_its_4bit_base_compiles_whole_and_equals_eager() -> None:
    # The 4-bit base (NF4 with double quantisation) dequantises inside the graph: its code tables are
    # constants, never rebuilt from Python lists while tracing.
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    model = lorakit.apply(base, "qlora", targets=["0", "2"], rank=2, dropout=0.0, compute_dtype="float32")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)  # raises on a graph break
    torch.testing.assert_close(compiled, eager)
