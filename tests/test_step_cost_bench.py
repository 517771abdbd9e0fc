"""The step-cost benchmark: ratios to full fine-tuning and to each PEFT peer, and the README rewrite."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import lorakit

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("step_cost", ROOT / "benchmarks" / "step_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_cost"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _row(seconds: float, state: float, act: float) -> dict[str, float]:
    return {"step_seconds": seconds, "state_mb": state, "activation_mb": act, "memory_mb": state + act,
            "step_rss_mb": 10.0}  # fmt: skip


def test_table_gives_ratios_to_full_fine_tuning_and_to_the_peft_peer() -> None:
    bench = _bench()
    rows = {"full fine-tuning": _row(2.0, 300, 100), "peft dora": _row(1.6, 90, 310),
            "lorakit dora": _row(1.0, 90, 110)}  # fmt: skip
    lines = bench.table(rows).splitlines()
    assert lines[2] == "| full fine-tuning | 2.000 | 1.00x |  | 400 (300 + 100) |  | 10 |"
    assert lines[4] == "| lorakit dora | 1.000 | 0.50x | 0.62x | 200 (90 + 110) | 0.50x | 10 |"


def test_readme_rewrite_replaces_only_the_marked_section(tmp_path: Path) -> None:
    bench = _bench()
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results-step-cost:begin -->\nold\n<!-- results-step-cost:end -->\nrest\n")
    bench.write_readme(readme, "| new |")
    assert readme.read_text() == (
        "intro\n<!-- results-step-cost:begin -->\n| new |\n<!-- results-step-cost:end -->\nrest\n"
    )
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="results-step-cost"):
        bench.write_readme(readme, "| new |")
    assert readme.read_text() == "no markers\n"  # nothing written when the section is missing


def test_a_run_on_more_threads_rewrites_its_own_section(tmp_path: Path) -> None:
    bench = _bench()
    readme = tmp_path / "README.md"
    one = "<!-- results-step-cost:begin -->\none\n<!-- results-step-cost:end -->\n"
    two = "<!-- results-step-cost-2-threads:begin -->\nold\n<!-- results-step-cost-2-threads:end -->\n"
    readme.write_text(one + two)
    bench.write_readme(readme, "| two |", bench.readme_section("cpu", 2, all_bf16=False))
    assert readme.read_text() == one + two.replace("old", "| two |")
    assert bench.readme_section("cpu", 1, all_bf16=False) == "results-step-cost"
    assert bench.readme_section("cuda", 1, all_bf16=True) == "results-step-cost-cuda-bf16"


def test_a_causal_lm_times_dora_with_and_without_dropout_on_both_sides() -> None:
    """The causal-LM rows put DoRA's own cost (dropout 0: W0 x~ is the base output) beside DoRA with the
    dropout that needs one more base product, each against PEFT's same configuration."""
    from conftest import tiny_llama

    bench = _bench()
    builders = bench.contenders(tiny_llama(), bench.LLAMA_TARGETS, None, every=True)
    for side in ("peft", "lorakit"):
        assert {f"{side} dora", f"{side} dora, dropout 0"} <= builders.keys()
    rates = {}
    for name in ("lorakit dora", "lorakit dora, dropout 0", "peft dora", "peft dora, dropout 0"):
        model = builders[name]().model
        ours = {round(layer.variant.dropout_rate(), 2) for _, layer in lorakit.adapted_layers(model)}
        rates[name] = ours or {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {"lorakit dora": {0.05}, "lorakit dora, dropout 0": {0.0}, "peft dora": {0.05},
                     "peft dora, dropout 0": set()}  # fmt: skip
