"""Causal-LM code paths on tiny Llama and GPT-2 models built from configs: train, merge, save, load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.train.loop import TrainConfig, train


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_lora_trains_merges_and_reloads_a_causal_lm(build, tmp_path) -> None:
    model = build()
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    lorakit.apply(model, "lora", targets="all-linear", rank=4, dropout=0.0)
    model.eval()
    with torch.no_grad():
        before = model(**batch).loss.item()
    result = train(
        model, iter(lambda: batch, None), TrainConfig(steps=30, lr=1e-2, warmup_ratio=0.0, progress=False)
    )
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss.item()
        logits = model(ids).logits
    assert after < before - 0.25, (before, after)
    assert result.steps == 30 and len(result.losses) == 30
    merged = assert_reloads_then_merges(model, build, ids, logits, tmp_path)
    assert not any(isinstance(m, lorakit.AdaptedLayer) for m in merged.modules())


def assert_reloads_then_merges(
    model: nn.Module, build: Callable[[], nn.Module], ids: torch.Tensor, logits: torch.Tensor, tmp_path: Path
) -> nn.Module:
    """Saved and loaded onto a fresh ``build()`` the adapter gives ``logits`` exactly; merged, within 1e-4.
    Returns the merged plain model."""
    lorakit.save(model, tmp_path / "adapter")
    reloaded = lorakit.load(build(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
        merged = lorakit.merge(model)
        torch.testing.assert_close(merged(ids).logits, logits, atol=1e-4, rtol=1e-4)
    return merged
