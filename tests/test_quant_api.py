"""lorakit.quantize: which layers become 4-bit, errors, checkpointing on a 4-bit base, CLI --quantize."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.adapters.io import AdapterFileError
from lorakit.adapters.quantize import QuantizationError, dequantize
from lorakit.cli import main
from lorakit.core.nf4_linear import NF4Linear
from lorakit.core.quant import quantize_nf4


def test_default_quantises_every_linear_but_the_head() -> None:
    model = tiny_llama()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert lorakit.quantize(model) is model
    quantised = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert sorted(quantised) == sorted(n for n in dense if n != "lm_head") and len(quantised) == 14
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, dense["lm_head"])
    assert type(model.model.embed_tokens) is nn.Embedding and model.model.norm.weight.dtype == torch.float32
    for name, layer in quantised.items():
        assert layer.compute_dtype == torch.bfloat16 and layer.weight_absmax is None  # bf16, double quant
        assert torch.equal(layer.weight_packed, quantize_nf4(dense[name]).packed)
    # Only the adapters will train: a quantised layer has no trainable weight at all.
    assert not any("weight" in n for n, _ in model.named_parameters() if "layers" in n and "proj" in n)


def test_default_quantises_gpt2_conv1d_transposed_but_not_the_head() -> None:
    model = tiny_gpt2()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    lorakit.quantize(model)
    quantised = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert sorted(quantised) == sorted(dense) and len(quantised) == 8  # c_attn, c_proj, c_fc, mlp.c_proj x 2
    assert type(model.lm_head) is nn.Linear
    for name, layer in quantised.items():  # stored as (out, in), like bitsandbytes' transformers integration
        assert torch.equal(layer.weight_packed, quantize_nf4(dense[name].t()).packed)
    dequantize(model)
    assert all(type(model.get_submodule(n)).__name__ == "Conv1D" for n in dense)
    assert {n: model.get_submodule(n).weight.shape for n in dense} == {n: w.shape for n, w in dense.items()}


def test_options_and_explicit_targets() -> None:
    model = lorakit.quantize(tiny_llama(), compute_dtype="float16", double_quant=False, targets=["q_proj"])
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 2 and all(m.compute_dtype == torch.float16 for m in layers)
    assert all(m.weight_absmax is not None for m in layers)
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear


def test_quantised_model_runs_close_to_the_dense_one() -> None:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_llama()(ids).logits
        out = lorakit.quantize(tiny_llama())(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: lorakit.quantize(tiny_llama(), "fp4"), "unknown quant type 'fp4'.*pass 'nf4'"),
        (lambda: lorakit.quantize(tiny_llama(), compute_dtype=torch.int8), "compute_dtype .* not supported"),
        (
            lambda: lorakit.quantize(lorakit.quantize(tiny_llama())),
            "already NF4-quantised .* quantize runs once",
        ),
        (lambda: lorakit.quantize(tiny_llama().double()), r"torch.float64 weight.*model.float\(\)"),
        (lambda: lorakit.quantize(nn.Sequential(nn.Conv1d(2, 2, 1))), "no linear layer to quantise"),
        (
            lambda: lorakit.quantize(tiny_gpt2(), targets=["wte"]),
            "embedding layer; NF4 quantises nn.Linear and GPT-2 Conv1D",
        ),
        (lambda: lorakit.quantize(lorakit.apply(tiny_llama(), "lora")), "quantise the base first"),
    ],
)
def test_errors_are_one_line_and_name_the_fix(call, match: str) -> None:
    with pytest.raises(QuantizationError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_int8_weight_is_called_already_quantised() -> None:
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(QuantizationError, match="looks already quantised"):
        lorakit.quantize(nn.Sequential(layer), targets=["0"])


def test_a_failed_call_leaves_the_model_unchanged() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).double())
    with pytest.raises(QuantizationError):
        lorakit.quantize(model, targets=["0", "1"])
    assert type(model[0]) is nn.Linear


def test_dequantize_gives_dense_layers_with_the_dequantised_weight() -> None:
    model = lorakit.quantize(tiny_llama())
    q = model.model.layers[0].mlp.up_proj.dequantized_weight()
    dequantize(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, q)


def _train(checkpointing: bool, reentrant: bool, steps: int = 3) -> tuple[list, list, int]:
    """Losses, adapter gradients and the number of forward calls of one 4-bit layer, per step."""
    model = lorakit.apply(lorakit.quantize(tiny_llama()), "qlora", rank=4, dropout=0.1)
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it; users still call it
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []
    model.model.layers[0].mlp.down_proj.base_layer.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    opt = torch.optim.AdamW(lorakit.param_groups(model, 1e-2))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for step in range(steps):
        torch.manual_seed(step)  # the same dropout masks in both runs
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses, grads, len(calls)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_on_a_4bit_base(reentrant: bool) -> None:
    ref_losses, ref_grads, ref_calls = _train(checkpointing=False, reentrant=reentrant)
    losses, grads, calls = _train(checkpointing=True, reentrant=reentrant)
    assert (ref_calls, calls) == (3, 6)  # checkpointing really recomputes each block in backward
    n_adapter = 2 * 14  # A and B of 14 linear layers
    for step in range(3):
        assert torch.equal(losses[step], ref_losses[step])
        assert grads[step].keys() == ref_grads[step].keys() and len(grads[step]) == n_adapter
        for name, g in grads[step].items():
            # At step 0, B = 0 gives A a zero gradient; every other gradient is non-zero.
            assert g.abs().sum() > 0 or step == 0 and name.endswith(".A"), f"{name} got no gradient"
            torch.testing.assert_close(g, ref_grads[step][name], atol=1e-6, rtol=1e-5)
    assert ref_losses[-1] < ref_losses[0]


def test_a_4bit_model_pickles_and_its_merged_model_is_the_plain_model_again() -> None:
    """The input embeddings' hook for reentrant checkpointing is lorakit's own (transformers' is a closure,
    which pickle refuses), and merging the adapter away removes it and unfreezes the model as it was."""
    model = lorakit.apply(tiny_llama(), "qlora", rank=4)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    embeddings = model.get_input_embeddings()
    assert embeddings(ids).requires_grad and len(embeddings._forward_hooks) == 1
    with torch.no_grad():
        want = model(input_ids=ids).logits
    clone = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(clone(input_ids=ids).logits, want)
    plain = lorakit.merge(model)
    assert not embeddings._forward_hooks
    assert all(p.requires_grad for p in plain.parameters())  # as before apply
    assert pickle.loads(pickle.dumps(plain)) is not None
    quantised = lorakit.quantize(tiny_llama())
    assert len(quantised.get_input_embeddings()._forward_hooks) == 1
    dequantize(quantised)
    assert not quantised.get_input_embeddings()._forward_hooks


def test_cli_train_eval_merge_with_quantize(tiny_bert_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    common = ["--model", str(tiny_bert_dir), "--steps", "3", "--batch-size", "8", "--no-progress"]
    argv = ["train", *common, "--quantize", "nf4", "--targets", "query,value", "--output-dir", str(run)]
    assert main(argv) == 0, capsys.readouterr().err
    from lorakit.jobs.saved import load_adapted

    job, model, tokenizer = load_adapted(str(run))
    assert job.quantize == "nf4" and isinstance(model.bert.encoder.layer[0].attention.self.key, NF4Linear)
    assert main(["eval", "--adapter", str(run)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    original = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    assert not any(isinstance(m, lorakit.AdaptedLayer | NF4Linear) for m in merged.modules())
    # A layer the adapter did not touch is saved dequantised (never the original weights, never missing).
    key = merged.bert.encoder.layer[0].attention.self.key.weight
    assert torch.equal(
        key, quantize_nf4(original.bert.encoder.layer[0].attention.self.key.weight).dequantize()
    )
    batch = tokenizer(["a fine film", "dull and slow"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, atol=2e-2, rtol=2e-2)


def test_cli_qlora_variant(tiny_bert_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_bert_dir), "--variant", "qlora", "--targets", "all-linear"]
    argv += ["--rank", "4", "--steps", "2", "--batch-size", "8", "--no-progress", "--output-dir", str(run)]
    assert main(argv) == 0, capsys.readouterr().err
    assert main(["eval", "--adapter", str(run)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["train", *argv[1:-1], str(tmp_path / "bad"), "--quantize", "fp4"]) == 2
    assert "unknown quant type 'fp4'" in capsys.readouterr().err


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_a_4bit_base_counts_its_weights_in_the_total(build) -> None:
    # The packed NF4 codes are buffers; each still stands for the out x in parameters of its weight.
    dense = lorakit.apply(build(), "lora", rank=2)
    quantized = lorakit.apply(lorakit.quantize(build()), "lora", rank=2)
    assert any(isinstance(m, NF4Linear) for m in quantized.modules())
    ours, theirs = lorakit.summary(quantized), lorakit.summary(dense)
    assert (ours.trainable, ours.total) == (theirs.trainable, theirs.total)


def test_loading_onto_a_base_quantised_otherwise_names_the_cause(tmp_path) -> None:
    torch.manual_seed(0)
    base = tiny_llama()
    qlora = lorakit.apply(copy.deepcopy(base), "qlora", rank=2)
    lorakit.save(qlora, tmp_path / "qlora")
    assert json.loads((tmp_path / "qlora" / "adapter.json").read_text())["base_dtypes"] == [
        "quantised from float32"
    ]
    lorakit.load(copy.deepcopy(base), tmp_path / "qlora")  # the same base quantises to the same codes
    with pytest.raises(
        AdapterFileError, match=r"\(quantised from float32\).*\(quantised from bfloat16\): load the base"
    ):
        lorakit.load(copy.deepcopy(base).to(torch.bfloat16), tmp_path / "qlora")
    lora = lorakit.apply(lorakit.quantize(copy.deepcopy(base)), "lora", rank=2)
    lorakit.save(lora, tmp_path / "lora")
    with pytest.raises(
        AdapterFileError, match="trained on a quantised base .* not quantised: quantise it as it was"
    ):
        lorakit.load(copy.deepcopy(base), tmp_path / "lora")
    lorakit.load(lorakit.quantize(copy.deepcopy(base)), tmp_path / "lora")
