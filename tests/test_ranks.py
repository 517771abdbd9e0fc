"""The rank view through the contract: the rank report of a saved adapter, for every variant, and rank
choices refused where a variant's rank is fixed."""

from __future__ import annotations

import pytest
from torch import nn

import lorakit
from lorakit.bench.ranks import saved_ranks

# rank 4 in every variant's own terms (AdaLoRA's init_r; VeRA's shared A has 4 rows; LoKr's low-rank factors)
SETTINGS = {
    "adalora": {"init_r": 4, "target_r": 2},
    "qlora": {"base_quantization": None},
    "lora_drop": {"kept": ["a"]},
}


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


@pytest.mark.parametrize("name", list(lorakit.VARIANTS))
def test_saved_ranks_report_every_layer_of_every_variant(name: str, tmp_path) -> None:
    """Shared tensors stored once (VeRA's projections, LoRA-drop's pairs) still give each layer its rank."""
    config = {"rank": 4, **SETTINGS.get(name, {})}
    model = lorakit.apply(Two(), name, targets=["a", "b", "c"], **config)
    lorakit.save(model, tmp_path / name)
    assert saved_ranks(tmp_path / name) == {"a": 4, "b": 4, "c": 4}


def test_a_chosen_rank_needs_a_variant_with_rank_choices() -> None:
    fixed = lorakit.apply(Two(), "lora", targets=["a"], rank=4)
    with pytest.raises(ValueError, match="fixed rank"):
        lorakit.set_rank(fixed, 2)
    dynamic = lorakit.apply(Two(), "dylora", targets=["a"], rank=4)
    lorakit.set_rank(dynamic, 2)
    assert dynamic.a.variant.rank == 2 and dynamic.a.variant.delta_weight().shape == (16, 16)
    with pytest.raises(ValueError, match=r"out of range: choose an integer in \[1, 4\]"):
        lorakit.set_rank(dynamic, 5)
