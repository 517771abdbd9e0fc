"""Every registered variant x every driver: its training rules run, seen by their effect, or the driver
refuses it with a clear error before any step. Generated from the registry: a new variant joins by itself.

Drivers: lorakit's loop, DP-SGD, ``transformers.Trainer`` (``LorakitTrainer``), a federated client's local
training and a distributed run (lorakit's loop on a torchrun rank: DDP over a gloo group of one process here;
``tests/test_distributed.py`` runs two). What every variant's declared capabilities promise is checked for
each: its hook runs at every call point it takes part in, its stages run, the optimizer has its parameter
groups' rates (LoRA+), its frozen tensors stay (LoRA-FA's A, VeRA's projections), its trainable tensors move
and stay finite. Each method's own mark on top: AdaLoRA's final mask, DyLoRA's sampled ranks, DP-DyLoRA's
fixed round rank, Delta-LoRA's extra update of W, LoRA-drop's selection and shared modules.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from dist_harness import free_port
from torch import nn
from transformers import TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

import lorakit
from lorakit.core.contract import CapabilityError
from lorakit.data.datasets import BatchSampler, TokenizedData
from lorakit.distributed import Distributed
from lorakit.engine import run as engine_run
from lorakit.federated.client import local_training
from lorakit.integrations.transformers import LorakitTrainer
from lorakit.privacy.config import DPConfig
from lorakit.privacy.dp_sgd import train_dp
from lorakit.train.loop import TrainConfig, train

STEPS, BATCH, LR = 8, 8, 1e-2
DRIVERS = ("loop", "dp_sgd", "trainer", "federated", "distributed")
# Settings that make each variant's rule act within STEPS steps (the rest use rank 4).
CONFIGS = {
    "adalora": {"init_r": 4, "target_r": 2, "t_init": 1, "t_final": 2},
    "delta_lora": {"start_step": 2, "lam": 0.5},
    "dylora": {"min_rank": 1, "seed": 3},
    "lora_drop": {"threshold": 0.5, "sample_ratio": 0.5},
    "lora_plus": {"ratio": 4.0},
    "qlora": {"base_quantization": None},  # the 4-bit base is covered by test_conformance_4bit
    "vera": {"d_initial": 0.5},
}


class Tiny(nn.Module):
    """Token ids -> embedding -> two linear layers -> mean -> a frozen head; returns loss and logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(32, 16)
        self.l0, self.l1 = nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask=None, labels=None) -> SequenceClassifierOutput:
        h = torch.tanh(self.l1(torch.tanh(self.l0(self.emb(input_ids)))))
        logits = self.head(h.mean(1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def dataset() -> TokenizedData:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 32, (64, 6), generator=gen)
    return TokenizedData(ids.tolist(), [int(row[0] < 16) for row in ids], 0)


def adapted(name: str) -> nn.Module:
    return lorakit.apply(Tiny(), name, targets=["l0", "l1"], rank=4, dropout=0.0, **CONFIGS.get(name, {}))


@pytest.fixture(scope="module")
def one_rank() -> Iterator[Distributed]:
    """A gloo process group of one process: the distributed driver's code path (DDP) without a second rank."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield Distributed("ddp", 0, 1, torch.device("cpu"))
    dist.destroy_process_group()


def run_driver(driver: str, model: nn.Module, data: TokenizedData, tmp_path) -> torch.optim.Optimizer:
    """Train ``model`` with ``driver`` for STEPS steps; returns the optimizer the driver built."""
    cfg = TrainConfig(
        steps=STEPS, batch_size=BATCH, lr=LR, warmup_ratio=0.0, schedule="constant", progress=False
    )
    built: list[torch.optim.Optimizer] = []
    make = engine_run.make_optimizer
    engine_run.make_optimizer = lambda m, c: built.append(make(m, c)) or built[-1]
    try:
        if driver == "loop":
            train(model, BatchSampler(data, BATCH, 0), cfg)
        elif driver == "dp_sgd":
            train_dp(model, data, cfg, DPConfig(dp=True, noise_multiplier=0.3, max_grad_norm=1.0))
        elif driver == "federated":
            local_training(model, data, cfg)
        elif driver == "distributed":
            group = Distributed("ddp", 0, 1, torch.device("cpu"))  # one per model: it wraps the model once
            train(model, group.sampler(data, BATCH, 0), cfg, placement=group)
        else:
            rows = [data.batch([i]) for i in range(len(data))]
            args = TrainingArguments(
                output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
                learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, report_to="none", save_strategy="no", logging_strategy="no",
                disable_tqdm=True, use_cpu=True,
            )  # fmt: skip
            trainer = LorakitTrainer(
                model=model, args=args, train_dataset=[{k: v[0] for k, v in r.items()} for r in rows]
            )
            trainer.train()
            built.append(trainer.optimizer)
    finally:
        engine_run.make_optimizer = make
    return built[-1]


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def adalora_pruned(model: nn.Module, before: dict, optimizer, ranks: set[int]) -> None:
    """The global budget pruned to its final mask: target_r triplets per matrix on average."""
    variants = [layer.variant for _, layer in lorakit.adapted_layers(model)]
    assert sum(x.rank for x in variants) == 2 * len(variants)


def dylora_sampled(model: nn.Module, before: dict, optimizer, ranks: set[int]) -> None:
    """A rank per step, several over the run."""
    assert len(ranks) >= 2 and ranks <= set(range(1, 5))


def dp_dylora_round_rank(model: nn.Module, before: dict, optimizer, ranks: set[int]) -> None:
    """The chosen round rank b = 2 only: rows >= b never move."""
    v = lorakit.adapted_layers(model)[0][1].variant
    assert ranks == {2}
    a0 = before["l0.variant.A"]
    assert torch.equal(v.A[2:], a0[2:]) and not torch.equal(v.A[:2], a0[:2])


def delta_lora_moved(model: nn.Module, before: dict, optimizer, ranks: set[int]) -> None:
    """From step K the stop-gradient term moves W beyond s B A."""
    v = lorakit.adapted_layers(model)[0][1].variant
    assert v.active_now and (v.delta_weight() - v.scale * v.B @ v.A).abs().max() > 0


def lora_drop_selected(model: nn.Module, before: dict, optimizer, ranks: set[int]) -> None:
    """Selection made, unselected modules share one pair."""
    variants = [layer.variant for _, layer in lorakit.adapted_layers(model)]
    kept = lorakit.info(model).config.kept
    assert kept is not None and len(kept) < 2 and any(x.is_shared for x in variants)


# Each method's own mark beyond the rules every variant's declared capabilities are checked by (below).
EFFECTS = {
    "adalora": adalora_pruned,
    "dylora": dylora_sampled,
    "dp_dylora": dp_dylora_round_rank,
    "delta_lora": delta_lora_moved,
    "lora_drop": lora_drop_selected,
}
CALL_POINTS = (
    "on_step_start",
    "extra_loss",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_after_step",
)


def declared_call_points(cls: type) -> list[str]:
    """The call points the variant's hook class takes part in (overrides of ``lorakit.Hook``'s)."""
    if cls.hook is None:
        return []
    return [n for n in CALL_POINTS if getattr(cls.hook, n) is not getattr(lorakit.Hook, n)]


def spy(monkeypatch: pytest.MonkeyPatch, owner: type, name: str, calls: list[str]) -> None:
    original = getattr(owner, name)

    def record(self, *args, **kwargs):
        calls.append(name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, record)


def check_declared(name: str, model: nn.Module, before: dict, optimizer, calls: list[str]) -> None:
    """What the variant's declared capabilities promise, whatever the variant: its hook ran at every call
    point it takes part in, its stages ran, the optimizer has its parameter groups' rates, and its frozen
    tensors (requires_grad False) stayed as they were."""
    cls = lorakit.get_variant(name)
    for point in declared_call_points(cls):
        assert point in calls, f"{name}: its hook's {point} never ran"
    if cls.stages is not None:
        assert "run" in calls, f"{name}: its stages never ran"
    declared = {id(p): g["lr"] for g in lorakit.param_groups(model, LR) for p in g["params"]}
    used = {id(p): g.get("initial_lr", g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    assert used.keys() == declared.keys() and all(used[k] == pytest.approx(declared[k]) for k in used)
    for layer_name, layer in lorakit.adapted_layers(model):
        for p_name, p in layer.variant.named_parameters():
            key = f"{layer_name}.variant.{p_name}"
            if not p.requires_grad and key in before:
                assert torch.equal(p, before[key]), f"{name}: frozen {p_name} moved"


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("name", list(lorakit.VARIANTS))
def test_every_variant_runs_its_rules_or_is_refused_in_every_driver(
    name: str, driver: str, tmp_path, monkeypatch, request: pytest.FixtureRequest
) -> None:
    if driver == "distributed":
        request.getfixturevalue("one_rank")
    cls, calls = lorakit.get_variant(name), []
    for point in declared_call_points(cls):
        spy(monkeypatch, cls.hook, point, calls)
    if cls.stages is not None:
        spy(monkeypatch, type(cls.stages), "run", calls)
    model, data = adapted(name), dataset()
    first = lorakit.adapted_layers(model)[0][1]
    if first.variant.round_ranks() is not None:
        lorakit.set_rank(model, 2)  # a round's rank, as the federated server sets it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ranks: set[int] = set()
    if first.variant.rank_choices() is not None:  # record the rank each training forward uses
        first.register_forward_hook(
            lambda m, i, o: ranks.add(m.variant.active_rank()) if m.training else None
        )
    refusal = lorakit.get_variant(name).refusal(lorakit.Driver[driver.upper()], lorakit.info(model).config)
    if refusal is not None:
        with pytest.raises(CapabilityError, match=f"variant '{name}'"):
            run_driver(driver, model, data, tmp_path)
        after = trainable(model)
        assert all(torch.equal(after[n], before[n]) for n in after)  # refused before any step
        return
    optimizer = run_driver(driver, model, data, tmp_path)
    after = trainable(model)
    moved = [n for n in after if n in before and not torch.equal(after[n], before[n])]
    assert moved and all(torch.isfinite(t).all() for t in after.values())
    check_declared(name, model, before, optimizer, calls)
    if name in EFFECTS:
        EFFECTS[name](model, before, optimizer, ranks)


def test_every_variant_with_training_rules_has_its_effect_checked() -> None:
    """A variant with a hook or stages has its own mark in EFFECTS (a hook that only preconditions the
    optimizer's gradient, LoRA-FA's, is checked by tests/test_lora_fa_clip_order.py)."""
    ruled = {n for n, cls in lorakit.VARIANTS.items() if cls.hook is not None or cls.stages is not None}
    assert ruled - set(EFFECTS) <= {"lora_fa"}, sorted(ruled - set(EFFECTS))


def test_lora_drop_is_refused_where_its_selection_cannot_run_and_runs_in_the_loop() -> None:
    refused = [
        d
        for d in lorakit.Driver
        if lorakit.get_variant("lora_drop").refusal(d, adapted("lora_drop").lorakit.config)
    ]
    assert lorakit.Driver.LOOP not in refused and lorakit.Driver.DP_SGD in refused
    given = lorakit.apply(Tiny(), "lora_drop", targets=["l0", "l1"], kept=["l0"])  # selection already made
    assert lorakit.get_variant("lora_drop").refusal(lorakit.Driver.DP_SGD, given.lorakit.config) is None


def test_dp_dylora_runs_only_in_federated_clients() -> None:
    """Outside a federated run no server draws its rank: it would be plain LoRA, so every other driver
    refuses it, with the command that runs it."""
    config = adapted("dp_dylora").lorakit.config
    refused = {d: lorakit.get_variant("dp_dylora").refusal(d, config) for d in lorakit.Driver}
    assert refused.pop(lorakit.Driver.FEDERATED) is None
    assert all(reason is not None and "lorakit federate" in reason for reason in refused.values())


def test_a_distributed_run_reaches_the_variant_as_the_distributed_driver(
    one_rank: Distributed, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[lorakit.Driver] = []
    lora = lorakit.get_variant("lora")
    monkeypatch.setattr(lora, "refusal", classmethod(lambda cls, driver, config: seen.append(driver)))
    cfg = TrainConfig(steps=1, batch_size=BATCH, progress=False)
    group = Distributed("ddp", 0, 1, torch.device("cpu"))
    train(adapted("lora"), group.sampler(dataset(), BATCH, 0), cfg, placement=group)
    assert seen and set(seen) == {lorakit.Driver.DISTRIBUTED}
