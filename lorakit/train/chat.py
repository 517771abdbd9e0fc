"""Chat-formatted supervised fine-tuning data: conversations, the chat template, and the completion mask.

An instruct model is tuned on the format it was trained in: each example is rendered with the tokenizer's
chat template (the prompt as the user turn, the response as the assistant turn, or a whole ``messages`` list
with an optional system turn), and the loss covers the assistant turns only (every one of them in multi-turn
data), as TRL's ``SFTTrainer`` does for conversational data. The assistant spans are found by rendering each
prefix of the conversation: the turn's tokens are those after ``render(messages[:i],
add_generation_prompt=True)`` and up to ``render(messages[:i + 1])``, the end-of-turn token included, so the
model learns to stop.

Without a template (``--chat-template none``, or a tokenizer that has none) a prompt/response example is the
prompt's tokens followed by the response's and the end-of-sequence token, the loss on the response.

Sequences longer than ``max_length`` are cut at the end. An example whose answer was cut is kept and counted;
one with no answer token left is left out of the data and counted (it would train nothing): both counts are
reported, so truncation never silently drops answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label of a token the loss does not cover


class ChatError(LorakitError):
    """A conversation, a chat template or a tokenizer cannot be used for chat fine-tuning."""


@dataclass(frozen=True)
class Example:
    """One conversation: its messages (the last is the assistant's answer when it has one)."""

    messages: tuple[Message, ...]

    @property
    def prompt(self) -> tuple[Message, ...]:
        """The turns before the last assistant turn (what a model is asked to continue)."""
        return self.messages[:-1] if self.messages[-1]["role"] == "assistant" else self.messages

    @property
    def answer(self) -> str | None:
        """The last assistant turn's text (the reference answer), if the conversation ends with one."""
        last = self.messages[-1]
        return last["content"] if last["role"] == "assistant" else None


@dataclass(frozen=True)
class Truncation:
    """How ``max_length`` cut a data set: examples in all, answers cut short, examples left out (no answer
    token left within ``max_length``)."""

    examples: int
    answers_cut: int
    left_out: int
    max_length: int

    def describe(self, source: str) -> str | None:
        """One line for the user, or None when nothing was cut."""
        if not self.answers_cut and not self.left_out:
            return None
        line = f"{source}: {self.answers_cut} of {self.examples} answers cut at max length {self.max_length}"
        if self.left_out:
            line += f"; {self.left_out} examples with no answer token within it left out"
        return line + " (raise --max-length to keep them whole)"


def examples_from_pairs(prompts: Sequence[str], responses: Sequence[str]) -> list[Example]:
    """Prompt/response rows as one user turn and one assistant turn each."""
    return [
        Example(({"role": "user", "content": p}, {"role": "assistant", "content": r}))
        for p, r in zip(prompts, responses, strict=True)
    ]


def examples_from_messages(values: Sequence[Any], column: str, source: str) -> list[Example]:
    """``messages`` rows (lists of ``{"role", "content"}``), checked: known roles, text content, at most one
    leading system turn, and user and assistant turns that alternate starting with the user."""
    out = []
    for number, value in enumerate(values, 1):
        where = f"{source} row {number}: '{column}'"
        if not isinstance(value, list) or not value:
            raise ChatError(f"{where} must be a non-empty list of {{'role', 'content'}} messages")
        messages = []
        for i, message in enumerate(value):
            if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
                raise ChatError(f"{where} message {i + 1} must be an object with 'role' and 'content'")
            role, content = message["role"], message.get("content")
            if role not in ROLES:
                raise ChatError(f"{where} message {i + 1} has role {role!r}; use one of {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise ChatError(f"{where} message {i + 1} ({role}) must have text 'content'")
            messages.append({"role": role, "content": content})
        turns = (
            [m["role"] for m in messages[1:]]
            if messages[0]["role"] == "system"
            else [m["role"] for m in messages]
        )
        expected = ["user", "assistant"] * (len(turns) // 2 + 1)
        if not turns or turns != expected[: len(turns)]:
            raise ChatError(
                f"{where} has turns {turns}: after an optional first system turn, user and assistant turns "
                "must alternate, starting with the user"
            )
        out.append(Example(tuple(messages)))
    return out


def load_template(choice: str, tokenizer: Any) -> str | None:
    """The chat template to use: ``auto`` (the tokenizer's own, None if it has none), ``none``, or the path
    of a Jinja file."""
    if choice == "none":
        return None
    if choice == "auto":
        template = getattr(tokenizer, "chat_template", None)
        return template if isinstance(template, str) and template.strip() else None
    path = Path(choice)
    if not path.is_file():
        raise ChatError(f"chat template {choice} is not a file; pass auto, none or the path of a Jinja file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ChatError(f"cannot read chat template {choice}: {err}") from None
    if not text.strip():
        raise ChatError(f"chat template {choice} is empty")
    return text


def render(tokenizer: Any, template: str, messages: Sequence[Message], generation_prompt: bool) -> str:
    """The conversation as text in ``template``'s format."""
    try:
        return tokenizer.apply_chat_template(
            list(messages), chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # a Jinja error in a user's template, or one that raises on these roles
        raise ChatError(
            f"the chat template cannot render a conversation ({type(err).__name__}: "
            f"{' '.join(str(err).split())}); fix the template or pass --chat-template none"
        ) from None


def prompt_text(tokenizer: Any, template: str | None, example: Example) -> str:
    """What a model is given to answer ``example``: its prompt turns ending in the assistant's opening (with a
    template), or the prompt itself (without one: a single user turn)."""
    if template is not None:
        return render(tokenizer, template, example.prompt, generation_prompt=True)
    if len(example.prompt) != 1 or example.prompt[0]["role"] != "user":
        raise ChatError("a conversation with several turns needs a chat template; pass --chat-template PATH")
    return example.prompt[0]["content"]


def prompt_ids(tokenizer: Any, template: str | None, example: Example) -> list[int]:
    """The token ids a model is given to answer ``example``, tokenised as in training (a template writes its
    own special tokens; a plain prompt gets the tokenizer's)."""
    text = prompt_text(tokenizer, template, example)
    return tokenizer(text, add_special_tokens=template is None)["input_ids"]


def assistant_spans(tokenizer: Any, template: str, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (end-of-turn included)."""
    messages = example.messages
    text = render(tokenizer, template, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], generation_prompt=True)
        upto = render(tokenizer, template, messages[: i + 1], generation_prompt=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ChatError(
                "the chat template renders a conversation differently from its beginning (it rewrites "
                "earlier turns), so the assistant tokens cannot be found; pass another template with "
                "--chat-template"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize_example(tokenizer: Any, template: str | None, example: Example) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example, untruncated; labels are ``-100`` outside the answer."""
    if template is None:
        prompt = tokenizer(prompt_text(tokenizer, None, example), add_special_tokens=True)["input_ids"]
        answer = example.answer
        if answer is None:
            raise ChatError("a conversation without an assistant turn has nothing to train on")
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        response = tokenizer(answer, add_special_tokens=False)["input_ids"] + eos
        return prompt + response, [IGNORE] * len(prompt) + response
    if not getattr(tokenizer, "is_fast", False):
        raise ChatError(
            "chat fine-tuning needs a fast tokenizer (character offsets locate the assistant turns); load "
            "the model's tokenizer.json or pass --chat-template none"
        )
    text, spans = assistant_spans(tokenizer, template, example)
    # The template writes the special tokens (a BOS included) itself, as TRL tokenises templated text.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = encoded["input_ids"], []
    for token, (start, _) in zip(ids, encoded["offset_mapping"], strict=True):
        inside = any(lo <= start < hi for lo, hi in spans)
        labels.append(token if inside else IGNORE)
    return ids, labels


def tokenize_examples(
    tokenizer: Any, template: str | None, examples: Sequence[Example], max_length: int
) -> tuple[list[list[int]], list[list[int]], Truncation]:
    """Every example tokenised and cut to ``max_length``; examples without an answer token left are left
    out (counted in the returned :class:`Truncation`)."""
    ids_out, labels_out, cut, left_out = [], [], 0, 0
    for example in examples:
        ids, labels = tokenize_example(tokenizer, template, example)
        answered = sum(label != IGNORE for label in labels)
        if answered == 0:
            raise ChatError("an example has no answer tokens; give every example a non-empty response")
        ids, labels = ids[:max_length], labels[:max_length]
        kept = sum(label != IGNORE for label in labels[1:])  # the first token is never predicted
        if kept == 0:
            left_out += 1
            continue
        cut += kept < answered
        ids_out.append(ids)
        labels_out.append(labels)
    return ids_out, labels_out, Truncation(len(examples), cut, left_out, max_length)
