"""Every registered variant on a tiny chat Llama, the way an LLM is tuned: chat-formatted batches with the
loss on the answers, a few steps of training, then save -> load (exact), merge (a plain transformers model
that loads with ``from_pretrained``) and, where PEFT has the method, an export that ``peft`` loads.
Generated from the registry: a new variant joins by itself."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_chat_sft
from transformers import AutoModelForCausalLM
from variant_cases import case_config

import lorakit
from lorakit.core.contract import Driver
from lorakit.data.datasets import BatchSampler
from lorakit.interop import save_peft
from lorakit.interop.peft_methods import METHODS
from lorakit.train.loop import TrainConfig, train

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A real 4-bit base for QLoRA here (the generated cases quantise nothing); Delta-LoRA moves W from step 2.
OVERRIDES = {
    "qlora": {"rank": 4, "alpha": 8.0},
    "delta_lora": {"rank": 4, "lam": 0.5, "start_step": 2},
    "vera": {"rank": 4, "d_initial": 0.5},
}


@pytest.fixture(scope="module")
def setup():
    return tiny_chat_sft()


def build(name: str, base: torch.nn.Module) -> torch.nn.Module:
    config = OVERRIDES.get(name, case_config(name))
    if name == "delta_lora":
        config["dropout"] = 0.0
    model = copy.deepcopy(base)
    if name == "qlora":
        return lorakit.apply(model, name, targets="all-linear", **config)
    return lorakit.apply(model, name, targets=TARGETS, **config)


@pytest.mark.parametrize("name", list(lorakit.VARIANTS))
def test_every_variant_tunes_saves_loads_merges_and_exports_a_chat_llm(name, setup, tmp_path) -> None:
    tokenizer, data, base = setup
    model = build(name, base)
    cfg = TrainConfig(steps=6, batch_size=8, lr=2e-2, warmup_ratio=0.0, progress=False)
    refusal = lorakit.get_variant(name).refusal(Driver.LOOP, lorakit.info(model).config)
    if refusal is not None:  # a variant that runs only in another driver says so before any step
        with pytest.raises(lorakit.CapabilityError):
            train(model, BatchSampler(data, 8, 0, group_by_length=True), cfg)
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train(model, BatchSampler(data, 8, 0, group_by_length=True), cfg)
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "no trainable tensor moved"
    assert result.tokens >= 6 * 8 * min(len(x) for x in data.input_ids)  # counted for the throughput

    model.eval()
    width = min(len(data.input_ids[0]), len(data.input_ids[1]))
    ids = torch.tensor([data.input_ids[0][:width], data.input_ids[1][:width]])
    with torch.no_grad():
        logits = model(ids).logits
    lorakit.save(model, tmp_path / "adapter")
    reloaded = lorakit.load(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)

    quantised = lorakit.info(model).config.base_storage() is not None
    tol = {"rtol": 5e-2, "atol": 5e-2} if quantised else {"rtol": 1e-4, "atol": 1e-4}
    problems = [layer.variant.peft_problem(layer) for _, layer in lorakit.adapted_layers(model)]
    if lorakit.get_variant(name).peft is not None and any(problems):  # refused with the reason, not wrong
        with pytest.raises(lorakit.LorakitError, match="PEFT"):
            save_peft(model, tmp_path / "peft")
    elif lorakit.get_variant(name).peft is not None and not quantised:
        save_peft(model, tmp_path / "peft")
        peft = pytest.importorskip("peft")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, logits, **tol)
    merged = lorakit.merge(model)
    merged.save_pretrained(tmp_path / "merged", safe_serialization=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, lorakit.AdaptedLayer) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, logits, **tol)


def test_the_peft_methods_cover_the_variants_that_declare_them() -> None:
    declared = {cls.peft.peft_type for cls in lorakit.VARIANTS.values() if cls.peft is not None}
    assert declared <= {m.peft_type for m in METHODS}


@pytest.mark.parametrize("name", list(lorakit.VARIANTS))
def test_every_variant_stores_its_adapter_in_bf16_on_request(name, setup, tmp_path) -> None:
    """``adapter_dtype="bfloat16"``: every adapter tensor in bf16 (half the memory, as QLoRA's paper keeps
    them), gradients in bf16, training moves them, and save -> load gives the same tensors and outputs."""
    tokenizer, data, base = setup
    config = {**OVERRIDES.get(name, case_config(name)), "adapter_dtype": "bfloat16"}
    if name == "delta_lora":
        config["dropout"] = 0.0
    model = lorakit.apply(
        copy.deepcopy(base), name, targets=TARGETS if name != "qlora" else "all-linear", **config
    )
    adapter = {n: p for n, p in model.named_parameters() if ".variant." in n}
    assert adapter and {p.dtype for p in adapter.values()} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in adapter.items() if p.requires_grad}
    cfg = TrainConfig(steps=3, batch_size=8, lr=2e-2, warmup_ratio=0.0, progress=False)
    if lorakit.get_variant(name).refusal(Driver.LOOP, lorakit.info(model).config) is not None:
        return
    train(model, BatchSampler(data, 8, 0), cfg)
    assert any(not torch.equal(adapter[n], t) for n, t in before.items())
    model.eval()
    ids = torch.tensor([data.input_ids[0]])
    with torch.no_grad():
        logits = model(ids).logits
    lorakit.save(model, tmp_path)
    reloaded = lorakit.load(copy.deepcopy(base), tmp_path).eval()
    assert {p.dtype for n, p in reloaded.named_parameters() if ".variant." in n} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
        # the merge forms the change from the bf16 tensors in fp32, as the forward does
        quantised = lorakit.info(model).config.base_storage() is not None
        tol = {"rtol": 5e-2, "atol": 5e-2} if quantised else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(lorakit.merge(model)(ids).logits, logits, **tol)
