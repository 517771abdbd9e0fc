"""What users feed the LLM path, bad inputs and faults included: every one gets a result that is right, or one
line naming the problem and the fix (exit 2 on the command line, a :class:`LorakitError` in Python), before
anything is trained or generated where it can be; nothing a user saved is lost.

Chat data and chat templates, on the tiny chat Llama of ``conftest``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import CHATML, chat_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.train import chat
from lorakit.train import data as D


def U(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


def A(text: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def S(text: Any) -> dict[str, Any]:
    return {"role": "system", "content": text}


QA = [
    {"question": f"What is {a} plus {b}?", "answer": f"It is {a + b}. #### {a + b}"}
    for a in (1, 2)
    for b in (3, 4)
]
QA_FLAGS = ["--prompt-column", "question", "--response-column", "answer"]


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


def write(path: Path, rows: list[dict[str, Any]] | str | bytes) -> str:
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    elif isinstance(rows, str):
        path.write_text(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train_argv(model: Path, data: str, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model), "--data", data, "--output-dir", str(out), "--steps", "2",
        "--batch-size", "2", "--max-length", "96", "--no-progress", *extra,
    ]  # fmt: skip


def one_line_error(capsys, *parts: str) -> str:
    """The command's stderr: exactly one line, an error (never an internal one) holding every part."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lorakit: error: "), err
    for part in parts:
        assert part in err, err
    return err


# --- chat data: every malformed row is refused naming the row and the fix -----------------------------------
BAD_ROWS = [
    ({"messages": "hello"}, "non-empty list"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"content": "x"}, A("y")]}, "message 1 has no 'role'"),
    ({"messages": [{"role": "user"}, A("y")]}, "message 1 has no 'content'"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}, A("y")]}, "'name' besides 'role'"),
    ({"messages": [{"from": "human", "value": "x"}]}, "ShareGPT's 'from' and 'value'"),
    ({"messages": [U(3), A("y")]}, "text 'content', not int"),
    ({"messages": [U(None), A("y")]}, "text 'content', not NoneType"),
    ({"messages": [U([{"type": "text", "text": "x"}]), A("y")]}, "text 'content', not list"),
    ({"messages": ["hi", A("y")]}, "message 1 is a JSON str"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
    ({"messages": [U("a"), S("b"), A("c")]}, "message 2 is a system turn"),
    ({"messages": [S("a"), S("b"), U("c"), A("d")]}, "message 2 is a system turn"),
    ({"messages": [U("a"), A("b"), U("c")]}, "ends with a user turn"),
    ({"messages": [U("a")]}, "ends with a user turn"),
    ({"messages": [S("a")]}, "only a system turn"),
    ({"messages": [U("a"), A("")]}, "message 2 (assistant) is empty"),
    ({"messages": [U("a"), A(" \n ")]}, "message 2 (assistant) is empty"),
    ({"messages": [U(""), A("b")]}, "message 1 (user) is empty"),
    ({"messages": [A("b")]}, "must alternate"),
    ({"messages": None}, "no 'messages' value"),
    ({"prompt": "a", "response": ""}, "'response' is empty"),
    ({"prompt": "  ", "response": "b"}, "'prompt' is empty"),
    ({"prompt": None, "response": "b"}, "no 'prompt' value"),
    ({"prompt": ["a"], "response": "b"}, "'prompt' must be text, not list"),
    ({"prompt": {"a": 1}, "response": "b"}, "'prompt' must be text, not dict"),
    ({"prompt": True, "response": "b"}, "'prompt' must be text, not bool"),
    ({"prompt": "a", "response": math.nan}, "'response' is nan (a missing value)"),
    ({"prompt": "a"}, "no 'response' value"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_a_malformed_chat_row_is_refused_naming_its_row(row, message, tokenizer) -> None:
    good = {"messages": [U("fine"), A("fine")]} if "messages" in row else {"prompt": "p", "response": "r"}
    rows = [good, row]
    with pytest.raises(LorakitError, match="row 2") as info:
        examples = D.conversations(rows, "messages", "prompt", "response", "data.jsonl")
        D.tokenize_causal(examples, tokenizer, CHATML, 64, "data.jsonl")
    assert message in str(info.value) and "data.jsonl" in str(info.value)


def test_numbers_in_prompt_and_response_columns_are_written_out(tokenizer) -> None:
    examples = D.conversations([{"prompt": 3, "response": 4.5}], "messages", "prompt", "response", "d")
    assert examples[0].messages == (U("3"), A("4.5"))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"messages": [U("a"), A("b")]}, {"prompt": "a", "response": "b"}], "row 2 has no 'messages' value"),
        ([{"prompt": "a", "response": "b"}, {"messages": [U("a"), A("b")]}], "row 2 has no 'prompt' value"),
    ],
)
def test_a_file_that_mixes_formats_is_refused_at_the_first_row_of_the_other(rows, message) -> None:
    with pytest.raises(D.DataError, match=message):
        D.conversations(rows, "messages", "prompt", "response", "d")


def test_data_file_shapes(tmp_path, tokenizer) -> None:
    jsonl = write(tmp_path / "a.jsonl", QA)
    array = write(tmp_path / "a.json", json.dumps(QA))
    assert D.read_rows(array) == D.read_rows(jsonl) == QA  # a JSON array file reads as the same rows
    csv_text = 'question,answer\n"What is 2 plus 3?","First 2.\nThen 3.\n#### 5"\n'
    rows = D.read_rows(write(tmp_path / "multi.csv", csv_text))
    examples = D.conversations(rows, "messages", "question", "answer", "multi.csv")
    data = D.tokenize_causal(examples, tokenizer, CHATML, 96)
    answer = tokenizer.decode(
        [t for t, label in zip(data.input_ids[0], data.labels[0], strict=True) if label >= 0]
    )
    assert answer == "First 2.\nThen 3.\n#### 5<|im_end|>\n"  # a quoted multi-line CSV answer stays whole
    tsv = write(tmp_path / "multi.tsv", 'question\tanswer\n"What is\nit"\t"x"\n')
    with pytest.raises(D.DataError, match="a .tsv field holds no tab or line break"):
        D.read_rows(tsv)
    with pytest.raises(D.DataError, match="not UTF-8"):
        D.read_rows(write(tmp_path / "latin1.jsonl", b'{"question": "caf\xe9", "answer": "x"}\n'))


def test_a_huge_row_is_cut_and_counted_and_one_without_an_answer_token_left_out(tokenizer) -> None:
    rows = [
        {"prompt": "What is 2 plus 3? " * 2000, "response": "5"},
        {"prompt": "hi", "response": "5 " * 900},
    ]
    examples = D.conversations(rows, "messages", "prompt", "response", "big.jsonl")
    data = D.tokenize_causal(examples, tokenizer, CHATML, 64, "big.jsonl")
    assert len(data) == 1 and len(data.input_ids[0]) == 64
    assert data.truncation == chat.Truncation(examples=2, answers_cut=1, left_out=1, max_length=64)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--messages-column", "conversation"], "no column 'conversation' (--messages-column)"),
        (["--prompt-column", "q"], "neither a 'messages' column nor a 'q' column"),
        (["--response-column", "a", "--prompt-column", "question"], "no column 'a'"),
        (["--max-length", "8"], "no example keeps an answer token within max length 8"),
        (["--task", "classification"], "no column 'label'"),
    ],
)
def test_column_length_and_task_flags_that_cannot_work_are_one_line(
    flags, message, chat_llama_dir, tmp_path, capsys
) -> None:
    rows = [{**qa, "prompt": qa["question"], "response": qa["answer"]} for qa in QA]
    rows = [{**r, "chat": [S("Be brief."), U(r["question"]), A(r["answer"])]} for r in rows]
    out = tmp_path / "run"
    assert main(train_argv(chat_llama_dir, write(tmp_path / "d.jsonl", rows), out, *flags)) == 2
    one_line_error(capsys, message)
    assert not out.exists()


# --- chat templates -----------------------------------------------------------------------------------------
NO_GENERATION_PROMPT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
TEMPLATES = [
    ("missing", None, "is not a file"),
    ("empty", "", "is empty"),
    ("blank", " \n", "is empty"),
    ("directory", "DIR", "is a directory"),
    ("binary", b"\xff\xfe\x00", "is not UTF-8 text"),
    ("syntax", "{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),
    ("raises", "{{ raise_exception('no system turns') }}", "no system turns"),
    ("undefined", "{{ foo.bar }}", "UndefinedError"),
    ("constant", "hello", "renders no assistant turn"),
    (
        "no assistant",
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}",
        "renders no assistant turn",
    ),
    ("no generation prompt", NO_GENERATION_PROMPT, "renders nothing for add_generation_prompt"),
    (
        "rewrites",
        "{% for m in messages %}{{ m['content'] | upper if loop.last else m['content'] }}{% endfor %}",
        "rewrites earlier turns",
    ),
]


def _template_path(tmp_path: Path, text: str | bytes | None) -> str:
    path = tmp_path / "template.jinja"
    if text == "DIR":
        path.mkdir()
    elif isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("text", "message"), [t[1:] for t in TEMPLATES], ids=[t[0] for t in TEMPLATES])
def test_a_chat_template_that_cannot_serve_is_refused_before_training(
    text, message, chat_llama_dir, tmp_path, capsys
) -> None:
    path = _template_path(tmp_path, text)
    with pytest.raises(chat.ChatError, match=message):
        chat.load_template(path, chat_tokenizer())
    out = tmp_path / "run"
    argv = train_argv(
        chat_llama_dir, write(tmp_path / "d.jsonl", QA), out, *QA_FLAGS, "--chat-template", path
    )
    assert main(argv) == 2
    one_line_error(capsys, f"chat template {path}", message)
    assert not out.exists()


def test_a_template_that_raises_on_one_row_names_the_row(tokenizer) -> None:
    loop = "{% for message in messages %}"
    boom = "{% if message['content'] == 'boom' %}{{ raise_exception('no boom') }}{% endif %}"
    strict = CHATML.replace(loop, loop + boom)
    rows = [{"prompt": "fine", "response": "ok"}, {"prompt": "boom", "response": "ok"}]
    examples = D.conversations(rows, "messages", "prompt", "response", "d.jsonl")
    with pytest.raises(chat.ChatError, match=r"d.jsonl row 2: the chat template cannot render .*no boom"):
        D.tokenize_causal(examples, tokenizer, strict, 64, "d.jsonl")


# --- fuzzed chat data ---------------------------------------------------------------------------------------
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
VALUE = TEXT | st.integers() | st.floats() | st.none() | st.booleans() | st.lists(TEXT, max_size=2)
ROLE = st.sampled_from(["system", "user", "assistant", "bot"])
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": TEXT}) | st.fixed_dictionaries(
    {}, optional={"role": ROLE | VALUE, "content": VALUE, "name": TEXT}
)
ROWS = st.lists(  # whole files of one shape: conversations (well formed or not) or prompt/response pairs
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=5) | VALUE}), min_size=1, max_size=4
) | st.lists(
    st.fixed_dictionaries({"prompt": VALUE | TEXT, "response": VALUE | TEXT}), min_size=1, max_size=4
)
OUTCOMES: dict[str, int] = {"data": 0, "refused": 0}


@FUZZ
@given(rows=ROWS, answers=st.booleans(), template=st.booleans())
def test_any_chat_rows_are_examples_or_one_clear_error(
    rows: list[dict[str, Any]], answers: bool, template: bool, tokenizer
) -> None:
    """Prompts to answer (``answers`` off) or training data, in a chat template or without one."""
    template_text = CHATML if template else None
    try:
        examples = D.conversations(rows, "messages", "prompt", "response", "d.jsonl", answers=answers)
        if not answers:
            assert len(chat.prompts_ids(tokenizer, template_text, examples, "prompt")) == len(rows)
            OUTCOMES["data"] += 1
            return
        data = D.tokenize_causal(examples, tokenizer, template_text, 48, "d.jsonl")
    except LorakitError as err:
        assert str(err).strip() and "\n" not in str(err).strip()
        OUTCOMES["refused"] += 1
        return
    OUTCOMES["data"] += 1
    assert len(data) + data.truncation.left_out == len(rows)
    for ids, labels in zip(data.input_ids, data.labels, strict=True):
        assert len(ids) == len(labels) <= 48 and any(label >= 0 for label in labels[1:])
    assert all(example.answer.strip() for example in examples)  # no empty answer is ever trained on


def test_the_fuzzed_rows_reach_both_outcomes() -> None:
    """Runs after the fuzz test (file order): it saw tokenised data and refusals alike (it is not vacuous)."""
    if sum(OUTCOMES.values()) == 0:
        pytest.skip("the fuzz test did not run in this session")
    assert OUTCOMES["data"] > 0 and OUTCOMES["refused"] > 0, OUTCOMES
