"""Misuse of the public API on models of every kind: each is refused up front with a lorakit error that names
the problem and the fix, and leaves the model as it was; nothing runs into a deep torch error or silently
computes something else."""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
from layer_zoo import MLP, Holder, perturb
from torch import nn

import lorakit
from lorakit.adapters.api import TargetError
from lorakit.common.errors import AdapterStateError, LorakitError, SettingError
from lorakit.core.config import ConfigError


def _adapted(**config) -> MLP:
    torch.manual_seed(0)
    model = lorakit.apply(MLP(), "lora", targets=["fc1", "fc2"], rank=2, **config)
    perturb(model)
    return model


@pytest.mark.parametrize(
    "call",
    [
        lambda m: lorakit.info(m),
        lambda m: lorakit.merge(m),
        lambda m: lorakit.unmerge(m),
        lambda m: lorakit.param_groups(m, 1e-3),
        lambda m: lorakit.save(m, "/tmp/never-written"),
        lambda m: lorakit.set_rank(m, 2),
        lambda m: lorakit.disabled(m).__enter__(),
    ],
)
def test_calls_that_need_an_adapter_refuse_a_plain_model(call) -> None:
    with pytest.raises(AdapterStateError, match="no lorakit adapter"):
        call(MLP())


def test_merge_with_unload_gives_back_the_model_as_it_trained_before_apply() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model[2].bias.requires_grad_(False)  # the user's own choice, kept
    lorakit.apply(model, "lora", targets=["0"], rank=2, train_modules=["2"])
    plain = lorakit.merge(model)
    assert [p.requires_grad for p in plain.parameters()] == [True, True, True, False]


def test_disabled_after_merge_with_unload_is_refused_not_the_merged_model() -> None:
    model = lorakit.merge(_adapted())  # a plain model now, holding the adapter in its weights
    with pytest.raises(AdapterStateError, match="no lorakit adapter"), lorakit.disabled(model):
        pass
    merged = lorakit.merge(_adapted(), unload=False)
    with pytest.raises(AdapterStateError, match="unmerge"), lorakit.disabled(merged):
        pass


def test_a_model_holding_adapters_is_not_wrapped_twice() -> None:
    with pytest.raises(AdapterStateError, match="already has a lorakit adapter"):
        lorakit.apply(_adapted(), "lora", targets=["fc1"])
    inner = nn.Sequential(_adapted())
    del inner[0].lorakit  # the adapter's layers remain: wrapping them again would stack two adapters
    with pytest.raises(AdapterStateError, match=r"0\.fc1 already holds a lorakit adapter"):
        lorakit.apply(inner, "lora", rank=2)
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["fc1"], r=2))
    with pytest.raises(AdapterStateError, match="holds a PEFT adapter layer"):
        lorakit.apply(wrapped, "lora", rank=2)


@pytest.mark.parametrize(("variant", "message"), [(None, "NoneType"), (3, "int")])
def test_a_variant_that_is_neither_a_name_nor_a_config_is_a_config_error(variant, message) -> None:
    with pytest.raises(ConfigError, match=f"got {message}"):
        lorakit.apply(MLP(), variant)


def test_a_non_module_is_refused() -> None:
    with pytest.raises(SettingError, match="torch.nn.Module, got str"):
        lorakit.apply("bert", "lora")


@pytest.mark.parametrize("alpha", [math.inf, -math.inf, math.nan, 0.0, -1.0])
def test_alpha_must_be_positive_and_finite(alpha) -> None:
    for name in ("lora", "loha", "dora"):
        with pytest.raises(ConfigError, match="'alpha'"):
            lorakit.apply(MLP(), name, targets=["fc1"], rank=2, alpha=alpha)


@pytest.mark.parametrize("train", [["fc1"], [""]])
def test_a_module_cannot_be_both_adapted_and_trained_in_full(train) -> None:
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(4, 4))
    model.add_module("fc2", nn.Linear(4, 2))
    if train == [""]:  # a train module that contains a target
        model = nn.Sequential()
        model.add_module("block", nn.Sequential())
        model.block.add_module("fc1", nn.Linear(4, 4))
        train = ["block"]
    with pytest.raises(TargetError, match="overlaps the adapted layer"):
        lorakit.apply(model, "lora", targets=["fc1"], rank=2, train_modules=train)
    assert not hasattr(model, "lorakit") and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("lr", "wd"), [(0, 0.0), (-1e-3, 0.0), (math.nan, 0.0), (math.inf, 0.0), ("1e-3", 0.0), (1e-3, -0.1)]
)
def test_param_groups_refuse_rates_an_optimizer_would_take_silently(lr, wd) -> None:
    with pytest.raises(SettingError):
        lorakit.param_groups(_adapted(), lr, wd)


class Tied(nn.Module):
    """Two layers holding one weight tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("targets", [["a"], ["a", "b"]])
@pytest.mark.parametrize("unload", [True, False])
def test_merging_into_a_tied_weight_is_refused_and_changes_nothing(targets, unload) -> None:
    torch.manual_seed(0)
    model = lorakit.apply(Tied(), "lora", targets=targets, rank=2)
    perturb(model)
    model.eval()
    x = torch.randn(3, 8)
    before, weight = model(x), model.a.base_layer.weight.clone()
    with pytest.raises(AdapterStateError, match=r"cannot merge into a: its weight is shared with b"):
        lorakit.merge(model, unload=unload)
    assert torch.equal(model.a.base_layer.weight, weight) and torch.equal(model(x), before)


def test_gpt2_tied_input_embedding_is_adapted_but_not_merged() -> None:
    from conftest import tiny_gpt2

    model = lorakit.apply(tiny_gpt2(), "lora", targets=["wte"], rank=2)
    with pytest.raises(AdapterStateError, match="transformer.wte: its weight is shared with lm_head.weight"):
        lorakit.merge(model)


def test_an_untied_copy_merges_exactly() -> None:
    torch.manual_seed(0)
    base = Tied()
    base.b.weight = nn.Parameter(base.a.weight.detach().clone())
    model = lorakit.apply(base, "lora", targets=["a", "b"], rank=2)
    perturb(model)
    model.eval()
    x = torch.randn(3, 8)
    expected = model(x)
    torch.testing.assert_close(lorakit.merge(model)(x), expected, atol=1e-5, rtol=1e-5)


def _weight_normed(layer: nn.Module, legacy: bool) -> nn.Module:
    dim = 2 if isinstance(layer, nn.Conv1d) else 0
    norm = nn.utils.weight_norm if legacy else nn.utils.parametrizations.weight_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the older hook is deprecated
        return norm(layer, dim=dim)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(
    ("variant", "layer", "x"),
    [
        ("lora", lambda: nn.Linear(8, 8), (4, 8)),
        ("dora", lambda: nn.Linear(8, 8), (4, 8)),
        ("loha", lambda: nn.Conv1d(8, 8, 3, padding=1, groups=2), (2, 8, 5)),  # as wav2vec2's positional conv
    ],
)
def test_a_weight_normed_layer_merges_through_its_magnitude_and_direction(variant, layer, x, legacy) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_weight_normed(layer(), legacy))
    x = torch.randn(x)
    base = model(x).detach()
    lorakit.apply(model, variant, targets=["0"], rank=2, dropout=0.0)
    perturb(model)
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - base).abs().max() > 0.1
        lorakit.merge(model, unload=False)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)  # a plain copy was lost here
        lorakit.unmerge(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
        with lorakit.disabled(model):
            torch.testing.assert_close(model(x), base, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lorakit.merge(model)(x), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "dora", "loha", "lokr", "vera"])
def test_a_layer_under_the_older_weight_norm_hook_trains_for_several_steps(variant) -> None:
    # The hook leaves ``weight`` holding the graph of the forward that computed it (here: from before the
    # base froze): read as it stood, the second backward ran through a freed graph.
    torch.manual_seed(0)
    model = nn.Sequential(_weight_normed(nn.Linear(8, 8), legacy=True))
    lorakit.apply(model, variant, targets=["0"], rank=2, dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    x = torch.randn(4, 8)
    losses = []
    for _ in range(3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("variant", ["lora", "dora", "loha"])
def test_a_weight_recomputed_by_the_older_spectral_norm_hook_is_refused(variant) -> None:
    # Its ``weight`` is the raw one until the first forward (DoRA started 15 off), and a merge copied into
    # it was recomputed away at the next forward, silently.
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 6)))
    with pytest.raises(lorakit.TargetError, match=r"a forward hook recomputes \(hooks: SpectralNorm\).*"
                       r"parametrizations.spectral_norm"):  # fmt: skip
        lorakit.apply(model, variant, targets=["0"], rank=2)
    assert type(model[0]) is nn.Linear and model[0].weight_orig.requires_grad


def test_a_parametrization_that_cannot_take_the_merged_weight_is_refused_and_nothing_merges() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8))).eval()
    model = lorakit.apply(base, "lora", targets=["0", "1"], rank=2)
    perturb(model)
    model.eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        before, plain = model(x), model[0].base_layer.weight.clone()
        refused = r"cannot merge into 1: .*parametrization \(_SpectralNorm\)"
        with pytest.raises(AdapterStateError, match=refused):
            lorakit.merge(model, unload=True)
        assert not model[0].merged  # taken back out (to the rounding of unmerge)
        torch.testing.assert_close(model[0].base_layer.weight, plain, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(x), before)
        assert isinstance(model[1], lorakit.AdaptedLayer) and lorakit.info(model).variant == "lora"


class _SameLinear(nn.Linear):  # as Falcon's: the op written out by hand
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


class _ScaledEmbedding(nn.Embedding):  # as Gemma's word embeddings
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 4.0


class _Router(nn.Linear):  # as a mixture of experts' router: scores, not a tensor
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(super().forward(x), 1)


class _Subclassed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.same, self.router = _ScaledEmbedding(10, 8), _SameLinear(8, 8), _Router(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.same(self.emb(ids))


def test_a_subclass_computing_its_kinds_op_is_adapted_and_merges_exactly() -> None:
    torch.manual_seed(0)
    model = lorakit.apply(_Subclassed(), "lora", targets=["same"], rank=2).eval()
    perturb(model)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        adapted = model(ids)
        torch.testing.assert_close(lorakit.merge(model)(ids), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("emb", r"_ScaledEmbedding has a forward of its own .* does not move with its weight as the op's"),
        ("router", r"_Router has a forward of its own .* returns topk, not a tensor"),
    ],
)
def test_a_subclass_computing_something_else_is_refused_or_left_out(target, why) -> None:
    with pytest.raises(TargetError, match=rf"match {target}, which lorakit cannot adapt: {why}"):
        lorakit.apply(_Subclassed(), "lora", targets=[target], rank=2)
    with pytest.warns(UserWarning, match=r"'all-linear' leaves out router: _Router has a forward of its own"):
        model = lorakit.apply(_Subclassed(), "lora", targets="all-linear", rank=2)
    assert [n for n, _ in lorakit.adapters.api.adapted_layers(model)] == ["same"]


def test_a_subclass_is_probed_again_once_its_weights_are_there() -> None:
    with torch.device("meta"):
        model = _Subclassed()
    with pytest.raises(LorakitError):  # a meta model: nothing to run, refused where it is applied
        lorakit.apply(model, "lora", targets=["emb"], rank=2)
    model.to_empty(device="cpu")
    for p in model.parameters():
        nn.init.normal_(p)
    with pytest.raises(TargetError, match="_ScaledEmbedding has a forward of its own"):
        lorakit.apply(model, "lora", targets=["emb"], rank=2)


@pytest.mark.parametrize("how", ["hook", "pre_hook", "instance_forward"])
def test_a_layer_whose_hooks_or_own_forward_change_its_output_is_refused(how) -> None:
    """A forward hook, a pre-hook or a forward set on the instance (as accelerate's hooks do) runs in the
    layer's call: one that scales the output would be skipped by an adapter computing the layer's op, and
    a merge would move the output by another amount than the adapter did. Such a layer is refused."""
    torch.manual_seed(0)
    model = MLP()
    layer = model.fc1
    if how == "hook":
        layer.register_forward_hook(lambda module, args, out: 2 * out)
    elif how == "pre_hook":
        layer.register_forward_pre_hook(lambda module, args: (2 * args[0],))
    else:
        layer.forward = types.MethodType(lambda self, x: 2 * nn.Linear.forward(self, x), layer)
    why = "has a forward of its own" if how == "instance_forward" else r"has forward hooks \(<lambda>\)"
    with pytest.raises(TargetError, match=rf"match fc1, which lorakit cannot adapt: Linear {why}"):
        lorakit.apply(model, "lora", targets=["fc1"], rank=2)


@pytest.mark.parametrize("name", ["lora", "dora", "loha"])
def test_a_layer_whose_hooks_only_watch_it_is_adapted_and_its_hooks_run(name) -> None:
    """A hook that reads the output, and a forward set on the instance that calls the class's: adapted,
    the layer called (the hooks see every forward), and the merge exact."""
    torch.manual_seed(0)
    model = MLP().eval()
    seen: list[torch.Size] = []
    model.fc1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    original = model.fc2.forward
    model.fc2.forward = lambda x: original(x)
    lorakit.apply(model, name, targets=["fc1", "fc2"], rank=2, dropout=0.0)
    perturb(model)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        calls = len(seen)
        adapted = model(x)
        assert len(seen) == calls + 1
        torch.testing.assert_close(lorakit.merge(model, unload=False)(x), adapted, atol=1e-5, rtol=1e-5)


def test_training_a_merged_model_is_refused_before_any_step() -> None:
    from lorakit.train.loop import TrainConfig, train

    model = lorakit.merge(_adapted(), unload=False)
    with pytest.raises(AdapterStateError, match="unmerge"):
        train(model, iter([]), TrainConfig(steps=1, progress=False))


def test_capability_errors_are_lorakit_errors() -> None:
    assert issubclass(lorakit.CapabilityError, LorakitError)


# --- targets ----------------------------------------------------------------------------------------------
def test_a_targets_entry_matching_nothing_is_warned_about_and_the_others_adapted() -> None:
    model = MLP()
    with pytest.warns(UserWarning, match=r"no layer matches targets \['fc3'\]. Did you mean"):
        lorakit.apply(model, "lora", targets=["fc1", "fc3"], rank=2)
    assert [name for name, _ in lorakit.adapted_layers(model)] == ["fc1"]
    model = MLP()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no entry matches: the one error says it, no warning before it
        with pytest.raises(TargetError, match=r"no layer matches targets \['fc3', 'fc4'\]"):
            lorakit.apply(model, "lora", targets=["fc3", "fc4"], rank=2)
    assert not hasattr(model, "lorakit")
    with pytest.raises(TargetError, match="targets is empty"):
        lorakit.apply(model, "lora", targets=[], rank=2)


def test_targets_naming_a_layer_lorakit_cannot_adapt_say_why() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(
        TargetError, match=r"match 1, which lorakit cannot adapt: LayerNorm is not a layer kind"
    ):
        lorakit.apply(model, "lora", targets=["1"], rank=2)
    with pytest.raises(TargetError, match="max_norm=1.0 rescales its rows in place"):
        lorakit.apply(Holder(nn.Embedding(10, 4, max_norm=1.0)), "lora", targets=["layer"], rank=2)


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_convolutions_are_refused_by_factor_variants_and_exact_in_the_others(groups) -> None:
    def model() -> Holder:
        torch.manual_seed(0)
        return Holder(nn.Conv2d(4, 8, 3, groups=groups, padding=1))

    for name in ("lora", "dora", "vera", "dylora"):
        with pytest.raises(TargetError, match=r"cannot adapt layer \(conv2d_grouped\)"):
            lorakit.apply(model(), name, targets=["layer"], rank=1)
    x = torch.randn(2, 4, 6, 6)
    for name in ("loha", "lokr"):
        adapted = lorakit.apply(model(), name, targets=["layer"], rank=1)
        perturb(adapted)
        adapted.eval()
        expected = adapted(x)
        torch.testing.assert_close(lorakit.merge(adapted)(x), expected, atol=1e-5, rtol=1e-5)


# --- saving and loading -----------------------------------------------------------------------------------
@pytest.mark.parametrize("save", [lorakit.save, lorakit.save_peft])
def test_saving_never_replaces_a_file_already_there(tmp_path, save) -> None:
    from lorakit.common.errors import OutputExistsError

    names = {lorakit.save: "adapter.safetensors", lorakit.save_peft: "adapter_model.safetensors"}
    (tmp_path / names[save]).write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match=names[save]):
        save(_adapted(), tmp_path)
    assert (tmp_path / names[save]).read_bytes() == b"mine"
    assert issubclass(OutputExistsError, FileExistsError)
    save(_adapted(), tmp_path, overwrite=True)  # replaced on purpose
    assert (tmp_path / names[save]).read_bytes() != b"mine"


@pytest.mark.parametrize("save", [lorakit.save, lorakit.save_peft])
def test_saving_where_no_directory_can_be_is_an_adapter_file_error(tmp_path, save) -> None:
    from lorakit.adapters.io import AdapterFileError

    (tmp_path / "file").write_text("x")
    for where, message in [
        (tmp_path / "file", "is a file, not a directory"),
        (tmp_path / "file" / "sub", "is a file, not a directory"),
        ("/proc/lorakit-adapter", "cannot write to /proc/lorakit-adapter"),
    ]:
        with pytest.raises(AdapterFileError, match=message):
            save(_adapted(), where)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_an_adapter_loads_onto_its_base_in_another_dtype(tmp_path, dtype) -> None:
    """Trained on a float32 base, loaded onto the same base in another dtype (deployment in bfloat16): the
    exact fingerprint differs, the sampled weights agree to the cast's rounding, so it loads; a different
    base in that dtype is still refused."""
    from lorakit.adapters.io import AdapterFileError

    trained = _adapted().eval()
    lorakit.save(trained, tmp_path)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    loaded = lorakit.load(MLP().to(dtype), tmp_path).eval()
    state = dict(lorakit.adapted_layers(loaded))["fc1"].variant.state_dict()
    for key, want in dict(lorakit.adapted_layers(trained))["fc1"].variant.state_dict().items():
        torch.testing.assert_close(state[key], want.to(state[key].dtype))  # the trained tensors
    tolerance = {torch.bfloat16: 1e-1, torch.float16: 1e-2, torch.float64: 1e-5}[dtype]  # the base's rounding
    torch.testing.assert_close(loaded(x.to(dtype)).float(), trained(x), atol=tolerance, rtol=tolerance)
    torch.manual_seed(1)
    other = MLP().to(dtype)
    with pytest.raises(AdapterFileError, match="differ by more than that rounding"):
        lorakit.load(other, tmp_path)
    assert not hasattr(other, "lorakit")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_model_cast_after_apply_saves_an_adapter_that_loads_onto_its_base_in_either_dtype(
    tmp_path, dtype
) -> None:
    """Applied on the float32 base, cast, then saved: the file records the dtype its fingerprint was taken
    in, so the base in the cast's dtype is recognised by its sampled weights, and the float32 base by its
    fingerprint."""
    trained = _adapted().eval().to(dtype)
    lorakit.save(trained, tmp_path)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    for base_dtype in (torch.float32, dtype):
        torch.manual_seed(0)
        loaded = lorakit.load(MLP().to(base_dtype), tmp_path).eval().to(dtype)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x.to(dtype)), trained(x.to(dtype)))


def test_an_adapter_is_refused_by_its_base_moved_beyond_rounding(tmp_path) -> None:
    from lorakit.adapters.io import AdapterFileError

    lorakit.save(_adapted(), tmp_path)
    torch.manual_seed(0)
    moved = MLP()
    with torch.no_grad():
        moved.fc1.weight.mul_(1.05)  # 5%: far beyond bfloat16's rounding (0.4%)
    with pytest.raises(AdapterFileError, match="differ by more than that rounding"):
        lorakit.load(moved.to(torch.bfloat16), tmp_path)
    torch.manual_seed(0)
    with pytest.raises(AdapterFileError, match="different base model"):
        lorakit.load(moved.float(), tmp_path)  # same dtype: the exact fingerprint decides


def test_a_qlora_adapter_on_its_base_in_another_dtype_says_the_4bit_codes_must_match(tmp_path) -> None:
    from lorakit.adapters.io import AdapterFileError

    torch.manual_seed(0)
    lorakit.save(lorakit.apply(MLP(), "qlora", targets=["fc1", "fc2"], rank=2), tmp_path)
    torch.manual_seed(0)
    lorakit.load(MLP(), tmp_path)  # the same base, the same dtype: the same codes
    torch.manual_seed(0)
    other = MLP().to(torch.bfloat16)
    with pytest.raises(
        AdapterFileError, match="a quantised base whose codes must match exactly.*in the dtype"
    ):
        lorakit.load(other, tmp_path)
    assert not hasattr(other, "lorakit")


def test_saved_tensors_the_adapter_has_no_place_for_are_refused(tmp_path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    from lorakit.adapters.io import AdapterFileError, file_sha256

    lorakit.save(_adapted(), tmp_path)
    weights = tmp_path / "adapter.safetensors"
    tensors = load_file(weights)
    tensors["fc1.extra"] = torch.zeros(2)  # a consistent file (checksum recorded) from another adapter
    save_file(tensors, weights)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    meta["weights_sha256"] = file_sha256(weights)
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    base = MLP()
    with pytest.raises(AdapterFileError, match=r"has no place for \(fc1.extra\)"):
        lorakit.load(base, tmp_path)
    assert not hasattr(base, "lorakit")


# --- training ---------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """12 -> 20 -> 3 with a cross-entropy loss, called as ``model(x=..., labels=...)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(12, 20), nn.Linear(20, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.fc2(torch.relu(self.fc1(x)))
        return logits if labels is None else nn.functional.cross_entropy(logits, labels)


def _batches(count: int | None = None, **change):
    gen = torch.Generator().manual_seed(0)
    made = 0
    while count is None or made < count:
        made += 1
        batch = {"x": torch.randn(4, 12, generator=gen), "labels": torch.randint(0, 3, (4,), generator=gen)}
        for key, value in change.items():
            if value is None:
                del batch[key]
            else:
                batch[key] = value
        yield batch


def _train(batches, **settings):
    from lorakit.train.loop import TrainConfig, train

    model = lorakit.apply(Classifier(), "lora", targets=["fc1"], rank=2)
    return train(model, batches, TrainConfig(**{"steps": 3, "progress": False, **settings}))


@pytest.mark.parametrize(
    ("batches", "message"),
    [
        (lambda: iter([]), "the training batches ran out at step 1"),
        (lambda: _batches(2), "the training batches ran out at step 3"),
        (lambda: [{"x": torch.zeros(4, 12)}], "batches must be an iterator of dicts"),
        (lambda: iter([(torch.zeros(4, 12), torch.zeros(4))]), "each batch must be a dict"),
        (
            lambda: _batches(labels=torch.zeros(4, 2, dtype=torch.long)),
            r"labels \(4, 2\) int64.*RuntimeError",
        ),
        (lambda: _batches(labels=torch.full((4,), 7)), "IndexError: Target 7 is out of bounds"),
        (lambda: _batches(labels=torch.zeros(4)), r"labels \(4,\) float32"),
        (lambda: _batches(x=torch.zeros(4, 13)), r"x \(4, 13\) float32"),
        (lambda: _batches(extra=torch.zeros(1)), "unexpected keyword argument 'extra'"),
        (lambda: _batches(labels=None), r"gave a tensor of shape \(4, 3\) as the loss.*include labels"),
    ],
)
def test_batches_that_do_not_fit_the_model_are_a_batch_error(batches, message) -> None:
    from lorakit.engine.gradients import BatchError

    with pytest.raises(BatchError, match=message):
        _train(batches())


def test_train_settings_are_type_checked() -> None:
    from lorakit.train.loop import TrainConfig, train

    assert TrainConfig(steps="3", lr="1e-3").steps == 3  # numbers given as text are read as numbers
    for bad in ({"steps": 2.5}, {"lr": "fast"}, {"progress": "yes"}):
        with pytest.raises(SettingError, match=next(iter(bad))):
            TrainConfig(**bad)
    with pytest.raises(SettingError, match="cfg must be a lorakit TrainConfig, got dict"):
        train(lorakit.apply(Classifier(), "lora", targets=["fc1"], rank=2), _batches(), {"steps": 3})


def test_a_file_where_checkpoints_go_is_refused_before_any_step(tmp_path) -> None:
    from lorakit.train.checkpoint import ResumeError
    from lorakit.train.loop import TrainConfig, train

    cfg = TrainConfig(steps=2, checkpoint_every=1, progress=False)
    (tmp_path / "file").write_text("x")
    for where in (tmp_path / "file", tmp_path / "file" / "run"):
        model = lorakit.apply(Classifier(), "lora", targets=["fc1"], rank=2)
        with pytest.raises(ResumeError, match="file is a file"):
            train(model, _batches(), cfg, output_dir=where)
    assert (tmp_path / "file").read_text() == "x"


def test_a_delta_lora_whose_weight_moved_is_not_exported_as_a_plain_lora(tmp_path) -> None:
    model = lorakit.apply(MLP(), "delta_lora", targets=["fc1"], rank=2, start_step=-1)
    lorakit.save_peft(model, tmp_path / "fresh")  # W has not moved yet: exactly a LoRA
    perturb(model)
    with pytest.raises(LorakitError, match=r"fc1: Delta-LoRA has moved W by lam \* s"):
        lorakit.save_peft(model, tmp_path / "moved")
    assert not (tmp_path / "moved").exists()
    waiting = lorakit.apply(MLP(), "delta_lora", targets=["fc1"], rank=2, start_step=100)
    perturb(waiting)  # before step K the extra term is off: a plain LoRA
    lorakit.save_peft(waiting, tmp_path / "waiting")


def test_every_error_lorakit_raises_is_exported_and_a_lorakit_error() -> None:
    """Users catch lorakit's errors from the package itself; each is a LorakitError (and a ValueError)."""
    names = ["AdapterFileError", "AdapterStateError", "BatchError", "CapabilityError", "ConfigError",
             "NonFiniteError", "OutputExistsError", "SettingError", "TargetError"]  # fmt: skip
    for name in names:
        assert name in lorakit.__all__ and issubclass(getattr(lorakit, name), lorakit.LorakitError), name
    assert issubclass(lorakit.LorakitError, ValueError)
    assert issubclass(lorakit.OutputExistsError, FileExistsError)


def test_layers_their_parent_reads_instead_of_calling_are_left_out_or_refused() -> None:
    """nn.MultiheadAttention reads out_proj's weight itself, and nn.TransformerEncoderLayer's inference fast
    path every linear layer's: an adapter there would be skipped or fail in eval mode."""

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.proj = nn.Linear(16, 4)

        def forward(self, x):
            return self.proj(self.layer(x))

    torch.manual_seed(0)
    model = Encoder()
    lorakit.apply(model, "lora", targets="all-linear", rank=2)
    assert [n for n, _ in lorakit.adapted_layers(model)] == ["proj"]
    model.eval()
    with torch.no_grad():  # the fast path runs, reading its layers' weights
        assert model(torch.randn(2, 5, 16)).shape == (2, 5, 4)
    for targets in (["out_proj"], ["linear1"], "all-linear"):
        bare = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
        with pytest.raises(TargetError, match="reads (out_proj|linear1|linear2)'s weight or bias itself"):
            lorakit.apply(bare, "lora", targets=targets, rank=2)
        assert not lorakit.adapted_layers(bare) and all(p.requires_grad for p in bare.parameters())


class ReadsWeight(nn.Module):
    """Uses ``fc``'s weight as a value (as Mamba's mixer does ``dt_proj``'s) and only looks at ``gate``'s."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.gate, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        if isinstance(self.gate.weight, torch.Tensor) and self.gate.bias is not None:
            x = self.gate(x.to(self.gate.weight.dtype))
        return self.out(x @ self.fc.weight.t())


@pytest.mark.filterwarnings("ignore:targets 'all-linear' leaves out")
def test_a_layer_whose_weight_its_parent_uses_is_left_out_or_refused_in_any_module() -> None:
    torch.manual_seed(0)
    model = ReadsWeight()
    with pytest.warns(UserWarning, match="'all-linear' leaves out fc: ReadsWeight reads fc's weight or bias"):
        lorakit.apply(model, "lora", targets="all-linear", rank=2)
    assert [n for n, _ in lorakit.adapted_layers(model)] == ["gate", "out"]  # looking at a weight is no use
    with pytest.raises(TargetError, match="ReadsWeight reads fc's weight or bias itself"):
        lorakit.apply(ReadsWeight(), "lora", targets=["fc", "out"], rank=2)


@pytest.mark.filterwarnings("ignore:targets 'all-linear' leaves out")
def test_mamba_layers_its_mixer_reads_are_left_out_and_the_rest_train() -> None:
    """transformers' MambaMixer computes ``dt_proj.weight @ t`` (and its fused kernels read x_proj, out_proj
    and conv1d): adapters there did nothing, and merging them then changed the model."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2)
    model = MambaForCausalLM(config).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        base = model(ids).logits
    with pytest.warns(UserWarning, match="leaves out backbone.layers.0.mixer.x_proj and 5 more"):
        lorakit.apply(model, "lora", targets="all-linear", rank=2)
    assert {n.split(".")[-1] for n, _ in lorakit.adapted_layers(model)} == {"in_proj"}
    for _, layer in lorakit.adapted_layers(model):
        torch.nn.init.normal_(layer.variant.B, std=0.1)
    with torch.no_grad():
        adapted = model(ids).logits
        assert (adapted - base).abs().max() > 1e-3  # the adapters act
        lorakit.merge(model)
        assert torch.allclose(model(ids).logits, adapted, atol=1e-5)
    with pytest.raises(TargetError, match="MambaMixer reads dt_proj's weight or bias itself"):
        lorakit.apply(MambaForCausalLM(config), "lora", targets=["dt_proj"], rank=2)


def test_a_layer_held_under_two_names_is_refused() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))

    for targets in (["a"], ["b"], "all-linear"):
        with pytest.raises(TargetError, match="is the same module as .* under two names"):
            lorakit.apply(Shared(), "lora", targets=targets, rank=2)


@pytest.mark.parametrize("variant", ["lora", "dora", "delta_lora", "dylora"])
def test_a_sparse_embedding_trains_with_dense_adapter_gradients(variant) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8, sparse=True))
    ids = torch.randint(0, 20, (3, 7))
    before = model(ids).detach()
    lorakit.apply(model, variant, targets=["0"], rank=2)
    out = model(ids)
    torch.testing.assert_close(out, before)  # the adapter starts at zero
    (out * torch.randn_like(out)).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.is_sparse for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_a_refused_apply_leaves_every_layer_and_trainable_flag_as_it_was() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 16))
    model[2].bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    layers = list(model)
    with pytest.raises(LorakitError):  # the shared projections are too small for the second layer
        lorakit.apply(model, "vera", targets=["0", "2"], rank=4, projection_shape=[8, 8])
    assert list(model) == layers and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert getattr(model, "lorakit", None) is None


def test_a_model_on_the_meta_device_is_refused_naming_the_fix() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(AdapterStateError, match="meta device .* load the model's weights first"):
        lorakit.apply(model, "lora", targets=["0"], rank=2)
    assert isinstance(model[0], nn.Linear) and model[0].weight.requires_grad


@pytest.mark.parametrize(
    ("variant", "field"),
    [
        ("delta_lora", "lam"),
        ("lora_plus", "ratio"),
        ("lora_plus", "embedding_lr"),
        ("adalora", "orth_reg_weight"),
    ],
)
def test_an_infinite_variant_setting_is_refused(variant: str, field: str) -> None:
    extra = {"dropout": 0.0} if variant == "delta_lora" else {}
    with pytest.raises(ConfigError, match=f"'{field}' = inf is invalid: it must be a .*finite"):
        lorakit.apply(MLP(), variant, targets=["fc1"], **extra, **{field: math.inf})


def test_a_lazy_or_empty_layer_is_refused_saying_why() -> None:
    with pytest.raises(TargetError, match="LazyLinear has no weights yet .* run one forward pass"):
        lorakit.apply(nn.Sequential(nn.LazyLinear(4)), "lora", targets=["0"], rank=2)
    model = nn.Sequential(nn.Linear(4, 0), nn.Linear(4, 4))
    with pytest.raises(TargetError, match=r"its weight is empty \(0 x 4\)"):
        lorakit.apply(model, "lora", targets=["0"], rank=2)
    assert [n for n, _ in lorakit.adapted_layers(lorakit.apply(model, "lora", rank=2))] == ["1"]


@pytest.mark.parametrize("variant", ["lora", "qlora"])
def test_a_model_reading_an_adapted_layers_weight_runs(variant: str) -> None:
    """transformers' T5 reads ``wo.weight.dtype`` in its feed-forward: an adapted layer exposes its base
    weight (None for a 4-bit base, whose codes are no weight), so the model runs and trains."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    config.decoder_start_token_id = 0
    model = T5ForConditionalGeneration(config).eval()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).logits
    lorakit.apply(model, variant, targets="all-linear", rank=2)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, lorakit.AdaptedLayer)
    assert (wo.weight is wo.base_layer.weight) if variant == "lora" else wo.weight is None
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert wo.variant.B.grad is not None
    if variant == "lora":
        torch.testing.assert_close(out.logits, before)  # B starts at zero


class _ReadsStride(nn.Module):  # as Whisper's encoder, which reads conv1.stride
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.conv.stride[0] * 2 == self.conv.kernel_size[0] + 1
        return self.conv(x)


def test_a_model_reading_its_layers_attributes_runs_adapted_and_private_names_stay_the_wrappers() -> None:
    torch.manual_seed(0)
    model = lorakit.apply(_ReadsStride(), "lora", targets=["conv"], rank=2)
    perturb(model)
    out = model(torch.randn(2, 4, 8))
    out.sum().backward()
    assert model.conv.variant.B.grad.abs().sum() > 0 and model.conv.padding == (1,)
    model.conv.base_layer._framework_mark = True  # frameworks mark modules with private names
    assert not hasattr(model.conv, "_framework_mark")
    with pytest.raises(AttributeError):
        model.conv.no_such_attribute  # noqa: B018


def test_all_linear_names_what_it_cannot_cover() -> None:
    """A model without linear layers outside its head is told to name its layers; fused expert weights
    (stacks of matrices held by no layer) are named in a warning, the linear layers adapted."""
    with pytest.raises(TargetError, match=r"outside the output head .* e\.g\. \['0'\]"):
        lorakit.apply(nn.Sequential(nn.Conv2d(3, 4, 3)), "lora", targets="all-linear", rank=2)

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.experts = nn.Parameter(torch.zeros(4, 8, 8))  # four 8 x 8 experts in one tensor

    model = Experts()
    with pytest.warns(UserWarning, match=r"experts \(4, 8, 8\) are weights of no layer lorakit adapts"):
        lorakit.apply(model, "lora", targets="all-linear", rank=2)
    assert [n for n, _ in lorakit.adapted_layers(model)] == ["proj"]


def test_dropout_on_an_adapted_embedding_is_named_since_ids_do_not_drop() -> None:
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16))
    with pytest.warns(UserWarning, match=r"dropout 0.5 acts on an adapter.s float input; the embedding 0 "):
        lorakit.apply(model, "lora", targets=["0", "1"], rank=2, dropout=0.5)
    assert model[0].variant.dropout is None and model[1].variant.dropout is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without dropout: nothing to say
        lorakit.apply(nn.Sequential(nn.Embedding(50, 16)), "lora", targets=["0"], rank=2, dropout=0.0)
