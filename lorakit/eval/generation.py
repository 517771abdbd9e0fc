"""Batched greedy generation from a (tuned) causal LM, with the prompts rendered as in training.

Prompts are sorted by length and left-padded in batches, so a batch wastes little on padding and every row's
new tokens start at the same position; transformers' ``generate`` decodes them greedily with its KV cache,
stopping a row at an end-of-sequence token (an instruct model's end-of-turn). The outputs come back in the
order of the prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from lorakit.data.chat import end_of_turn


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    template: str | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    progress: bool = True,
    context: int | None = None,
) -> list[str]:
    """The greedy continuation of each prompt (token ids, rendered in the chat ``template`` if any) as text,
    special tokens left out; a batch whose prompts leave less of the model's ``context`` than
    ``max_new_tokens`` stops where the context ends (see :func:`capped_rows`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop = stop_tokens(model, tokenizer, template)
    # Greedy decoding as such: none of the model's own decoding settings (generation_config.json's repetition
    # penalty, say, which transformers would apply to a greedy search too) changes the answers.
    own = model.generation_config
    # Padding is masked out and left of every prompt, so any id serves where the tokenizer names none.
    pad = next(i for i in (tokenizer.pad_token_id, *stop, 0) if i is not None)
    texts: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress, unit="prompt")
    try:
        model.generation_config = GenerationConfig()
        for rows in batches(prompts, batch_size):
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding: every row's new tokens start at ``width``
                ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens if context is None else min(max_new_tokens, context - width),
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=stop or None,
            )
            for r, i in enumerate(rows):
                texts[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()
            bar.update(len(rows))
    finally:
        bar.close()
        model.generation_config = own
        model.train(was_training)
    return texts


def batches(prompts: Sequence[list[int]], batch_size: int) -> list[list[int]]:
    """The prompts' indices in generation batches: sorted by length, so a batch pads little."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def capped_rows(prompts: Sequence[list[int]], batch_size: int, max_new_tokens: int, context: int) -> int:
    """How many prompts :func:`generate` answers with fewer than ``max_new_tokens`` tokens: those batched
    with a prompt that leaves less of the ``context`` (a batch's new tokens start after its longest)."""
    return sum(
        len(rows)
        for rows in batches(prompts, batch_size)
        if max(len(prompts[i]) for i in rows) + max_new_tokens > context
    )


def stop_tokens(model: nn.Module, tokenizer: Any, template: str | None) -> list[int]:
    """The tokens that end an answer: the tokenizer's end-of-sequence token, those of the model's generation
    config, and the end-of-turn token the chat ``template`` closes an answer with (an instruct model's
    end-of-turn may be any of them); none: answers run to ``max_new_tokens``."""
    config = model.generation_config.eos_token_id if model.generation_config is not None else None
    turn = None if template is None else end_of_turn(tokenizer, template)
    ids = [tokenizer.eos_token_id, *(config if isinstance(config, list) else [config]), turn]
    return list(dict.fromkeys(i for i in ids if i is not None))
