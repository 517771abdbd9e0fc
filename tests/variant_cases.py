"""Config each variant uses in the generated tests, chosen so its special behaviour really happens."""

from __future__ import annotations

from typing import Any

# Variants not listed here use {"rank": 4}. Keep these small and fast.
CASES: dict[str, dict[str, Any]] = {
    "lora": {"rank": 4, "alpha": 8.0},
    # dropout > 0 exercises the seeded-mask backward that saves no input with A frozen.
    "lora_fa": {"rank": 4, "alpha": 8.0, "dropout": 0.1, "precondition": True},
    # start_step=-1 switches the stop-gradient term on from the start, so merge and save/load cover it.
    "delta_lora": {"rank": 4, "alpha": 8.0, "lam": 0.5, "start_step": -1},
    "lora_plus": {"rank": 4, "alpha": 8.0, "ratio": 4.0},
    # s = alpha/r = 1.5, so a scale applied twice on merge (the LyCORIS bug) would break merge == forward.
    "loha": {"rank": 4, "alpha": 6.0},
    # rank 1 makes W2 low rank on every kind and, with decompose_both, W1 too on linear/Conv1D/embedding.
    "lokr": {"rank": 1, "alpha": 3.0, "decompose_both": True},
    # dropout > 0: training runs the extra base op W0 x~ (eval reuses y); s = 2 so a missed scale shows.
    "dora": {"rank": 4, "alpha": 8.0, "dropout": 0.1},
    # projections larger than the layer, so every kind uses a strict top-left slice of the shared A, B.
    "vera": {"rank": 4, "d_initial": 0.5, "projection_shape": [16, 64]},
    # s = alpha/init_r = 2; a hook run with this config masks from step 2 and fixes rank 2 at step 6.
    "adalora": {"init_r": 6, "target_r": 2, "alpha": 12.0, "t_init": 1, "t_final": 2, "total_steps": 8},
    # This suite compares with the unquantised base, so quantising is off here (the adapter math is LoRA's);
    # tests/test_conformance_4bit.py runs every property on the NF4 base with base_quantization="nf4".
    "qlora": {"rank": 4, "alpha": 8.0, "dropout": 0.1, "base_quantization": None},
    # frozen: the training forward splits each factor into detached ranks < b and the trained rank b (b = R
    # without a hook, as at inference); s = alpha/R = 1.5.
    "dylora": {"rank": 4, "alpha": 6.0, "min_rank": 2, "mode": "frozen"},
    # No round fixes a rank here, so the adapter runs at R = 4 (s = 1.5); test_federated.py covers b_t < R.
    "dp_dylora": {"rank": 4, "alpha": 6.0, "min_rank": 2},
    # kept=[]: the layer is not selected, so it uses its shape's shared pair (built and reloaded from config).
    "lora_drop": {"rank": 4, "alpha": 8.0, "kept": []},
}


def case_config(name: str) -> dict[str, Any]:
    return dict(CASES.get(name, {"rank": 4}))


def config_with_dropout(name: str, p: float) -> dict[str, Any] | None:
    """:func:`case_config` with adapter dropout ``p``; None where the variant's config refuses that rate
    (Delta-LoRA has no dropout)."""
    from lorakit import get_variant
    from lorakit.core.config import ConfigError

    config = case_config(name) | {"dropout": p}
    try:
        get_variant(name).config_class.from_dict(config)
    except ConfigError:
        return None
    return config
