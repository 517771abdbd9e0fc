"""Layer kinds: the (out, in) view round-trips; `op`/`down`/`up` apply weights exactly as the layer does."""

from __future__ import annotations

import pytest
import torch
from layer_zoo import LAYERS, make_case, perturb

import lorakit
from lorakit.core.kinds import kind_of


@pytest.mark.parametrize("kind_name", list(LAYERS))
def test_op_reproduces_layer_and_low_rank_factors_compose(kind_name: str) -> None:
    model, x = make_case(kind_name)
    layer = model.layer
    kind = kind_of(layer)
    assert kind is not None and kind.name == kind_name
    w2d = kind.weight_2d(layer)
    assert tuple(w2d.shape) == kind.shape_2d(layer)
    assert torch.equal(kind.from_2d(layer, w2d), layer.weight)
    with torch.no_grad():
        torch.testing.assert_close(kind.op(layer, x, w2d, getattr(layer, "bias", None)), layer(x))
        out_f, in_f = kind.shape_2d(layer)
        a, b = torch.randn(3, in_f), torch.randn(out_f, 3)
        torch.testing.assert_close(
            kind.up(kind.down(layer, x, a), b), kind.op(layer, x, b @ a), atol=1e-4, rtol=1e-4
        )


def test_unadaptable_layer_has_no_kind() -> None:
    assert kind_of(torch.nn.LayerNorm(4)) is None


@pytest.mark.parametrize("variant", ["lora", "dora", "vera", "adalora", "lora_fa", "dylora", "loha", "lokr"])
@pytest.mark.parametrize(("conv", "size"), [(torch.nn.Conv1d, (2,)), (torch.nn.Conv2d, (2, 3))])
def test_an_unbatched_convolution_input_gives_the_batched_output(conv, size, variant) -> None:
    torch.manual_seed(0)
    # 2 output channels, rank 2 and length 2: a transposed change would have had the right shape
    rank = {"init_r": 2, "target_r": 1} if variant == "adalora" else {"rank": 2}  # AdaLoRA: its budget
    model = lorakit.apply(torch.nn.Sequential(conv(3, 2, 3, padding=1)), variant, targets=["0"], **rank)
    perturb(model)
    model.eval()
    x = torch.randn(3, *size)  # (channels, *size): one example without a batch dimension
    with torch.no_grad():
        batched = model(x.unsqueeze(0))[0]
        with lorakit.disabled(model):
            assert (model(x) - batched).abs().max() > 1e-3  # the adapter changes the output
        torch.testing.assert_close(model(x), batched)
        torch.testing.assert_close(lorakit.merge(model)(x), batched, atol=1e-5, rtol=1e-5)
