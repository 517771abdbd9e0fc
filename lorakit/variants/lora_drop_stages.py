"""LoRA-drop's stages before the main run (arXiv:2402.07721, Sec. 3): sample, score, select, rebuild.

1. Train the adapters (every module kept: plain LoRA) on a stratified sample of the training data.
2. Score each adapted module by the energy of its adapter output over the sample,
   ``g_i = sum over samples and tokens ||dW_i x_i||^2`` (padding tokens excluded), ``I_i = g_i / sum_j g_j``.
3. Keep modules in order of importance until the cumulative importance reaches the threshold.
4. Replace the adapters by fresh ones with that selection (the others share one pair per shape) and restore
   the fully trained modules (a new head) to their initial state, so the main run starts from scratch.

The stages use only the contract (:class:`lorakit.core.contract.StageContext`): the driver trains, batches
the data and rebuilds the adapters, so this file runs unchanged in every driver that runs stages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.core.config import VariantConfig
from lorakit.core.contract import StageContext, Stages
from lorakit.core.layer import AdaptedLayer


def stratified_sample(strata: list[Hashable], ratio: float, seed: int) -> list[int]:
    """Sorted indices of ``ratio`` of the examples of every stratum (class), at least one of each."""
    groups: dict[Hashable, list[int]] = {}
    for i, stratum in enumerate(strata):
        groups.setdefault(stratum, []).append(i)
    gen = torch.Generator().manual_seed(seed)
    picked: list[int] = []
    for members in groups.values():
        take = max(1, round(ratio * len(members)))
        picked += [members[j] for j in torch.randperm(len(members), generator=gen)[:take].tolist()]
    return sorted(picked)


@torch.no_grad()
def importance(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """``g_i = sum ||dW_i x_i||^2`` per adapted module over ``batches`` (model inputs), in eval mode.

    The adapter output is the variant's own forward with a zero base output, so any variant can be scored.
    A batch's ``attention_mask`` excludes padding tokens from layers with features on the last dimension.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]
    scores = {name: torch.zeros((), dtype=torch.float64) for name, _ in layers}
    mask: list[Tensor | None] = [None]

    def record(name: str):
        def hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            delta = layer.variant(inputs[0], torch.zeros_like(output), layer).double().square()
            m = mask[0]
            if m is not None and layer.kind.features_last and delta.shape[:-1] == m.shape:
                delta = delta * m[..., None].to(delta)  # (batch, tokens, out) with padding zeroed
            scores[name] += delta.sum().cpu()

        return hook

    handles = [layer.register_forward_hook(record(name)) for name, layer in layers]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            mask[0] = batch["attention_mask"].to(device) if "attention_mask" in batch else None
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: float(g) for name, g in scores.items()}


def select(scores: dict[str, float], threshold: float) -> list[str]:
    """Modules by decreasing normalised importance until the cumulative sum reaches ``threshold``.

    If every score is zero nothing tells the modules apart, and all are kept.
    """
    total = sum(scores.values())
    if total <= 0:
        return list(scores)
    kept, cumulative = [], 0.0
    for name in sorted(scores, key=lambda n: -scores[n]):  # stable: ties keep module order
        kept.append(name)
        cumulative += scores[name] / total
        if cumulative >= threshold - 1e-9:
            break
    return kept


class LoRADropStages(Stages):
    """Sample, score, select, rebuild (the module docstring); a selection given in the config is kept."""

    def pending(self, config: VariantConfig) -> bool:
        return config.kept is None  # a selection given in the config: nothing to decide

    def run(self, ctx: StageContext) -> dict[str, Any]:
        config = ctx.config()
        if not self.pending(config):
            return {"kept": list(config.kept)}
        sample = stratified_sample(ctx.strata(), config.sample_ratio, ctx.seed)
        ctx.train(sample, config.sample_steps or max(1, round(config.sample_ratio * ctx.steps)))
        scores = importance(ctx.model, ctx.batches(sample))
        kept = select(scores, config.threshold)
        ctx.reapply(dataclasses.replace(config, kept=kept))
        total = sum(scores.values()) or 1.0
        return {"kept": kept, "importance": {n: round(g / total, 6) for n, g in scores.items()}}
