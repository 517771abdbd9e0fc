"""LoRA-drop's stages before the main run (arXiv:2402.07721, Sec. 3): sample, score, select, rebuild.

1. Train the adapters (every module kept: plain LoRA) on a stratified sample of the training data.
2. Score each adapted module by the energy of its adapter output over the sample,
   ``g_i = sum over samples and tokens ||dW_i x_i||^2`` (padding tokens excluded), ``I_i = g_i / sum_j g_j``.
3. Keep modules in order of importance until the cumulative importance reaches the threshold.
4. Replace the adapters by fresh ones with that selection (the others share one pair per shape) and restore
   the fully trained modules (a new head) to their initial state, so the main run starts from scratch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

import lorakit
from lorakit.io import undo_apply
from lorakit.train.data import BatchSampler, TokenizedData, eval_batches
from lorakit.train.loop import TrainConfig, train


def stratified_sample(data: TokenizedData, ratio: float, seed: int) -> TokenizedData:
    """``ratio`` of the examples of every class (one stratum for per-token labels), at least one of each."""
    strata: dict[Any, list[int]] = {}
    for i, label in enumerate(data.labels):
        strata.setdefault(label if isinstance(label, int) else None, []).append(i)
    gen = torch.Generator().manual_seed(seed)
    picked: list[int] = []
    for members in strata.values():
        take = max(1, round(ratio * len(members)))
        picked += [members[j] for j in torch.randperm(len(members), generator=gen)[:take].tolist()]
    picked.sort()
    return TokenizedData([data.input_ids[i] for i in picked], [data.labels[i] for i in picked], data.pad_id)


@torch.no_grad()
def importance(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """``g_i = sum ||dW_i x_i||^2`` per adapted module over ``batches`` (model inputs), in eval mode.

    The adapter output is the variant's own forward with a zero base output, so any variant can be scored.
    A batch's ``attention_mask`` excludes padding tokens from layers with features on the last dimension.
    """
    layers = lorakit.adapted_layers(model)
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


def rebuild(model: nn.Module, kept: list[str], heads: dict[str, dict[str, Tensor]]) -> None:
    """Fresh adapters with ``kept`` selected; fully trained modules back to the ``heads`` state dicts."""
    config = dataclasses.replace(lorakit.info(model).config, kept=list(kept))
    undo_apply(model)
    modules = dict(model.named_modules())
    for name, state in heads.items():
        modules[name].load_state_dict(state)
    lorakit.apply(model, config)


def run_stages(model: nn.Module, batches: Any, cfg: TrainConfig) -> dict[str, Any]:
    """All stages on the adapted ``model`` (variant ``lora_drop``); returns the selection and importances."""
    info = lorakit.info(model)
    config = info.config
    if config.kept is not None:  # a selection given in the config: nothing to decide
        return {"kept": list(config.kept)}
    data = getattr(batches, "data", None)
    if not isinstance(data, TokenizedData):
        raise ValueError("LoRA-drop's stages need the training data: pass a lorakit.train.data.BatchSampler")
    sample = stratified_sample(data, config.sample_ratio, cfg.seed)
    steps = config.sample_steps or max(1, round(config.sample_ratio * cfg.steps))
    modules = dict(model.named_modules())
    heads = {n: {k: v.clone() for k, v in modules[n].state_dict().items()} for n in info.train_modules}
    stage1 = dataclasses.replace(cfg, steps=steps, eval_every=0, checkpoint_every=0)
    train(model, BatchSampler(sample, cfg.batch_size, cfg.seed), stage1)
    scores = importance(model, eval_batches(sample, cfg.batch_size))
    kept = select(scores, config.threshold)
    rebuild(model, kept, heads)
    total = sum(scores.values()) or 1.0
    return {"kept": kept, "importance": {n: round(g / total, 6) for n, g in scores.items()}}
