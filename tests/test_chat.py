"""Chat SFT data: the chat template applied, the loss on assistant tokens only (every turn), truncation
counted."""

from __future__ import annotations

import pytest
from conftest import CHATML, chat_tokenizer

from lorakit.data import chat
from lorakit.data.datasets import DataError, conversations, tokenize_causal

IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


def labelled_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])


def test_prompt_response_rows_are_rendered_and_only_the_answer_is_labelled(tokenizer) -> None:
    example = chat.examples_from_pairs(["What is 2 plus 3?"], ["The answer is 5. #### 5"])[0]
    ids, labels = chat.tokenize_example(tokenizer, CHATML, example)
    text = tokenizer.decode(ids)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?"
        "<|im_end|>\n<|im_start|>assistant\nThe answer is 5. #### 5<|im_end|>\n"
    )
    # the answer and its end-of-turn token (so the model learns to stop), nothing of the prompt
    assert labelled_text(tokenizer, ids, labels) == "The answer is 5. #### 5<|im_end|>\n"
    first = labels.index(next(label for label in labels if label != IGNORE))
    assert tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert [label for label in labels if label != IGNORE] == ids[first:]
    # generation starts from exactly the prompt the training sequence begins with
    assert chat.prompt_ids(tokenizer, CHATML, example) == ids[:first]


def test_every_assistant_turn_of_a_multi_turn_conversation_is_labelled(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 plus 4?"},
        {"role": "assistant", "content": "8"},
    ]
    example = chat.examples_from_messages([messages], "messages", "x")[0]
    ids, labels = chat.tokenize_example(tokenizer, CHATML, example)
    assert labelled_text(tokenizer, ids, labels) == "5<|im_end|>\n8<|im_end|>\n"
    text = tokenizer.decode(ids)
    assert "You are a helpful assistant" not in text  # the given system turn replaces the default
    # the user's turns are in the input, not in the loss
    assert "And 4 plus 4?" in text and "4 plus 4" not in labelled_text(tokenizer, ids, labels)
    assert example.answer == "8" and [m["role"] for m in example.prompt][-1] == "user"


def test_without_a_template_the_plain_form_puts_the_loss_on_the_response(tokenizer) -> None:
    example = chat.examples_from_pairs(["good morning"], ["hello"])[0]
    ids, labels = chat.tokenize_example(tokenizer, None, example)
    prompt = tokenizer("good morning")["input_ids"]
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert labelled_text(tokenizer, ids, labels) == "hello<|im_end|>"


def test_chat_template_choice_auto_none_or_a_file(tokenizer, tmp_path) -> None:
    assert chat.load_template("auto", tokenizer) == CHATML
    assert chat.load_template("none", tokenizer) is None
    path = tmp_path / "t.jinja"
    path.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    template = chat.load_template(str(path), tokenizer)
    example = chat.examples_from_pairs(["hi"], ["there"])[0]
    ids, labels = chat.tokenize_example(tokenizer, template, example)
    assert tokenizer.decode(ids) == "[user] hi\n[assistant] there\n"
    assert labelled_text(tokenizer, ids, labels) == "there\n"
    with pytest.raises(chat.ChatError, match="is not a file"):
        chat.load_template(str(tmp_path / "missing.jinja"), tokenizer)


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer) -> None:
    # renders the last message in capitals: a prefix renders differently from the whole conversation
    template = "{% for m in messages %}{{ m['content'] | upper if loop.last else m['content'] }}{% endfor %}"
    example = chat.examples_from_pairs(["hi"], ["there"])[0]
    with pytest.raises(chat.ChatError, match="rewrites"):
        chat.tokenize_example(tokenizer, template, example)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "role 'bot'"),
        ([{"role": "assistant", "content": "b"}], "must alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
        ([{"role": "user", "content": 3}], "text 'content'"),
        ("hello", "is text, not a list of {.role., .content.} messages; write conversations as JSON"),
    ],
)
def test_malformed_conversations_are_refused_naming_the_row(messages, match) -> None:
    with pytest.raises(chat.ChatError, match=match) as info:
        chat.examples_from_messages([messages], "messages", "data.jsonl")
    assert "data.jsonl row 1" in str(info.value)


def test_truncation_counts_cut_answers_and_leaves_out_examples_without_one(tokenizer) -> None:
    pairs = [("What is 2 plus 3?", "The answer is 5. #### 5")] * 3 + [("What is 2 plus 3? " * 8, "5")]
    examples = chat.examples_from_pairs(*zip(*pairs, strict=True))
    full, _ = chat.tokenize_example(tokenizer, CHATML, examples[0])
    prompt = len(chat.prompt_ids(tokenizer, CHATML, examples[0]))
    max_length = prompt + 3  # three answer tokens kept of the short examples; none of the long one
    ids, labels, truncation = chat.tokenize_examples(tokenizer, CHATML, examples, max_length)
    assert truncation == chat.Truncation(examples=4, answers_cut=3, left_out=1, max_length=max_length)
    assert len(ids) == 3 and all(len(row) == max_length for row in ids)
    assert all(sum(label != IGNORE for label in row) == 3 for row in labels)
    line = truncation.describe("train.jsonl")
    assert "3 of 4 answers cut at max length" in line and "1 examples" in line and "--max-length" in line
    assert chat.tokenize_examples(tokenizer, CHATML, examples[:1], len(full))[2].describe("x") is None


def test_rows_with_a_messages_column_or_prompt_and_response_columns(tokenizer) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    assert conversations(rows, "messages", "prompt", "response", "x")[0].answer == "yo"
    rows = [{"question": "hi", "answer": "yo"}]
    examples = conversations(rows, "messages", "question", "answer", "x")
    data = tokenize_causal(examples, tokenizer, CHATML, 64)
    assert labelled_text(tokenizer, data.input_ids[0], data.labels[0]) == "yo<|im_end|>\n"
    with pytest.raises(DataError, match="neither a 'messages' column nor a 'prompt' column"):
        conversations(rows, "messages", "prompt", "response", "x")


def test_trl_prompt_completion_rows_are_read_as_trl_reads_them(tokenizer) -> None:
    """TRL's formats: prompt/completion text, and prompt/completion lists of messages (the loss on the
    assistant turns)."""
    rows = [{"prompt": "hi", "completion": "yo"}]
    examples = conversations(rows, "messages", "prompt", "response", "x")
    assert examples == conversations(
        [{"prompt": "hi", "response": "yo"}], "messages", "prompt", "response", "x"
    )
    both = [{"prompt": "hi", "response": "yo", "completion": "no"}]  # the default column wins
    assert conversations(both, "messages", "prompt", "response", "x")[0].answer == "yo"
    system = {"role": "system", "content": "be brief"}
    user, assistant = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}
    rows = [{"prompt": [system, user], "completion": [assistant]}]
    examples = conversations(rows, "messages", "prompt", "response", "x")
    assert examples[0].messages == (system, user, assistant)
    data = tokenize_causal(examples, tokenizer, CHATML, 64)
    assert labelled_text(tokenizer, data.input_ids[0], data.labels[0]) == "4<|im_end|>\n"
    prompts = conversations([{"prompt": [user]}], "messages", "prompt", "response", "x", answers=False)
    assert prompts[0].messages == (user,)
    with pytest.raises(DataError, match="row 2: 'completion' must be a list of messages .* not str"):
        conversations([*rows, {"prompt": [user], "completion": "4"}], "messages", "prompt", "response", "x")
    empty = [{"prompt": [user, assistant], "completion": []}]
    with pytest.raises(DataError, match="row 1: 'completion' is empty"):
        conversations(empty, "messages", "prompt", "response", "x")
    with pytest.raises(chat.ChatError, match="row 1: 'prompt' \\+ 'completion' has turns \\['user', 'user"):
        conversations([{"prompt": [user], "completion": [user]}], "messages", "prompt", "response", "x")
    # An earlier answer inside the prompt is prompt: only the completion is trained, as TRL trains it
    earlier = {"role": "assistant", "content": "3"}
    rows = [{"prompt": [user, earlier, {"role": "user", "content": "sure?"}], "completion": [assistant]}]
    data = tokenize_causal(conversations(rows, "messages", "prompt", "response", "x"), tokenizer, CHATML, 64)
    assert labelled_text(tokenizer, data.input_ids[0], data.labels[0]) == "4<|im_end|>\n"
    as_messages = [{"messages": [*rows[0]["prompt"], assistant]}]  # every answer of a conversation trains
    data = tokenize_causal(conversations(as_messages, "messages", "p", "r", "x"), tokenizer, CHATML, 64)
    assert labelled_text(tokenizer, data.input_ids[0], data.labels[0]) == "3<|im_end|>\n4<|im_end|>\n"


SPACED = (  # the assistant's opening ends in a space, which the answer's first word is tokenised with
    "{% for m in messages %}{% if m.role == 'user' %}### Question: {{ m.content }}\n"
    "{% else %}### Answer: {{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Answer: {% endif %}"
)


def test_an_answers_first_word_tokenised_with_the_openings_space_is_trained(tokenizer) -> None:
    example = chat.examples_from_pairs(["What is 2 plus 3?"], ["5 is the sum."])[0]
    ids, labels = chat.tokenize_example(tokenizer, SPACED, example)
    assert labelled_text(tokenizer, ids, labels) == " 5 is the sum.<|im_end|>\n"
    ids, labels = chat.tokenize_example(tokenizer, CHATML, example)  # a boundary between tokens: as before
    assert labelled_text(tokenizer, ids, labels) == "5 is the sum.<|im_end|>\n"


def test_a_slow_tokenizer_is_refused_with_the_way_out(tokenizer) -> None:
    class Slow:
        is_fast = False
        chat_template = CHATML

        def apply_chat_template(self, *args, **kwargs):
            return tokenizer.apply_chat_template(*args, **kwargs)

    example = chat.examples_from_pairs(["hi"], ["yo"])[0]
    with pytest.raises(chat.ChatError, match="fast tokenizer"):
        chat.tokenize_example(Slow(), CHATML, example)
