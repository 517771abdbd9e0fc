"""The loss of a causal language model over its labelled tokens, without full-vocabulary logits.

A causal LM's own forward forms the logits of every position (``N x V`` floats; autograd keeps them and their
softmax) before its loss averages over the labelled ones. Here the backbone's last hidden states are taken
instead, shifted so position ``i`` predicts token ``i + 1``, and only the labelled positions (the answer, in
completion-only fine-tuning) go through the head, a chunk at a time where the fast path is on (the fused
linear cross-entropy of ``lorakit/kernels``, reached through :mod:`lorakit.core.seam`). The loss is returned
as a sum with its token count, so a step can divide by the number of labelled tokens in all its
micro-batches and processes, as one process with the whole batch would (a mean of per-micro-batch means
weighs a short answer's tokens more).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.core.seam import fast_linear_cross_entropy

IGNORE = -100  # the label of a position the loss does not cover
_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
_WRAPPERS: weakref.WeakKeyDictionary[nn.Module, TokenLoss] = weakref.WeakKeyDictionary()


def linear_cross_entropy(hidden: Tensor, head: nn.Module, targets: Tensor) -> Tensor:
    """``sum -log softmax(head(hidden))[targets]`` over the rows whose target is not ``-100`` (in fp32 at
    least)."""
    keep = targets != IGNORE
    rows, wanted = hidden[keep], targets[keep]
    if _plain_linear(head):  # a kernel may then take the head's weight itself
        fast = fast_linear_cross_entropy(rows, head.weight, head.bias, wanted)
        if fast is not None:
            return fast
    logits = head(rows)
    loss_dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(loss_dtype), wanted, reduction="sum")


def _plain_linear(module: nn.Module) -> bool:
    """A head that computes exactly ``x W^T + b`` (no subclass forward, no hook, not adapted)."""
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and not (module._forward_hooks or module._forward_pre_hooks)
    )


def predicted_tokens(labels: Tensor) -> int:
    """How many positions of a batch's per-token ``labels`` the loss covers (the first is never predicted)."""
    return int((labels[..., 1:] != IGNORE).sum())


class TokenLoss(nn.Module):
    """A causal LM run to its summed token loss: ``forward(**batch) -> (loss sum, labelled tokens)``.

    The model stays the only child, so a data-parallel wrapper around this module sees the model's
    parameters and nothing else.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def of(cls, model: nn.Module) -> TokenLoss:
        """The one wrapper of ``model`` (a data-parallel placement wraps a module once)."""
        if model not in _WRAPPERS:
            _WRAPPERS[model] = cls(model)
        return _WRAPPERS[model]

    def forward(self, labels: Tensor, **inputs: Any) -> tuple[Tensor, Tensor]:
        out = self.model.base_model(**inputs, use_cache=False)
        hidden = out[0][:, :-1]  # (batch, seq - 1, d): position i predicts token i + 1
        targets = labels[:, 1:].to(hidden.device)
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.head, targets.reshape(-1))
        return loss, (targets != IGNORE).sum()

    @property
    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()


def takes_token_loss(model: nn.Module) -> bool:
    """Whether ``model`` is a causal LM whose logits are exactly its output head applied to its backbone's
    last hidden state, so :class:`TokenLoss` computes its loss. Checked once per model on a few tokens
    against the model's own forward (a model that scales or caps its logits keeps its own loss)."""
    if model in _CHECKED:
        return _CHECKED[model]
    ok = _looks_causal(model) and _same_logits(model)
    _CHECKED[model] = ok
    return ok


def keeps_mean_token_loss(model: nn.Module) -> bool:
    """Whether ``model`` is a causal LM that keeps its own loss (:func:`takes_token_loss` is False: it caps or
    scales its logits): transformers' mean over the batch's predicted tokens, which times their count is
    their sum again."""
    return _looks_causal(model) and not takes_token_loss(model)


def _looks_causal(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or model.config.is_encoder_decoder:
        return False
    head = model.get_output_embeddings()
    return isinstance(head, nn.Module) and model.base_model is not model and model.can_generate()


@torch.no_grad()
def _same_logits(model: nn.Module) -> bool:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = torch.arange(min(8, vocab), device=device)[None]
        own = model(input_ids=ids, use_cache=False).logits
        hidden = model.base_model(input_ids=ids, use_cache=False)[0]
        mine = model.get_output_embeddings()(hidden)
        return own.shape == mine.shape and torch.allclose(own.float(), mine.float(), rtol=1e-4, atol=1e-5)
    except Exception:  # a forward this check cannot drive: the model keeps its own loss
        return False
    finally:
        model.train(was_training)
