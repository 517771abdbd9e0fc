"""Plain LoRA against PEFT's LoraConfig on copied, perturbed adapter weights: outputs and merged weights."""

from __future__ import annotations

import copy

import pytest
import torch
from layer_zoo import MLP
from torch import nn

import lorakit

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def twins(base: nn.Module, targets: list[str], rslora: bool, fan_in_fan_out: bool) -> tuple[nn.Module, ...]:
    """PEFT and lorakit LoRA on copies of ``base``, with PEFT's (perturbed) factors copied into ours."""
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=targets,
        use_rslora=rslora,
        fan_in_fan_out=fan_in_fan_out,
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = lorakit.apply(
        copy.deepcopy(base), "lora", targets=targets, rank=4, alpha=8.0, dropout=0.0, rslora=rslora
    )
    gen = torch.Generator().manual_seed(5)
    modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lorakit.adapted_layers(ours):
            peft_layer = modules[name]
            a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
            a.add_(torch.randn(a.shape, generator=gen) * 0.2)
            b.add_(torch.randn(b.shape, generator=gen) * 0.2)  # B starts at zero: make it non-trivial
            layer.variant.A.copy_(a)  # both (r, in)
            layer.variant.B.copy_(b)  # both (out, r)
    return theirs.eval(), ours.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_outputs_and_merged_weights_match_peft(rslora: bool) -> None:
    torch.manual_seed(0)
    theirs, ours = twins(MLP(), ["fc1", "fc2"], rslora, fan_in_fan_out=False)
    x = torch.randn(4, 3, 12)
    with torch.no_grad():
        out_theirs, out_ours = theirs(x), ours(x)
        with lorakit.disabled(ours):
            assert (out_ours - ours(x)).abs().max() > 1e-3, "the copied adapter must change the output"
    assert (out_theirs - out_ours).abs().max() <= 1e-5
    merged_theirs, merged_ours = theirs.merge_and_unload(), lorakit.merge(ours)
    for name in ("fc1", "fc2"):
        w_theirs, w_ours = getattr(merged_theirs, name).weight, getattr(merged_ours, name).weight
        assert (w_theirs - w_ours).abs().max() <= 1e-6


def test_gpt2_conv1d_c_attn_matches_peft() -> None:
    torch.manual_seed(0)
    theirs, ours = twins(tiny_gpt2(), ["c_attn"], rslora=False, fan_in_fan_out=True)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_theirs, out_ours = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
        with lorakit.disabled(ours):
            assert (out_ours - ours(input_ids=ids).logits).abs().max() > 1e-3
    assert (out_theirs - out_ours).abs().max() <= 1e-5
    merged_theirs, merged_ours = theirs.merge_and_unload(), lorakit.merge(ours)
    for block_theirs, block_ours in zip(merged_theirs.transformer.h, merged_ours.transformer.h, strict=True):
        w_theirs, w_ours = block_theirs.attn.c_attn.weight, block_ours.attn.c_attn.weight
        assert w_ours.shape == (32, 96)  # Conv1D stores (in, out); merged in its own layout
        assert (w_theirs - w_ours).abs().max() <= 1e-6
