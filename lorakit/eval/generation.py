"""Batched greedy generation from a (tuned) causal LM, with the prompts rendered as in training.

Prompts are sorted by length and left-padded in batches, so a batch wastes little on padding and every row's
new tokens start at the same position; transformers' ``generate`` decodes them greedily with its KV cache,
stopping a row at the end-of-sequence token (an instruct model's end-of-turn). The outputs come back in the
order of the prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """The greedy continuation of each prompt (token ids) as text, special tokens left out."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress, unit="prompt")
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding: every row's new tokens start at ``width``
                ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            for r, i in enumerate(rows):
                texts[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return texts
