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

Rows and templates are checked before use, and a problem is one :class:`ChatError` naming the row or the
template and the fix: a message of another shape, an unknown role, a system turn other than the first, turns
that do not alternate, an empty prompt or answer, training data that ends without the assistant's answer; a
template that does not render, renders no assistant turn, rewrites earlier turns, or whose generation prompt
does not open the assistant's turn.

Sequences longer than ``max_length`` are cut at the end. An example whose answer was cut is kept and counted;
one with no answer token left is left out of the data and counted (it would train nothing): both counts are
reported, so truncation never silently drops answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.common.errors import LorakitError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label of a token the loss does not cover


class ChatError(LorakitError):
    """A conversation, a chat template or a tokenizer cannot be used for chat fine-tuning."""


class RenderError(ChatError):
    """A chat template failed on a conversation; the message says how, and callers name the template."""


@dataclass(frozen=True)
class Example:
    """One conversation: its messages (the last is the assistant's answer when it has one). Training covers
    the assistant turns from message ``trained_from`` on: all of them in ``messages`` data, the completion's
    only in TRL's prompt-completion rows, whose prompt may hold earlier assistant turns (as TRL trains)."""

    messages: tuple[Message, ...]
    trained_from: int = 0

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


def examples_from_pairs(
    prompts: Sequence[str],
    responses: Sequence[str] | None,
    source: str = "data",
    columns: tuple[str, str] = ("prompt", "response"),
) -> list[Example]:
    """Prompt/response rows as one user turn and one assistant turn each (only the user turn without
    ``responses``: prompts to answer). An empty or blank prompt or response is refused, naming the row."""
    out = []
    answers = responses if responses is not None else [None] * len(prompts)
    for number, (prompt, response) in enumerate(zip(prompts, answers, strict=True), 1):
        for text, name in ((prompt, columns[0]), (response, columns[1])):
            if text is not None and not text.strip():
                raise ChatError(
                    f"{source} row {number}: '{name}' is empty; give every row text in '{columns[0]}' and "
                    f"'{columns[1]}', or leave the row out"
                )
        turns = ({"role": "user", "content": prompt},)
        out.append(
            Example(turns if response is None else (*turns, {"role": "assistant", "content": response}))
        )
    return out


def examples_from_messages(
    values: Sequence[Any], column: str, source: str, answers: bool = True
) -> list[Example]:
    """``messages`` rows (lists of ``{"role", "content"}``), checked: known roles, text content (not blank for
    the user and the assistant), at most one system turn and only first, user and assistant turns that
    alternate starting with the user, and, with ``answers`` (training and evaluation data), a conversation
    that ends with the assistant's answer."""
    out = []
    for number, value in enumerate(values, 1):
        where = f"{source} row {number}: '{column}'"
        if isinstance(value, str):
            raise ChatError(
                f"{where} is text, not a list of {{'role', 'content'}} messages; write conversations as JSON "
                "(.jsonl or .json): a CSV or TSV cell holds text only"
            )
        if not isinstance(value, list) or not value:
            raise ChatError(f"{where} must be a non-empty list of {{'role', 'content'}} messages")
        messages = [_message(message, f"{where} message {i}") for i, message in enumerate(value, 1)]
        roles = [m["role"] for m in messages]
        if "system" in roles[1:]:
            position = roles.index("system", 1) + 1
            raise ChatError(
                f"{where} message {position} is a system turn; a conversation has at most one, as its first "
                "message"
            )
        turns = roles[1:] if roles[0] == "system" else roles
        if not turns:
            raise ChatError(f"{where} has only a system turn; add the user's turn and the assistant's answer")
        expected = ["user", "assistant"] * (len(turns) // 2 + 1)
        if turns != expected[: len(turns)]:
            raise ChatError(
                f"{where} has turns {turns}: after an optional first system turn, user and assistant turns "
                "must alternate, starting with the user"
            )
        if answers and turns[-1] != "assistant":
            raise ChatError(
                f"{where} ends with a user turn, which nothing answers; end every conversation of training "
                "and evaluation data with the assistant's answer"
            )
        out.append(Example(tuple(messages)))
    return out


def _message(message: Any, where: str) -> Message:
    """One ``{"role", "content"}`` message, checked; the error names the message and what is wrong."""
    if not isinstance(message, dict):
        raise ChatError(
            f"{where} is a JSON {type(message).__name__}, not an object with 'role' and 'content'"
        )
    keys = set(message)
    if keys == {"from", "value"}:
        raise ChatError(
            f"{where} has ShareGPT's 'from' and 'value'; write each message as {{'role', 'content'}} "
            "(role system, user or assistant)"
        )
    missing = [key for key in ("role", "content") if key not in keys]
    if missing:
        raise ChatError(f"{where} has no '{missing[0]}'; write each message as {{'role', 'content'}}")
    extra = sorted(map(str, keys - {"role", "content"}))
    if extra:
        raise ChatError(
            f"{where} has {', '.join(repr(k) for k in extra)} besides 'role' and 'content'; remove it (a "
            "chat template renders only the role and the content)"
        )
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise ChatError(f"{where} has role {role!r}; use one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ChatError(f"{where} ({role}) must have text 'content', not {type(content).__name__}")
    if role != "system" and not content.strip():  # an empty system turn is how one drops a default one
        raise ChatError(f"{where} ({role}) is empty; give it text, or leave the row out")
    return {"role": role, "content": content}


def load_template(choice: str, tokenizer: Any) -> str | None:
    """The chat template to use: ``auto`` (the tokenizer's own, None if it has none), ``none``, or the path
    of a Jinja file; a template is checked (:func:`check_template`) before it is used."""
    if choice == "none":
        return None
    if choice == "auto":
        template = getattr(tokenizer, "chat_template", None)
        if not (isinstance(template, str) and template.strip()):
            return None
        check_template(
            tokenizer, template, "the tokenizer's chat template", "pass --chat-template PATH or none"
        )
        return template
    text = read_template(
        Path(choice), f"chat template {choice}", "pass auto, none or the path of a Jinja file"
    )
    check_template(tokenizer, text, f"chat template {choice}", "fix it, or pass --chat-template auto or none")
    return text


def read_template(path: Path, what: str, fix: str) -> str:
    """The text of a chat template file; a missing, unreadable, non-UTF-8 or empty file is a
    :class:`ChatError` naming ``what`` and ``fix``."""
    if path.is_dir():
        raise ChatError(f"{what} is a directory, not a file; {fix}")
    if not path.is_file():
        raise ChatError(f"{what} is not a file; {fix}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is no template text
    except UnicodeDecodeError:
        raise ChatError(f"{what} is not UTF-8 text; save it as UTF-8, or {fix}") from None
    except OSError as err:
        raise ChatError(f"cannot read {what}: {err.strerror or err}; {fix}") from None
    if not text.strip():
        raise ChatError(f"{what} is empty; {fix}")
    return text


_SAMPLE = ({"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "It is 5."})

REWRITES = (
    "renders a conversation differently from its beginning (it rewrites earlier turns), so the assistant "
    "tokens cannot be found"
)


def check_template(tokenizer: Any, template: str, what: str, fix: str) -> None:
    """Refuse a chat template that cannot serve chat fine-tuning, tried on a sample conversation: one that
    does not render (a Jinja syntax error, or one that raises), one that renders no assistant turn (nothing to
    train), one that rewrites earlier turns, and one whose generation prompt does not open the assistant turn
    (a generated answer would then begin with the turn's header)."""
    try:
        full = render(tokenizer, template, _SAMPLE, generation_prompt=False)
        prompt = render(tokenizer, template, _SAMPLE[:1], generation_prompt=True)
        bare = render(tokenizer, template, _SAMPLE[:1], generation_prompt=False)
    except RenderError as err:
        raise ChatError(f"{what} {err}; {fix}") from None
    no_answer = f"{what} renders no assistant turn, so there is no answer to train on; {fix}"
    if not full.startswith(prompt):
        # the conversation renders as its prompt alone (the generation prompt's opening aside): no answer
        raise ChatError(no_answer if full.strip() == bare.strip() else f"{what} {REWRITES}; {fix}")
    if not full[len(prompt) :].strip():
        raise ChatError(no_answer)
    answer = full[len(prompt) :]
    opens = answer.lstrip().startswith(_SAMPLE[1]["content"])
    if prompt == bare and not opens:
        raise ChatError(
            f"{what} renders nothing for add_generation_prompt but opens the assistant turn with "
            f"{answer[:20]!r}, so generated answers would begin with it (render that opening under "
            f"{{% if add_generation_prompt %}}); {fix}"
        )


def ends_answers(tokenizer: Any, template: str) -> bool:
    """Whether ``template`` closes an assistant answer with one of the tokenizer's special tokens (an
    end-of-turn marker), which the loss then covers: without one, a tuned model never learns where to stop."""
    full, answer = render(tokenizer, template, _SAMPLE, generation_prompt=False), _SAMPLE[1]["content"]
    if answer not in full:  # a template that rewrites the answer's text: nothing to tell from
        return True
    return end_of_turn(tokenizer, template) is not None


def end_of_turn(tokenizer: Any, template: str) -> int | None:
    """The special token ``template`` renders first after an assistant answer (ChatML's ``<|im_end|>``,
    Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``), which a tuned model emits when it is done; None
    when no special token follows the answer. It need not be the tokenizer's end-of-sequence token (a base
    model's tokenizer with a chat template of its own), so generation stops at it too."""
    full, answer = render(tokenizer, template, _SAMPLE, generation_prompt=False), _SAMPLE[1]["content"]
    if answer not in full:
        return None
    after = full[full.rfind(answer) + len(answer) :]
    found = [(after.find(token), token) for token in special_tokens(tokenizer) if token and token in after]
    if not found:
        return None
    token = min(found, key=lambda f: (f[0], -len(f[1])))[1]  # the first; of two there, the longer
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens: those it names, and tokens added as special (Gemma's turn markers)."""
    added = tokenizer.added_tokens_decoder.values()
    return [*tokenizer.all_special_tokens, *(t.content for t in added if t.special)]


def render(tokenizer: Any, template: str, messages: Sequence[Message], generation_prompt: bool) -> str:
    """The conversation as text in ``template``'s format; a template that fails is a :class:`RenderError`
    saying how (its message lacks the subject: callers name the template)."""
    try:
        return tokenizer.apply_chat_template(
            list(messages), chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # a Jinja error in a user's template, or one that raises on these roles
        raise RenderError(
            f"cannot render a conversation ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        ) from None


def prompt_text(tokenizer: Any, template: str | None, example: Example) -> str:
    """What a model is given to answer ``example``: its prompt turns ending in the assistant's opening (with a
    template), or the prompt itself (without one: a single user turn)."""
    if template is not None:
        return render(tokenizer, template, example.prompt, generation_prompt=True)
    if len(example.prompt) != 1 or example.prompt[0]["role"] != "user":
        raise ChatError(
            "a conversation with several turns or a system turn needs a chat template, and none is in use "
            "(--chat-template none, or a tokenizer without one): give one user turn per prompt, or use a "
            "chat template (--chat-template PATH when training, or beside --model)"
        )
    return example.prompt[0]["content"]


def prompt_ids(tokenizer: Any, template: str | None, example: Example) -> list[int]:
    """The token ids a model is given to answer ``example``, tokenised as in training (a template writes its
    own special tokens; a plain prompt gets the tokenizer's)."""
    text = prompt_text(tokenizer, template, example)
    return tokenizer(text, add_special_tokens=template is None)["input_ids"]


def prompts_ids(
    tokenizer: Any, template: str | None, examples: Sequence[Example], what: str
) -> list[list[int]]:
    """:func:`prompt_ids` of every example; one that cannot be rendered is a :class:`ChatError` naming it
    (``what`` and its number: "data.jsonl row 3", "prompt 2")."""
    out = []
    for number, example in enumerate(examples, 1):
        try:
            out.append(prompt_ids(tokenizer, template, example))
        except ChatError as err:
            raise _at(err, f"{what} {number}") from None
    return out


def _at(err: ChatError, where: str) -> ChatError:
    """``err`` about one example, named ``where``."""
    if isinstance(err, RenderError):
        return ChatError(f"{where}: the chat template {err}; fix the template or the row")
    return ChatError(f"{where}: {err}")


def assistant_spans(tokenizer: Any, template: str, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant turns (end-of-turn
    included)."""
    messages = example.messages
    text = render(tokenizer, template, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < example.trained_from:
            continue
        before = render(tokenizer, template, messages[:i], generation_prompt=True)
        upto = render(tokenizer, template, messages[: i + 1], generation_prompt=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ChatError(f"the chat template {REWRITES}; pass another template with --chat-template")
        if len(upto) == len(before):
            raise ChatError(f"the chat template renders nothing for assistant message {i + 1}")
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize_example(tokenizer: Any, template: str | None, example: Example) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example, untruncated; labels are ``-100`` outside the answer."""
    if template is None:
        prompt = tokenizer(prompt_text(tokenizer, None, example), add_special_tokens=True)["input_ids"]
        answer = example.answer
        if answer is None:
            raise ChatError("the conversation has no assistant answer to train on")
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
    for token, (start, end) in zip(ids, encoded["offset_mapping"], strict=True):
        # A token that starts in an answer, or runs into one: a template whose assistant opening ends in a
        # space has the answer's first word tokenised with it (" It"), which is still the answer's.
        inside = any(lo <= start < hi or start < lo < end for lo, hi in spans)
        labels.append(token if inside else IGNORE)
    return ids, labels


def tokenize_examples(
    tokenizer: Any,
    template: str | None,
    examples: Sequence[Example],
    max_length: int,
    source: str = "data",
    keep_unanswered: bool = False,
) -> tuple[list[list[int]], list[list[int]], Truncation]:
    """Every example tokenised and cut to ``max_length``; examples without an answer token left are left
    out (counted in the returned :class:`Truncation`), or with ``keep_unanswered`` kept with no label (DP
    training: the number of examples sets the released sampling rate, so it must be the data's, not how
    many answers fit). An example that cannot be tokenised is a :class:`ChatError` naming its row of
    ``source``."""
    ids_out, labels_out, cut, left_out = [], [], 0, 0
    for number, example in enumerate(examples, 1):
        try:
            ids, labels = tokenize_example(tokenizer, template, example)
        except ChatError as err:
            raise _at(err, f"{source} row {number}") from None
        answered = sum(label != IGNORE for label in labels)
        if answered == 0:
            raise ChatError(f"{source} row {number} has no answer tokens; give it a non-empty response")
        ids, labels = ids[:max_length], labels[:max_length]
        kept = sum(label != IGNORE for label in labels[1:])  # the first token is never predicted
        if kept == 0:
            left_out += 1
            if not keep_unanswered:
                continue
        cut += kept < answered
        ids_out.append(ids)
        labels_out.append(labels)
    return ids_out, labels_out, Truncation(len(examples), cut, left_out, max_length)
