"""PEFT's adapter format both ways: files PEFT wrote load into lorakit, files lorakit wrote load into PEFT."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch
from layer_zoo import MLP, perturb
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.adapters.io import AdapterFileError
from lorakit.common.errors import LorakitError
from lorakit.interop import load_peft, save_peft
from lorakit.variants.dylora import set_rank

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


class Net(nn.Module):
    """An embedding, a 2-D convolution, linear layers and a classification head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(8 * 3, 16)
        self.classifier = nn.Linear(16, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(ids).unsqueeze(1))  # (n, 3, seq, 8)
        return self.classifier(torch.relu(self.fc(h.permute(0, 2, 1, 3).flatten(2)))).mean(1)


def tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


IDS = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(0))
GPT2_IDS = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_adapter_loads_into_lorakit_with_the_same_outputs(tmp_path, dora: bool, rslora: bool) -> None:
    torch.manual_seed(0)
    base = Net().eval()
    targets = ["emb", "conv", "fc"]
    cfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets, use_dora=dora, use_rslora=rslora,
                          modules_to_save=["classifier"])  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_peft(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        want, got = theirs.eval()(IDS), ours(IDS)
        assert (want - base(IDS)).abs().max() > 1e-2, "the adapter must change the output"
        assert (got - want).abs().max() <= 1e-5
    state = lorakit.info(ours)
    assert (
        state.variant == ("dora" if dora else "lora") and state.config.rank == 2 and state.config.alpha == 6
    )
    assert sorted(state.targets) == sorted(targets) and state.train_modules == ["classifier"]


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_a_lorakit_adapter_loads_into_peft_with_the_same_outputs(tmp_path, variant: str) -> None:
    torch.manual_seed(0)
    base = Net().eval()
    targets = ["emb", "conv", "fc"]
    ours = lorakit.apply(copy.deepcopy(base), variant, targets=targets, rank=3, alpha=5.0, dropout=0.1,
                         train_modules=["classifier"])  # fmt: skip
    perturb(ours)
    save_peft(ours.eval(), tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert (ours(IDS) - base(IDS)).abs().max() > 1e-2
        assert (theirs(IDS) - ours(IDS)).abs().max() <= 1e-5
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 3 and saved["lora_alpha"] == 5.0 and saved["use_dora"] == (variant == "dora")


def test_gpt2_conv1d_round_trips_through_peft_both_ways(tmp_path) -> None:
    torch.manual_seed(0)
    base = tiny_gpt2()
    ours = lorakit.apply(copy.deepcopy(base), "lora", targets=["c_attn", "c_fc"], rank=4, alpha=8.0)
    perturb(ours)
    save_peft(ours.eval(), tmp_path / "out")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    back = load_peft(copy.deepcopy(base), tmp_path / "out").eval()
    with torch.no_grad():
        logits = ours(GPT2_IDS).logits
        assert (logits - base(GPT2_IDS).logits).abs().max() > 1e-2
        assert (theirs(GPT2_IDS).logits - logits).abs().max() <= 1e-4
        assert torch.equal(back(GPT2_IDS).logits, logits)


def test_dylora_is_written_at_its_chosen_rank(tmp_path) -> None:
    torch.manual_seed(0)
    base = Net().eval()
    ours = lorakit.apply(
        copy.deepcopy(base), "dylora", targets=["fc", "conv"], rank=3, alpha=4.0
    )  # conv: 3 x 9
    perturb(ours)
    ours.eval()
    set_rank(ours, 2)
    save_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        at_two = ours(IDS)
        set_rank(ours, None)
        assert (ours(IDS) - at_two).abs().max() > 1e-3, "rank 2 and rank 3 must differ"
        assert (theirs(IDS) - at_two).abs().max() <= 1e-5
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2


class Wide(nn.Module):
    """Layers wide enough for Kronecker factorisations: a 2-D convolution and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12 * 4, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (n, 8, 4, 4)
        return self.fc(self.conv(x).mean(-1).flatten(1))


WIDE_X = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(1))
LYCORIS_CASES = [
    ("loha", {"rank": 4}, lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=["conv", "fc"])),
    ("lokr", {"rank": 1}, lambda: peft.LoKrConfig(r=1, alpha=6, target_modules=["conv", "fc"])),
    (
        "lokr",
        {"rank": 2, "decompose_both": True},
        lambda: peft.LoKrConfig(r=2, alpha=6, target_modules=["conv", "fc"], decompose_both=True),
    ),  # fmt: skip
    ("lokr", {"rank": 8}, lambda: peft.LoKrConfig(r=8, alpha=6, target_modules=["conv", "fc"])),
]


@pytest.mark.parametrize(("variant", "options", "peft_config"), LYCORIS_CASES,
                         ids=["loha", "lokr-w2-lowrank", "lokr-both-lowrank", "lokr-full"])  # fmt: skip
def test_loha_and_lokr_adapters_cross_both_ways(tmp_path, variant: str, options: dict, peft_config) -> None:
    torch.manual_seed(0)
    base = Wide().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config())
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "from-peft")
    ours = load_peft(copy.deepcopy(base), tmp_path / "from-peft").eval()
    assert lorakit.info(ours).variant == variant
    with torch.no_grad():
        want = theirs.eval()(WIDE_X)
        assert (want - base(WIDE_X)).abs().max() > 1e-2
        assert (ours(WIDE_X) - want).abs().max() <= 1e-5
    mine = lorakit.apply(copy.deepcopy(base), variant, targets=["conv", "fc"], alpha=6.0, **options)
    perturb(mine, seed=9)
    save_peft(mine.eval(), tmp_path / "from-lorakit")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from-lorakit").eval()
    with torch.no_grad():
        assert (mine(WIDE_X) - base(WIDE_X)).abs().max() > 1e-2
        assert (back(WIDE_X) - mine(WIDE_X)).abs().max() <= 1e-5


def test_vera_crosses_both_ways_with_its_shared_projections(tmp_path) -> None:
    torch.manual_seed(0)
    base, x = MLP().eval(), torch.randn(5, 12)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=4, target_modules=["fc1", "fc2"]))
    perturb(theirs)
    with torch.no_grad():  # projections that no seed would give: they must come from the file
        theirs.base_model.vera_A["default"].mul_(2.0)
    theirs.save_pretrained(tmp_path / "from-peft")
    ours = load_peft(copy.deepcopy(base), tmp_path / "from-peft").eval()
    with torch.no_grad():
        want = theirs.eval()(x)
        assert (want - base(x)).abs().max() > 1e-2 and (ours(x) - want).abs().max() <= 1e-5
    assert ours.fc1.variant.A is ours.fc2.variant.A  # still one shared projection
    mine = lorakit.apply(copy.deepcopy(base), "vera", targets=["fc1", "fc2"], rank=4, projection_seed=3)
    perturb(mine, seed=9)
    save_peft(mine.eval(), tmp_path / "from-lorakit")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from-lorakit").eval()
    with torch.no_grad():
        assert (mine(x) - base(x)).abs().max() > 1e-2 and (back(x) - mine(x)).abs().max() <= 1e-5


def test_vera_with_projections_larger_than_its_layers_exports_the_corner_they_read(tmp_path) -> None:
    """PEFT builds the shared projections at its layers' largest sizes and loads the file's into them: a
    larger ``projection_shape`` is written cut to that corner, which is all any layer reads."""
    torch.manual_seed(0)
    base, x = MLP().eval(), torch.randn(5, 12)
    mine = lorakit.apply(
        copy.deepcopy(base), "vera", targets=["fc1", "fc2"], rank=4, projection_shape=[64, 64]
    )
    perturb(mine, seed=9)
    save_peft(mine.eval(), tmp_path / "from-lorakit")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from-lorakit").eval()
    again = load_peft(copy.deepcopy(base), tmp_path / "from-lorakit").eval()
    with torch.no_grad():
        assert (mine(x) - base(x)).abs().max() > 1e-2
        assert (back(x) - mine(x)).abs().max() <= 1e-5 and (again(x) - mine(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("config", ["lora", "loha", "lokr"])
def test_a_peft_adapter_with_a_rank_above_a_layers_size_loads_and_saves(tmp_path, config) -> None:
    """PEFT takes a rank above what a layer can use (its default r = 8 on a 4-wide layer): the file fixes
    the shapes, so lorakit loads it exactly, saves it and loads its own save, where ``apply`` would refuse
    such a rank for a new adapter."""
    torch.manual_seed(0)
    base, x = MLP().eval(), torch.randn(5, 12)
    peft_config = {
        "lora": lambda: peft.LoraConfig(r=8, target_modules=["fc2"]),
        "loha": lambda: peft.LoHaConfig(r=8, target_modules=["fc2"]),
        "lokr": lambda: peft.LoKrConfig(r=8, target_modules=["fc2"]),
    }[config]()
    assert min(base.fc2.weight.shape) < 8
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config)
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        want = theirs.eval()(x)
        assert (want - base(x)).abs().max() > 1e-2 and (ours(x) - want).abs().max() <= 1e-5
    lorakit.save(ours, tmp_path / "lorakit")
    again = lorakit.load(copy.deepcopy(base), tmp_path / "lorakit").eval()
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


def test_refusals_name_the_problem(tmp_path) -> None:
    base = Net()
    adalora = lorakit.apply(copy.deepcopy(base), "adalora", targets=["fc"])
    with pytest.raises(LorakitError, match="variant 'adalora' has no PEFT equivalent"):
        save_peft(adalora, tmp_path / "adalora")
    ours = lorakit.apply(copy.deepcopy(base), "lora", targets=["fc"], rank=2)
    save_peft(ours, tmp_path / "a")
    with pytest.raises(FileExistsError, match="already holds a PEFT adapter"):
        save_peft(ours, tmp_path / "a")
    save_peft(ours, tmp_path / "a", overwrite=True)
    lorakit.merge(ours, unload=False)
    with pytest.raises(LorakitError, match="unmerge"):
        save_peft(ours, tmp_path / "b")

    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    for change, message in [
        ({"peft_type": "IA3"}, "peft_type 'IA3'; lorakit reads LORA, LOHA, LOKR, VERA"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' changes the base weight"),
        ({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
        ({"modules_to_save": [""]}, "must be a list of module names"),
        ({"rank_pattern": {"fc": 4}}, "a rank per layer"),
        ({"use_qalora": True}, "QA-LoRA"),
        ({"bias": "all"}, "trained biases"),
        ({"lora_bias": True}, r"a trained bias beside lora_B \(lora_bias=true\)"),
    ]:
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(LorakitError, match=message):
            load_peft(copy.deepcopy(base), tmp_path / "a")
    with pytest.raises(AdapterFileError, match="no adapter directory .*missing"):
        load_peft(copy.deepcopy(base), tmp_path / "missing")


def test_a_hub_id_is_fetched_and_a_failed_fetch_names_both_places(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    base = Net()
    ours = lorakit.apply(copy.deepcopy(base), "lora", targets=["fc"], rank=2)
    perturb(ours)
    save_peft(ours.eval(), tmp_path / "snapshot")
    asked = []
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo, allow_patterns: asked.append(repo) or tmp_path / "snapshot",
    )
    loaded = load_peft(copy.deepcopy(base), "someone/their-adapter").eval()
    assert asked == ["someone/their-adapter"]
    with torch.no_grad():
        assert torch.equal(loaded(IDS), ours(IDS))

    def offline(repo, allow_patterns):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(
        AdapterFileError, match="no adapter directory someone/x, and fetching it .* no network"
    ):
        load_peft(copy.deepcopy(base), "someone/x")


def test_exports_peft_could_not_load_right_are_refused(tmp_path) -> None:
    gpt2 = tiny_gpt2()
    with pytest.raises(LorakitError, match="PEFT's LOHA has no conv1d_gpt2 layers"):
        save_peft(lorakit.apply(copy.deepcopy(gpt2), "loha", targets=["c_fc"], rank=2), tmp_path / "x")
    tied = lorakit.apply(copy.deepcopy(gpt2), "lora", targets=["c_attn"], rank=2, train_modules=["lm_head"])
    with pytest.raises(LorakitError, match="lm_head shares its weight with transformer.wte"):
        save_peft(tied, tmp_path / "x")
    with pytest.raises(LorakitError, match="train_modules entry classifier overlaps the adapted layer"):
        lorakit.apply(Net(), "lora", targets=["fc", "classifier"], rank=2, train_modules=["classifier"])
    lokr = lorakit.apply(Wide(), "lokr", targets=["fc"], rank=2, factor=8)  # 48 = 8 x 6: PEFT keeps (8, 6)
    with pytest.raises(LorakitError, match=r"PEFT splits 48 as \(8, 6\) and lorakit as \(6, 8\)"):
        save_peft(lokr, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    cfg = peft.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"])
    peft.get_peft_model(copy.deepcopy(gpt2), cfg).save_pretrained(tmp_path / "tied")
    with pytest.raises(AdapterFileError, match="tied.*lm_head shares its weight with transformer.wte.weight"):
        load_peft(copy.deepcopy(gpt2), tmp_path / "tied")
    # PEFT matches modules_to_save by plain name ending: "head" would also pick the adapted lm_head.
    head = Net()
    head.lm_head, head.head = nn.Linear(16, 16), nn.Linear(16, 2)
    lorakit.apply(head, "lora", targets=["lm_head"], rank=2, train_modules=["head"])
    with pytest.raises(LorakitError, match="head .* would also match the adapted layer lm_head in PEFT"):
        save_peft(head, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_whose_init_changed_the_base_is_refused(tmp_path, init: str) -> None:
    # PEFT subtracts the initial B A from the base again when it loads such a file; adding B A to the plain
    # base is off by that product (the base's top singular part under PiSSA).
    torch.manual_seed(0)
    base = MLP()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=init)
    )
    theirs.save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match=f"init_lora_weights='{init}' changes the base weight"):
        load_peft(copy.deepcopy(base), tmp_path)


def test_an_export_names_exactly_the_adapted_layers_where_a_name_ends_another(tmp_path) -> None:
    # PEFT reads a list entry "0" as every module whose name ends in ".0" (here also "1.0"): such an export
    # names its layers by an exact regex, so PEFT adapts the same layers (VeRA's projections fit).
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 8)), nn.Linear(8, 4)).eval()
    x = torch.randn(3, 6)
    for variant, options in [("lora", {"rank": 2}), ("vera", {"rank": 4})]:
        ours = lorakit.apply(copy.deepcopy(base), variant, targets=r"^(0|2)$", **options)
        perturb(ours)
        save_peft(ours, tmp_path / variant)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / variant).eval()
        adapted = [
            n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)
        ]
        assert adapted == ["base_model.model.0", "base_model.model.2"]
        with torch.no_grad():
            torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-6)
    plain = lorakit.apply(copy.deepcopy(base), "lora", targets=["2"], rank=2)  # no other name ends in ".2"
    save_peft(plain, tmp_path / "list")
    assert json.loads((tmp_path / "list" / "adapter_config.json").read_text())["target_modules"] == ["2"]


def tiny_llama() -> nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=32)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def test_modules_to_save_are_matched_by_name_ending_as_peft_matches_them(tmp_path) -> None:
    # "norm" saves model.norm and every *_layernorm: PEFT loads all of them, and so does lorakit.
    torch.manual_seed(0)
    base = tiny_llama()
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["norm"])
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_peft(copy.deepcopy(base), tmp_path).eval()
    assert "model.layers.1.post_attention_layernorm" in lorakit.info(ours).train_modules
    with torch.no_grad():
        torch.testing.assert_close(ours(GPT2_IDS).logits, theirs.eval()(GPT2_IDS).logits, rtol=0, atol=1e-6)


def test_a_tied_head_saved_with_ensure_weight_tying_loads(tmp_path) -> None:
    torch.manual_seed(0)
    gpt2 = tiny_gpt2()
    cfg = peft.LoraConfig(
        r=2, target_modules=["c_attn"], modules_to_save=["lm_head"], ensure_weight_tying=True
    )
    theirs = peft.get_peft_model(copy.deepcopy(gpt2), cfg)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_peft(copy.deepcopy(gpt2), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(GPT2_IDS).logits, theirs.eval()(GPT2_IDS).logits, rtol=0, atol=1e-6)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] + 1
    save_file(tensors, file)
    with pytest.raises(AdapterFileError, match="are one tied weight in the model, but the file gives them"):
        load_peft(copy.deepcopy(gpt2), tmp_path)


def test_effective_conv2d_is_refused_only_where_a_layer_has_a_tucker_core(tmp_path) -> None:
    torch.manual_seed(0)
    base = Net().eval()
    for name, targets in [("linear", ["fc"]), ("conv", ["conv"])]:
        cfg = peft.LoHaConfig(r=2, alpha=4, target_modules=targets, use_effective_conv2d=True)
        theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
        perturb(theirs)
        theirs.save_pretrained(tmp_path / name)
    ours = load_peft(copy.deepcopy(base), tmp_path / "linear").eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "linear").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS), rtol=0, atol=1e-6)
    with pytest.raises(AdapterFileError, match=r"conv\.hada_t1.*Tucker core"):
        load_peft(copy.deepcopy(base), tmp_path / "conv")


def test_a_qlora_adapter_exports_its_factors(tmp_path) -> None:
    torch.manual_seed(0)
    base = Net()
    ours = lorakit.quantize(copy.deepcopy(base))
    lorakit.apply(ours, "qlora", targets=["fc"], rank=4, alpha=8.0)
    perturb(ours)
    save_peft(ours, tmp_path)
    back = load_peft(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(back.fc.variant.A, ours.fc.variant.A, rtol=0, atol=0)
    torch.testing.assert_close(back.fc.variant.B, ours.fc.variant.B, rtol=0, atol=0)


def test_unreadable_peft_files_leave_the_model_untouched(tmp_path) -> None:
    base = Net()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["fc"]))
    theirs.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    good = load_file(weights)
    save_file({**good, "base_model.model.fc.lora_diag": torch.ones(2)}, weights)  # KaSA's extra tensor
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorakitError, match=r"holds \['lora_A.weight', 'lora_B.weight', 'lora_diag'\]"):
        load_peft(model, tmp_path)
    assert not hasattr(model, "lorakit") and not any(
        isinstance(m, lorakit.AdaptedLayer) for m in model.modules()
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    save_file({**good, "base_model.model.classifier.weight": torch.ones(5, 16)}, weights)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["classifier"]}))
    with pytest.raises(
        ValueError, match=r"saved classifier.weight \(5, 16\) does not fit this model \(shape \(2, 16\)\)"
    ):
        load_peft(model, tmp_path)
    assert not hasattr(model, "lorakit")


def test_resized_embeddings_peft_saved_are_loaded_into_the_base(tmp_path) -> None:
    torch.manual_seed(0)
    base = tiny_gpt2()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["wte", "c_attn"]))
    perturb(theirs)
    with torch.no_grad():  # as if the vocabulary had been re-trained: PEFT then saves the embedding too
        theirs.base_model.model.transformer.wte.base_layer.weight.add_(0.5)
    theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    assert "base_model.model.transformer.wte.base_layer.weight" in load_file(
        tmp_path / "adapter_model.safetensors"
    )
    ours = load_peft(copy.deepcopy(base), tmp_path).eval()
    assert lorakit.info(ours).train_modules == []
    with torch.no_grad():
        want = theirs.eval()(GPT2_IDS).logits
        assert (ours(GPT2_IDS).logits - want).abs().max() <= 1e-4
        assert (base(GPT2_IDS).logits - want).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("family", "heads"),
    [("Bert", ["classifier"]), ("Roberta", ["classifier.dense", "classifier.out_proj"])],  # a head of layers
)
def test_a_peft_sequence_classification_adapter_with_its_head(
    tmp_path, family: str, heads: list[str]
) -> None:
    config, model = (
        getattr(transformers, f"{family}Config"),
        getattr(transformers, f"{family}ForSequenceClassification"),
    )
    cfg = config(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, num_labels=3, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    base = model(cfg).eval()
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    theirs = peft.get_peft_model(copy.deepcopy(base), lora)
    perturb(theirs)  # the adapter and the classification head PEFT trains with it
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_peft(copy.deepcopy(base), tmp_path / "theirs").eval()
    assert lorakit.info(ours).train_modules == heads
    ids = torch.randint(3, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs.eval()(input_ids=ids).logits
        assert (want - base(input_ids=ids).logits).abs().max() > 1e-2
        assert (ours(input_ids=ids).logits - want).abs().max() <= 1e-5
        save_peft(ours, tmp_path / "ours")  # and back: lorakit reads what it writes
        again = load_peft(copy.deepcopy(base), tmp_path / "ours").eval()
        assert (again(input_ids=ids).logits - want).abs().max() <= 1e-5


PEFT_VARIANTS = [name for name, cls in lorakit.VARIANTS.items() if cls.peft is not None]


class Pair(nn.Module):
    """Two linear layers whose sizes factor (LoKr), 12 -> 16 -> 8."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("name", PEFT_VARIANTS)
def test_every_variant_with_a_peft_spec_round_trips_through_peft(tmp_path, name: str) -> None:
    torch.manual_seed(0)
    base = Pair().eval()
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
    config: dict = {"rank": 4, "alpha": 8.0, "dropout": 0.0}
    fields = {f.name for f in dataclasses.fields(lorakit.get_variant(name).config_class)}
    if "base_quantization" in fields:  # PEFT's side gets the dense base: compare against the same base
        config["base_quantization"] = None
    if name == "vera":  # no alpha / r scale: an alpha is refused
        del config["alpha"]
    ours = lorakit.apply(copy.deepcopy(base), name, targets=["fc1", "fc2"], **config)
    perturb(ours)
    ours.eval()
    save_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    back = load_peft(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        out = ours(x)
        assert (out - base(x)).abs().max() > 1e-2  # the adapter changes the output
        assert (theirs(x) - out).abs().max() <= 1e-5
        assert (back(x) - out).abs().max() <= 1e-5


def test_a_subclass_does_not_inherit_its_parents_peft_spec(tmp_path, monkeypatch) -> None:
    from lorakit.variants.lora import LoRA

    class ScaledLoRA(LoRA):
        """A toy method: LoRA's output scaled, which PEFT's LoRA format cannot say."""

        name = "scaled_lora"

        def forward(self, x: torch.Tensor, y: torch.Tensor, base) -> torch.Tensor:
            return 3.0 * super().forward(x, y, base)

    monkeypatch.setitem(lorakit.VARIANTS, "scaled_lora", ScaledLoRA)
    assert ScaledLoRA.peft is None and LoRA.peft is not None
    model = lorakit.apply(MLP(), "scaled_lora", targets=["fc1"], rank=4)
    with pytest.raises(LorakitError, match="variant 'scaled_lora' has no PEFT equivalent"):
        save_peft(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


# --- layers PEFT computes differently from lorakit: refused both ways ---------------------------------------

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
LORA_FAMILY = [n for n in PEFT_VARIANTS if lorakit.VARIANTS[n].peft.peft_type == "LORA" and n != "qlora"]


def one_conv(dims: int = 2, cin: int = 4, cout: int = 6, kernel: int | tuple = 3, **options) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(CONV[dims](cin, cout, kernel, **options)).eval()


def conv_input(dims: int, cin: int = 4) -> torch.Tensor:
    return torch.randn(2, cin, *[7] * dims, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
@pytest.mark.parametrize("variant", [*LORA_FAMILY, "loha", "lokr"])
def test_save_peft_refuses_a_convolution_not_padded_with_zeros(tmp_path, variant: str, mode: str) -> None:
    # PEFT pads the adapter's input with zeros in every method: its output would differ by O(1) at the borders
    model = lorakit.apply(one_conv(padding=1, padding_mode=mode), variant, targets=["0"], rank=1, dropout=0.0)
    peft_type = lorakit.VARIANTS[variant].peft.peft_type
    message = f"0: the convolution pads with padding_mode='{mode}', but PEFT's {peft_type} pads the adapter's"
    with pytest.raises(LorakitError, match=re.escape(message) + ".* Use lorakit.save"):
        save_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("variant", LORA_FAMILY)
def test_save_peft_refuses_lora_on_a_dilated_convolution(tmp_path, variant: str, dims: int) -> None:
    # PEFT's lora_A has no dilation: PEFT fails with a size mismatch in its forward
    model = lorakit.apply(one_conv(dims, padding=2, dilation=2), variant, targets=["0"], rank=1, dropout=0.0)
    message = f"0: the convolution has dilation={(2,) * dims}, but PEFT's LORA builds its lora_A convolution"
    with pytest.raises(LorakitError, match=re.escape(message)):
        save_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_save_peft_refuses_lokr_on_a_conv1d_with_a_whole_w2(tmp_path) -> None:
    # Conv1d(4 -> 6): W1 (2, 2), W2 (3, 2, 3) whole at rank 2 (>= max(3, 2) / 2); PEFT's output was ~2.4 off
    model = lorakit.apply(one_conv(1), "lokr", targets=["0"], rank=2, dropout=0.0)
    message = "0: LoKr on a Conv1d with W2 stored whole as (3, 2, 3): PEFT's make_kron"
    with pytest.raises(LorakitError, match=re.escape(message) + ".*a rank below 1.5 keeps W2 as two factors"):
        save_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


NEAREST_ACCEPTED = [  # the closest layers to the refused ones that PEFT computes as lorakit does
    ("lora", 2, {"padding": 0, "padding_mode": "reflect"}, {}),  # no padding: the mode is never used
    ("dora", 1, {"padding": 0, "padding_mode": "circular"}, {}),
    # dilated only where the kernel is 1 wide
    ("lora", 2, {"kernel": (3, 1), "padding": (1, 0), "dilation": (1, 2)}, {}),
    ("loha", 2, {"padding": 2, "dilation": 2}, {}),  # PEFT's LoHa and LoKr convolve with the base's dilation
    ("lokr", 2, {"padding": 2, "dilation": 2}, {"rank": 2}),
    ("loha", 1, {"padding": 2, "dilation": 2}, {}),
    ("lora", 2, {"kernel": 4, "padding": "same"}, {}),
    ("dora", 3, {"padding": "same"}, {}),
    ("lora", 3, {"padding": 1, "stride": 2}, {}),
    ("lokr", 1, {"padding": 1}, {"rank": 1}),  # Conv1d(4 -> 6) with W2 as two factors (1 < 1.5)
    ("lokr", 1, {"cin": 5, "cout": 7, "padding": 1}, {"rank": 4}),  # W2 whole, W1 (1, 1): a trivial product
    ("loha", 2, {"padding": 1, "groups": 2}, {}),  # grouped: both read the weight as (out, in / groups, k)
    ("loha", 1, {"cout": 8, "padding": 1, "groups": 4}, {}),  # depthwise
    ("lokr", 2, {"padding": 1, "groups": 2}, {"rank": 2}),
]
NEAREST_IDS = [
    "lora-reflect-unpadded",
    "dora-circular-unpadded",
    "lora-dilated-1-wide",
    "loha-dilated",
    "lokr-dilated",
    "loha-conv1d-dilated",
    "lora-same-even",
    "dora-conv3d-same",
    "lora-conv3d-stride",
    "lokr-conv1d-low-rank-w2",
    "lokr-conv1d-trivial-kron",
    "loha-grouped",
    "loha-conv1d-depthwise",
    "lokr-grouped",
]


@pytest.mark.filterwarnings("ignore:LoKr on a")  # 5 and 7 factor only as (1, n)
@pytest.mark.parametrize(("variant", "dims", "layer", "options"), NEAREST_ACCEPTED, ids=NEAREST_IDS)
def test_the_nearest_convolutions_still_round_trip(tmp_path, variant: str, dims: int, layer: dict,
                                                   options: dict) -> None:  # fmt: skip
    x = conv_input(dims, layer.get("cin", 4))
    options = {"rank": 2, "dropout": 0.0, **options}
    ours = lorakit.apply(one_conv(dims, **layer), variant, targets=["0"], **options)
    perturb(ours)
    save_peft(ours.eval(), tmp_path)
    theirs = peft.PeftModel.from_pretrained(one_conv(dims, **layer), tmp_path).eval()
    back = load_peft(one_conv(dims, **layer), tmp_path).eval()
    with torch.no_grad():
        out = ours(x)
        assert (out - one_conv(dims, **layer)(x)).abs().max() > 1e-2
        assert (theirs(x) - out).abs().max() <= 1e-5
        assert (back(x) - out).abs().max() <= 1e-6


PEFT_REFUSED = [
    (lambda: peft.LoraConfig(r=2, target_modules=["0"]), 2, {"padding": 1, "padding_mode": "reflect"},
     "the convolution pads with padding_mode='reflect', but PEFT's LORA pads"),
    (lambda: peft.LoraConfig(r=2, target_modules=["0"], use_dora=True), 1,
     {"padding": 1, "padding_mode": "circular"},
     "the convolution pads with padding_mode='circular', but PEFT's LORA pads"),
    (lambda: peft.LoHaConfig(r=2, target_modules=["0"]), 2, {"padding": "same", "padding_mode": "replicate"},
     "the convolution pads with padding_mode='replicate', but PEFT's LOHA pads"),
    (lambda: peft.LoKrConfig(r=1, target_modules=["0"]), 2, {"padding": 1, "padding_mode": "reflect"},
     "the convolution pads with padding_mode='reflect', but PEFT's LOKR pads"),
    (lambda: peft.LoraConfig(r=2, target_modules=["0"]), 3, {"padding": 2, "dilation": 2},
     "the convolution has dilation=(2, 2, 2), but PEFT's LORA builds its lora_A convolution without"),
    (lambda: peft.LoKrConfig(r=2, target_modules=["0"]), 1, {"padding": 1},
     "LoKr on a Conv1d with W2 stored whole as (3, 2, 3)"),
    (lambda: peft.LoKrConfig(r=2, target_modules=["0"]), 1, {"padding": 1, "groups": 2},  # W1 (2, 1)
     "LoKr on a Conv1d with W2 stored whole as (3, 2, 3)"),
]  # fmt: skip
PEFT_REFUSED_IDS = [
    "lora-reflect",
    "dora-circular",
    "loha-replicate-same",
    "lokr-reflect",
    "lora-conv3d-dilated",
    "lokr-conv1d-whole-w2",
    "lokr-conv1d-grouped-whole-w2",
]


@pytest.mark.parametrize(("config", "dims", "layer", "message"), PEFT_REFUSED, ids=PEFT_REFUSED_IDS)
def test_load_peft_refuses_adapters_peft_computes_differently(tmp_path, config, dims: int, layer: dict,
                                                              message: str) -> None:  # fmt: skip
    theirs = peft.get_peft_model(one_conv(dims, **layer), config())
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    model = one_conv(dims, **layer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=f"{re.escape(str(tmp_path))}: 0: {re.escape(message)}"):
        load_peft(model, tmp_path)
    assert not hasattr(model, "lorakit")
    assert not any(isinstance(m, lorakit.AdaptedLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


PEFT_ACCEPTED = [
    (lambda: peft.LoraConfig(r=2, target_modules=["0"]), 2, {"padding": 0, "padding_mode": "reflect"}),
    (lambda: peft.LoHaConfig(r=2, target_modules=["0"]), 2, {"padding": 2, "dilation": 2}),
    (lambda: peft.LoKrConfig(r=1, target_modules=["0"]), 1, {"padding": 1}),  # W2 as two factors
    (lambda: peft.LoKrConfig(r=2, target_modules=["0"]), 2, {"padding": 1, "groups": 2}),  # Conv2d: 4-D W2
    (lambda: peft.LoHaConfig(r=2, target_modules=["0"]), 1, {"padding": 1, "groups": 2}),
]
PEFT_ACCEPTED_IDS = [
    "lora-reflect-unpadded",
    "loha-dilated",
    "lokr-conv1d-low-rank-w2",
    "lokr-grouped",
    "loha-conv1d-grouped",
]


@pytest.mark.parametrize(("config", "dims", "layer"), PEFT_ACCEPTED, ids=PEFT_ACCEPTED_IDS)
def test_the_nearest_peft_adapters_still_load(tmp_path, config, dims: int, layer: dict) -> None:
    x = conv_input(dims)
    theirs = peft.get_peft_model(one_conv(dims, **layer), config())
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_peft(one_conv(dims, **layer), tmp_path).eval()
    with torch.no_grad():
        want = theirs.eval()(x)
        assert (want - one_conv(dims, **layer)(x)).abs().max() > 1e-2
        assert (ours(x) - want).abs().max() <= 1e-5


def test_a_lokr_factor_peft_splits_the_other_way_is_refused_with_the_split(tmp_path) -> None:
    base = Wide()
    cfg = peft.LoKrConfig(r=2, alpha=4, target_modules=["fc"], decompose_factor=8)  # 48: PEFT (8, 6)
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path / "8")
    message = "fc: with decompose_factor 8 PEFT splits 48 as (8, 6) and lorakit as (6, 8)"
    with pytest.raises(AdapterFileError, match=re.escape(message)):
        load_peft(copy.deepcopy(base), tmp_path / "8")
    cfg = peft.LoKrConfig(r=2, alpha=4, target_modules=["fc"], decompose_factor=6)  # both split 48 as (6, 8)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "6")
    ours = load_peft(copy.deepcopy(base), tmp_path / "6").eval()
    with torch.no_grad():
        want = theirs.eval()(WIDE_X)
        assert (want - base(WIDE_X)).abs().max() > 1e-2 and (ours(WIDE_X) - want).abs().max() <= 1e-5


def tiny_qwen3_moe() -> nn.Module:
    """A MoE family transformers v5 fused: its first block is a dense MLP with gate/up/down projections."""
    cfg = transformers.Qwen3MoeConfig(hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=8, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0],
                                      vocab_size=32)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_export_refuses_moe_targets_peft_would_read_as_fused_experts(tmp_path) -> None:
    # PEFT's LoRA loader renames gate/up/down_proj targets of such a family to the fused experts' weights,
    # so the dense block's adapter would be dropped without an error (logits off by ~0.1).
    torch.manual_seed(0)
    model = tiny_qwen3_moe()
    lorakit.apply(model, "lora", targets="all-linear", rank=2)
    with pytest.raises(
        LorakitError, match=r"model\.layers\.0\.mlp\.gate_proj: PEFT reads .* qwen3_moe .* out"
    ):
        save_peft(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # Attention targets keep their names in PEFT, so an export of those loads with the same logits.
    torch.manual_seed(0)
    base = tiny_qwen3_moe()
    ours = lorakit.apply(copy.deepcopy(base), "lora", targets=["q_proj", "v_proj"], rank=2)
    perturb(ours)
    save_peft(ours, tmp_path / "attention")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "attention").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(GPT2_IDS).logits, ours(GPT2_IDS).logits, rtol=0, atol=1e-5)


def test_an_export_writes_every_module_peft_saves_for_a_trained_head(tmp_path) -> None:
    # PEFT takes modules_to_save=["classifier"] as every module whose name ends so: DistilBERT's
    # pre_classifier too, which it then reads from the file.
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(
        vocab_size=32, dim=16, n_layers=1, n_heads=2, hidden_dim=32, num_labels=2
    )
    base = transformers.DistilBertForSequenceClassification(cfg).eval()
    ours = lorakit.apply(copy.deepcopy(base), "lora", targets=["q_lin"], rank=2, train_modules=["classifier"])
    perturb(ours)
    save_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(GPT2_IDS).logits, ours.eval()(GPT2_IDS).logits, rtol=0, atol=1e-6)
