"""Gradient checkpointing (``--gradient-checkpointing``): the same training with less activation memory.

Each block is recomputed in backward with the random state restored, so every dropout mask, and so the
trained adapter, equals the run that keeps the activations; the tensors autograd keeps for backward shrink.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import chat_tokenizer, tiny_chat_llama, tiny_chat_sft

import lorakit
from lorakit.cli import main
from lorakit.common.errors import SettingError
from lorakit.data.datasets import BatchSampler
from lorakit.engine.token_loss import TokenLoss
from lorakit.jobs.config import JobConfig
from lorakit.jobs.models import checkpoint_blocks
from lorakit.privacy.config import DPConfig
from lorakit.train.loop import TrainConfig, train

QUESTIONS = [
    (f"What is {a} times {b}?", f"{a} x {b} = {a * b}. #### {a * b}") for a in range(2, 8) for b in (3, 4)
]


@pytest.fixture(scope="module")
def setup():
    _, data, base = tiny_chat_sft(QUESTIONS)
    return data, base


def tuned(base: torch.nn.Module, data, variant: str, checkpointed: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the adapter's initialisation, then every dropout mask
    model = lorakit.apply(copy.deepcopy(base), variant, targets="all-linear", rank=4, alpha=8, dropout=0.1)
    if checkpointed:
        checkpoint_blocks(model)
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_ratio=0.0, progress=False)
    train(model, BatchSampler(data, 4, 0, group_by_length=True), cfg)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", ["lora", "dora", "loha"])
def test_a_checkpointed_run_trains_the_same_adapter(setup, variant) -> None:
    data, base = setup
    kept, recomputed = tuned(base, data, variant, False), tuned(base, data, variant, True)
    assert kept.keys() == recomputed.keys()
    for name, tensor in kept.items():
        torch.testing.assert_close(recomputed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(0)
    init = lorakit.apply(copy.deepcopy(base), variant, targets="all-linear", rank=4, alpha=8, dropout=0.1)
    assert all(not torch.equal(p, kept[n]) for n, p in init.named_parameters() if p.requires_grad)


def saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward during one training forward (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        summed, count = TokenLoss.of(model)(**batch)
    (summed / count).backward()
    return sum(seen.values())


def test_checkpointing_keeps_fewer_activations(setup) -> None:
    data, base = setup
    batch = next(iter(BatchSampler(data, 8, 0, group_by_length=False)))
    model = lorakit.apply(copy.deepcopy(base), "lora", targets="all-linear", rank=4, dropout=0.1)
    full = saved_bytes(model, batch)
    checkpoint_blocks(model)
    assert saved_bytes(model, batch) < 0.6 * full


def test_checkpointing_with_dp_is_refused() -> None:
    with pytest.raises(SettingError, match="--gradient-checkpointing cannot run with --dp"):
        JobConfig(gradient_checkpointing=True, privacy=DPConfig(dp=True, target_epsilon=8.0))


def test_a_model_without_checkpointing_is_refused() -> None:
    model = lorakit.apply(torch.nn.Sequential(torch.nn.Linear(16, 16)), "lora", targets="all-linear")
    with pytest.raises(lorakit.LorakitError, match="does not support gradient checkpointing"):
        checkpoint_blocks(model)


def test_the_command_line_trains_the_same_adapter_with_checkpointing(chat_llama_dir, tmp_path) -> None:
    rows = [{"prompt": q, "response": a} for q, a in QUESTIONS]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(chat_llama_dir), "--data", str(data), "--steps", "3", "--batch-size", "4"]
    common += ["--max-length", "96", "--no-progress", "--lr", "1e-2"]
    assert main(["train", *common, "--output-dir", str(tmp_path / "kept")]) == 0
    out = tmp_path / "recomputed"
    assert main(["train", *common, "--output-dir", str(out), "--gradient-checkpointing"]) == 0
    assert json.loads((out / "job.json").read_text())["gradient_checkpointing"] is True
    base = tiny_chat_llama(len(chat_tokenizer()))
    kept = lorakit.load(copy.deepcopy(base), tmp_path / "kept").state_dict()
    recomputed = lorakit.load(copy.deepcopy(base), out).state_dict()
    for name, tensor in kept.items():
        torch.testing.assert_close(recomputed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
