"""Every registered kernel against the plain form it stands in for, generated from the kernel registry.

For each kernel that computes a computation form, each registered variant whose form that is, and each case
the kernel claims (layer kind, device, compute dtype, dropout rate, and its own condition), the kernel's
output and every gradient (the input's and each trainable parameter's) equal the variant's plain forward,
with the dropout mask fixed by ``torch.manual_seed``. Bases: a plain layer, one a forward hook watches (its
output changed), and a 4-bit one. A kernel registered later, or a variant declaring a form, joins by itself.
Other kernels (dropout's mask) are checked by what their computation must give.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import pytest
import torch
from layer_zoo import make_case
from test_conformance import perturb
from torch import Tensor, nn
from variant_cases import case_config, config_with_dropout

import lorakit
from lorakit.core.dropout import draw_keep_mask, keep_mask
from lorakit.core.kinds import LINEAR
from lorakit.core.layer import AdaptedLayer
from lorakit.kernels import KERNELS, Kernel
from lorakit.kernels.policy import compute_dtype

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RATES = (0.0, 0.1, 0.3)
# How each compute dtype is reached: the model in that dtype, or fp32 under autocast.
PRECISIONS = {
    "fp32": (torch.float32, None),
    "fp64": (torch.float64, None),
    "bf16": (torch.bfloat16, None),
    "bf16-autocast": (torch.float32, torch.bfloat16),
    "fp16": (torch.float16, None),
}
BASES = ("plain", "hooked", "nf4")  # hooked and 4-bit bases are built in fp32 only


@dataclass(frozen=True)
class Case:
    kernel: str
    variant: str
    kind: str
    device: str
    precision: str
    p: float
    base: str = "plain"

    def __str__(self) -> str:
        where = f"{self.kind}-{self.device}-{self.precision}-p{self.p}-{self.base}"
        return f"{self.kernel}-{self.variant}-{where}"


def build(case: Case) -> tuple[nn.Module, AdaptedLayer, Tensor]:
    """The adapted one-layer model of ``case`` (adapter moved off its init, training mode) and its input."""
    dtype, _ = PRECISIONS[case.precision]
    model, x = make_case(case.kind)
    if case.base == "nf4":
        lorakit.quantize(model, compute_dtype=torch.float32, targets=["layer"])
    lorakit.apply(model, case.variant, targets=["layer"], **config_with_dropout(case.variant, case.p))
    perturb(model)
    if case.base == "hooked":
        model.layer.base_layer.register_forward_hook(lambda m, i, out: out * 1.5 + 0.25)
    model = model.to(case.device).train()
    if dtype != torch.float32:
        model.layer.base_layer.to(dtype)
        if dtype == torch.float64:  # the adapter follows only in fp64; under bf16/fp16 it stays fp32
            model.layer.variant.to(dtype)
    return model, model.layer, x.to(case.device, dtype)


def claimed(case: Case) -> bool:
    """Whether the kernel claims ``case``: the policy's test for it, on the built layer."""
    kernel = KERNELS[case.kernel]
    _, layer, x = build(case)
    form = layer.variant.form(layer)
    if not isinstance(form, kernel.computes):
        return False
    with torch.autocast(case.device, dtype=PRECISIONS[case.precision][1] or torch.bfloat16,
                        enabled=PRECISIONS[case.precision][1] is not None):  # fmt: skip
        dtype_ok = compute_dtype(x) in kernel.dtypes
        return dtype_ok and (kernel.when is None or kernel.when(layer, x, form))


def form_kernels() -> list[Kernel]:
    return [k for k in KERNELS.values() if isinstance(k.computes, type)]


def applicable(
    kernel: Kernel, variant: str, kind: str, device: str, precision: str, p: float, base: str
) -> bool:
    """Whether the combination exists at all (before asking the kernel whether it claims it)."""
    return (
        kind in lorakit.get_variant(variant).kinds
        and device in kernel.devices
        and kernel.dropout(p)
        and config_with_dropout(variant, p) is not None
        and (base == "plain" or precision == "fp32")
        and (base != "nf4" or kind in ("linear", "conv1d_gpt2"))
        and not (precision == "fp16" and device == "cpu")  # fp16 products on a CPU: not what runs anywhere
    )


def cases() -> list[Case]:
    found = []
    for kernel in form_kernels():
        kinds = [k.name for k in kernel.kinds or []]
        for combo in itertools.product(lorakit.VARIANTS, kinds, DEVICES, PRECISIONS, RATES, BASES):
            if applicable(kernel, *combo):
                case = Case(kernel.name, *combo)
                if claimed(case):
                    found.append(case)
    return found


CASES = cases()


def tolerance(precision: str) -> dict[str, float]:
    if precision in ("bf16", "bf16-autocast", "fp16"):
        return {"atol": 3e-2, "rtol": 3e-2}
    # fp64: DoRA's row norm is fp32 on both sides by design
    return {"atol": 1e-5, "rtol": 1e-5} if precision == "fp32" else {"atol": 1e-6, "rtol": 1e-6}


def run(case: Case, fast: bool) -> list[Tensor]:
    """Output, input gradient and every trainable gradient, through the kernel or the plain forward."""
    model, layer, x = build(case)
    x = x.detach().requires_grad_()
    autocast = PRECISIONS[case.precision][1]
    torch.manual_seed(11)  # the same dropout mask on both sides
    with torch.autocast(case.device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        if fast:
            out = KERNELS[case.kernel].run(layer, x, layer.variant.form(layer))
        else:
            out = layer.variant.forward(x, layer.base_layer(x), layer)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    (out.float() * weights.float()).sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [out.detach().float(), x.grad.float()] + [p.grad.float() for p in trainable]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_kernel_equals_its_plain_form_in_output_and_every_gradient(case: Case) -> None:
    fast, plain = run(case, fast=True), run(case, fast=False)
    assert len(fast) == len(plain) >= 3
    assert plain[1].abs().max() > 0 and any(g.abs().max() > 0 for g in plain[2:])  # gradients really flow
    scale = [max(t.abs().max().item(), 1.0) for t in plain]
    for got, want, s in zip(fast, plain, scale, strict=True):
        tol = tolerance(case.precision)
        torch.testing.assert_close(got, want, atol=tol["atol"] * s, rtol=tol["rtol"])


def test_every_form_kernel_is_tested_and_every_form_variant_has_a_kernel_case() -> None:
    assert {c.kernel for c in CASES} == {k.name for k in form_kernels()}
    for variant in lorakit.VARIANTS:  # a variant that declares a form on a linear layer is covered
        model, x = make_case("linear")
        if "linear" not in lorakit.get_variant(variant).kinds:
            continue
        layer = lorakit.apply(model, variant, targets=["layer"], **config_with_dropout(variant, 0.0)).layer
        if layer.variant.form(layer) is not None:
            assert any(c.variant == variant for c in CASES), variant


def check_keep_mask(kernel: Kernel) -> None:
    """A mask kernel draws Bernoulli(p) drops at every rate it covers, reproducibly from its seed."""
    x = torch.empty(500, 8, 97)
    rates = [p for p in (0.01, 0.05, 0.1, 0.25, 0.3, 0.5) if kernel.dropout(p)]
    assert rates
    for p in rates:
        masks = torch.stack([kernel.run(x, p, seed) for seed in range(6)]).float()
        assert masks.shape == (6, *x.shape)
        assert abs(masks.mean().item() - (1 - p)) < 0.004
        assert (masks.mean(dim=(0, 2, 3)) - (1 - p)).abs().max() < 0.05  # every row at the rate
        both = (masks[..., 1:] * masks[..., :-1]).mean().item()
        assert abs(both - (1 - p) ** 2) < 0.006  # neighbours independent
    assert torch.equal(kernel.run(x, rates[0], 5), kernel.run(x, rates[0], 5))
    assert not torch.equal(kernel.run(x, rates[0], 5), kernel.run(x, rates[0], 6))


def check_linear_cross_entropy(kernel: Kernel) -> None:
    """A cross-entropy kernel equals the plain form (the head's logits, then ``F.cross_entropy`` summed) in
    the loss and in the gradients of the rows, the head's weight and its bias, in fp64 and fp32."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(40, 16, dtype=dtype, generator=gen, requires_grad=True)
        w = torch.randn(70, 16, dtype=dtype, generator=gen, requires_grad=True)
        b = torch.randn(70, dtype=dtype, generator=gen, requires_grad=True)
        t = torch.randint(0, 70, (40,), generator=gen)
        logits = torch.nn.functional.linear(h, w, b)
        plain = torch.nn.functional.cross_entropy(logits, t, reduction="sum")
        fast = kernel.run(h, w, b, t)
        torch.testing.assert_close(fast, plain, rtol=tol, atol=tol)
        grads = torch.autograd.grad(fast, (h, w, b)), torch.autograd.grad(plain, (h, w, b))
        for got, want in zip(*grads, strict=True):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


CHECKS = {  # how each kind of named computation is checked
    "keep_mask": check_keep_mask,
    "linear_cross_entropy": check_linear_cross_entropy,
}


@pytest.mark.parametrize("name", [n for n, k in KERNELS.items() if not isinstance(k.computes, type)])
def test_every_other_kernel_gives_what_its_computation_must(name: str) -> None:
    kernel = KERNELS[name]
    assert kernel.computes in CHECKS, f"kernel '{name}' computes '{kernel.computes}': add its check here"
    CHECKS[kernel.computes](kernel)


def test_switched_off_every_variant_runs_its_plain_form_and_its_plain_mask() -> None:
    model, x = make_case("linear")
    lorakit.apply(model, "lora", targets=["layer"], rank=4, dropout=0.1)
    perturb(model)
    model.train()
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(2))
    with lorakit.kernels.plain():
        assert not lorakit.kernels.enabled()
        torch.manual_seed(0)
        off = model(x)
        assert type(off.grad_fn).__name__ == "AddBackward0"  # y + s B A x~ in plain autograd
        assert torch.equal(keep_mask(x, 0.1, 4), draw_keep_mask(x, 0.1, 4))  # the plain draw
    assert lorakit.kernels.enabled()
    torch.manual_seed(0)
    on = model(x)
    assert type(on.grad_fn).__name__ == "_LowRankFunctionBackward"
    assert not torch.equal(keep_mask(x, 0.1, 4), draw_keep_mask(x, 0.1, 4))  # the gap draw on a CPU
    lorakit.kernels.enable(False)
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            torch.testing.assert_close(model(x), off)
    finally:
        lorakit.kernels.enable(True)


def test_the_environment_switch_is_read_and_a_bad_value_is_refused(monkeypatch) -> None:
    from lorakit.kernels import policy

    for value, on in (("off", False), ("0", False), ("ON", True), ("", True)):
        monkeypatch.setenv("LORAKIT_KERNELS", value)
        assert policy.from_environment() is on
    monkeypatch.setenv("LORAKIT_KERNELS", "fast")
    with pytest.raises(lorakit.SettingError, match="LORAKIT_KERNELS='fast' is not a switch; set it to"):
        policy.from_environment()


def test_a_subclass_that_rewrites_the_forward_does_not_inherit_its_parents_form() -> None:
    from lorakit.variants.lora import LoRA

    class Scaled(LoRA):
        name = "scaled_lora"

        def forward(self, x: Tensor, y: Tensor, base: AdaptedLayer) -> Tensor:
            return y + 3.0 * (super().forward(x, y, base) - y)

    model, x = make_case("linear")
    layer = AdaptedLayer(model.layer, LINEAR, Scaled, Scaled.config_class(rank=4, dropout=0.0))
    with torch.no_grad():
        layer.variant.B.normal_()
        y = layer.base_layer(x)
        assert layer.variant.form(layer) is None
        torch.testing.assert_close(layer(x), layer.variant.forward(x, y, layer))
        torch.testing.assert_close(layer(x) - y, 3.0 * (LoRA.forward(layer.variant, x, y, layer) - y))


def test_hooks_on_the_variant_keep_its_plain_forward_called() -> None:
    model, x = make_case("linear")
    lorakit.apply(model, "lora", targets=["layer"], rank=4, dropout=0.0)
    seen = []
    model.layer.variant.register_forward_hook(lambda m, i, out: seen.append(i[1] is not None))
    model(x)
    assert seen == [True]  # called, with the base output, as a per-example gradient tool expects


@pytest.mark.parametrize("variant", ["lora", "dora", "dylora", "adalora", "lora_fa", "qlora"])
@pytest.mark.parametrize("shape", [(5, 16), (2, 5, 16)])
def test_a_kernels_output_takes_the_models_in_place_ops(variant: str, shape: tuple[int, ...]) -> None:
    """A model may change a layer's output in place (ReLU(inplace=True), Falcon's `h += attention`): the
    kernels return no view of a tensor made inside them (autograd refuses in-place ops on those), and the
    gradients equal the plain forward's."""

    def run(plain: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Linear(32, 4))
        lorakit.apply(model, variant, targets=["0"], **{**case_config(variant), "dropout": 0.0})
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        with lorakit.kernels.plain() if plain else contextlib.nullcontext():
            out = model(x)
            out[..., 0].add_(1.0)  # and an in-place op on the model's own output
            out.square().sum().backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    fast, plain = run(False), run(True)
    assert fast and all(g is not None for g in fast)
    for g, ref in zip(fast, plain, strict=True):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)
