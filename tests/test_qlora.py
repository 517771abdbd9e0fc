"""QLoRA: LoRA on every linear layer of an NF4 base that apply quantises; the formula, defaults, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama
from test_causal_lm import assert_reloads_then_merges
from torch import nn

import lorakit
from lorakit.adapters.quantize import QuantizationError
from lorakit.core.config import ConfigError
from lorakit.core.nf4_linear import NF4Linear
from lorakit.core.quant import quantize_nf4
from lorakit.train.loop import TrainConfig, train
from lorakit.variants.qlora import QLoRAConfig


class Tiny(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(64, 48)
        self.norm = nn.LayerNorm(48)
        self.fc2 = nn.Linear(48, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(torch.tanh(self.norm(self.fc1(x)))))


def perturb(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def test_forward_is_eq5_on_the_nf4_weight() -> None:
    # Y = X doubleDequant(c1, c2, W_NF4) (in bf16) + s X A^T B^T, computed here from quantize_nf4 directly.
    dense = Tiny()
    model = lorakit.apply(Tiny(), "qlora", targets=["fc1"], rank=4, alpha=8.0, dropout=0.0)
    perturb(model)
    layer = model.fc1
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    w = quantize_nf4(dense.fc1.weight).dequantize(torch.bfloat16)  # double-quantised, blocks of 64
    base = F.linear(x.bfloat16(), w, dense.fc1.bias.bfloat16()).float()
    expected = base + (8.0 / 4) * (x @ layer.variant.A.t()) @ layer.variant.B.t()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    assert layer.base_layer.weight_absmax is None  # double quantisation is on by default


def test_paper_defaults_and_all_linear_targets() -> None:
    cfg = QLoRAConfig()
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.targets) == (64, 16.0, 0.1, "all-linear")
    assert (cfg.base_quantization, cfg.compute_dtype, cfg.double_quant) == ("nf4", "bfloat16", True)
    model = lorakit.apply(tiny_llama(), "qlora", rank=16)  # 64 is above the tiny model's 32-wide layers
    adapted = dict(lorakit.adapted_layers(model))
    linears = [n for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert sorted(adapted) == sorted(linears) and len(adapted) == 14  # 7 per decoder layer
    assert all(isinstance(layer.base_layer, NF4Linear) for layer in adapted.values())
    assert all(layer.variant.A.shape[0] == 16 and layer.variant.scale == 1.0 for layer in adapted.values())
    # Embeddings, norms and the head keep full precision and are not adapted.
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32


def test_save_then_load_onto_a_fresh_full_precision_base(tmp_path) -> None:
    model = lorakit.apply(Tiny(), "qlora", rank=4, train_modules=["head"])
    perturb(model)
    lorakit.save(model, tmp_path / "a")
    fresh = lorakit.load(Tiny(), tmp_path / "a")  # apply quantises the fresh base exactly as before
    assert isinstance(fresh.fc2.base_layer, NF4Linear)
    assert lorakit.info(fresh).fingerprint == lorakit.info(model).fingerprint
    x = torch.randn(4, 64)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_fingerprint_covers_the_quantised_base() -> None:
    def fp(**kw: object) -> str:
        return lorakit.info(lorakit.apply(Tiny(), "qlora", rank=4, **kw)).fingerprint

    pre = lorakit.quantize(Tiny())  # quantised first with the same settings: same base, same fingerprint
    assert fp() == fp() == lorakit.info(lorakit.apply(pre, "qlora", rank=4)).fingerprint
    assert fp() != fp(double_quant=False)  # other stored scales: another base
    assert fp() != fp(base_quantization=None)
    assert fp() != lorakit.info(lorakit.apply(Tiny(seed=1), "qlora", rank=4)).fingerprint


def test_a_base_quantised_with_other_settings_is_refused(tmp_path) -> None:
    lorakit.save(lorakit.apply(Tiny(), "qlora", rank=4), tmp_path / "a")
    other = lorakit.quantize(Tiny(), double_quant=False)
    with pytest.raises(QuantizationError, match="double_quant=False, but the config asks for"):
        lorakit.load(other, tmp_path / "a")
    with pytest.raises(QuantizationError, match="compute_dtype=float32"):
        lorakit.apply(lorakit.quantize(Tiny(), compute_dtype=torch.float32), "qlora", rank=4)


def test_merge_gives_dense_layers_in_the_original_dtype() -> None:
    model = lorakit.apply(Tiny(), "qlora", rank=4, dropout=0.0)
    perturb(model)
    x = torch.randn(4, 64)
    with torch.no_grad():
        out = model(x)
        plain = lorakit.merge(model)
        assert type(plain.fc1) is nn.Linear and plain.fc1.weight.dtype == torch.float32
        torch.testing.assert_close(plain(x), out, atol=2e-2, rtol=2e-2)  # bf16 matmul vs fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_merge_after_a_cast_gives_dense_layers_in_the_model_dtype(dtype) -> None:
    model = lorakit.apply(Tiny(), "qlora", rank=4, dropout=0.0).to(dtype)
    perturb(model)
    x = torch.randn(4, 64, dtype=dtype)
    with torch.no_grad():
        out = model(x)
        plain = lorakit.merge(model)
        assert plain.fc1.weight.dtype == dtype and plain.fc1.bias.dtype == dtype  # was fp32: matmul failed
        torch.testing.assert_close(plain(x), out, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"base_quantization": "fp4"}, "'base_quantization' = 'fp4' is invalid"),
        ({"compute_dtype": "int8"}, "'compute_dtype' = 'int8' is invalid"),
        ({"double_quant": 1}, "'double_quant' = 1 is invalid"),
    ],
)
def test_bad_config_fields(fields: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        QLoRAConfig(**fields)


def test_torch_dtype_is_stored_by_name() -> None:
    assert QLoRAConfig(compute_dtype=torch.float16).compute_dtype == "float16"


def _gpt2_reference(dense: nn.Module, model: nn.Module) -> nn.Module:
    """``dense`` with every adapted Conv1D weight set to ``(deq(NF4(W^T)) + s B A)^T`` (from quantize_nf4)."""
    for name, layer in lorakit.adapted_layers(model):
        conv, v = dense.get_submodule(name), layer.variant
        w = quantize_nf4(conv.weight.detach().t()).dequantize(torch.float32)  # (out, in), as bitsandbytes
        with torch.no_grad():
            conv.weight.copy_((w + v.scale * v.B @ v.A).t())
    return dense


def test_gpt2_conv1d_end_to_end(tmp_path) -> None:
    """GPT-2's Conv1D projections: quantised transposed, training, exact forward, save/load, merge."""
    model = lorakit.apply(tiny_gpt2(), "qlora", rank=4, alpha=8.0, dropout=0.0, compute_dtype="float32")
    adapted = dict(lorakit.adapted_layers(model))
    assert sorted({n.rsplit(".", 1)[-1] for n in adapted}) == ["c_attn", "c_fc", "c_proj"]
    assert all(isinstance(layer.base_layer, NF4Linear) for layer in adapted.values())
    assert all(layer.kind.name == "conv1d_gpt2" for layer in adapted.values())
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    model.eval()
    with torch.no_grad():
        before = model(**batch).loss.item()
    cfg = TrainConfig(steps=40, lr=2e-2, warmup_ratio=0.0, progress=False)
    train(model, iter(lambda: batch, None), cfg)
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss.item()
        logits = model(ids).logits
        # The trained adapter on the 4-bit base equals a dense GPT-2 built from quantize_nf4 by hand.
        reference = _gpt2_reference(tiny_gpt2(), model).eval()
        torch.testing.assert_close(logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    assert after < before - 0.25, (before, after)
    merged = assert_reloads_then_merges(model, tiny_gpt2, ids, logits, tmp_path)
    # The merged model is a plain GPT-2 again: Conv1D layers in their own (in, out) layout.
    plain = tiny_gpt2()
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    assert {k: v.shape for k, v in merged.state_dict().items()} == shapes
    assert type(merged.transformer.h[0].attn.c_attn) is type(plain.transformer.h[0].attn.c_attn)


def test_gpt2_default_bf16_compute_trains() -> None:
    """``--variant qlora`` with its defaults (all-linear, bf16 compute, dropout 0.1) on a GPT-2 model."""
    model = lorakit.apply(tiny_gpt2(), "qlora", rank=4)
    assert len(lorakit.adapted_layers(model)) == 8
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    model.eval()
    with torch.no_grad():
        before = model(**batch).loss.item()
    train(model, iter(lambda: batch, None), TrainConfig(steps=40, lr=2e-2, warmup_ratio=0.0, progress=False))
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before - 0.1, (before, after)  # 4.16 -> 3.97 when measured
