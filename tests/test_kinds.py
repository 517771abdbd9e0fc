"""Layer kinds: the (out, in) view round-trips; `op`/`down`/`up` apply weights exactly as the layer does."""

from __future__ import annotations

import pytest
import torch
from layer_zoo import LAYERS, make_case

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
