"""Looking at a tuned causal LM: answer extraction, batched greedy generation (equal to transformers' own on
the merged model), and `lorakit eval --generate` / `lorakit generate` end to end on a tiny chat Llama."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from conftest import CHATML, chat_tokenizer, tiny_chat_llama
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.data import chat
from lorakit.eval.generation import generate
from lorakit.eval.scoring import compile_pattern, extract_answer, normalize, score


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("She sold 48/2 = 24 clips.\n#### 72", "72"),
        ("#### 1,234.", "1,234"),
        ("So 3 + 4 = 7 apples, and 7 * 2 = 14 in all.", "14"),  # no marker: the last number
        ("The answer is -3.5 degrees", "-3.5"),
        ("It costs $12 and #### $ 12", "$ 12"),
        ("no number at all", None),
    ],
)
def test_the_final_answer_is_gsm8ks_marker_else_the_last_number(text, answer) -> None:
    assert extract_answer(text) == answer


def test_answers_compare_by_value_and_a_pattern_of_ones_own_counts() -> None:
    assert normalize("1,000.00") == normalize("1000") == "1000"
    assert normalize("$ 12") == "12" and normalize("-3.50") == "-3.5" and normalize("Paris ") == "paris"
    assert score("so #### 1,000", "... #### 1000").correct
    assert not score("#### 999", "#### 1000").correct
    assert not score("I do not know", "#### 3").correct  # nothing to compare is wrong, not right
    pattern = compile_pattern(r"answer is (\w+)")
    assert score("The answer is Paris. Or is it? The answer is Rome", "the answer is rome", pattern).correct
    assert extract_answer("x = 4, y = 5", compile_pattern(r"\d")) == "5"  # no group: the whole last match
    with pytest.raises(lorakit.SettingError, match="answer-pattern"):
        compile_pattern("(unclosed")
    with pytest.raises(lorakit.SettingError, match="is not a valid regular expression"):
        compile_pattern("a{99999999999}")


@pytest.mark.parametrize(
    ("generated", "reference", "correct"),
    [
        ("#### 3/5", "#### 3/4", False),  # a fraction is one number, not its numerator
        ("The answer is 1/4", "The answer is 3/4", False),
        ("#### 0.75", "#### 3/4", True),  # by value
        ("so 1/3 of them", "#### 2/6", True),
        ("#### 1,2,3", "#### 123", False),  # commas separate thousands only
        ("#### 12,5", "#### 125", False),
        ("The answer is 5, which is odd", "#### 5", True),
        ("It takes 10-20 minutes", "#### 20", True),  # a range, not a negative number
        ("x = -5", "#### -5", True),
        ("so it is 8 - 3", "#### 3", True),  # a subtraction across spaces, not a negative number
        ("#### 15", "The difference is 20 - 15", True),
        ("The answer is -3", "#### 3", False),  # after a word the minus is the number's sign
        ("(4 + 4) - 5", "#### 5", True),
        ("The total is 12\n-3 degrees", "#### -3", True),  # a new line starts a number, minus and all
    ],
)
def test_fractions_lists_and_ranges_are_read_as_the_numbers_they_are(generated, reference, correct) -> None:
    assert score(generated, reference).correct is correct


def test_a_pattern_with_alternatives_takes_the_group_that_matched() -> None:
    pattern = compile_pattern(r"answer: (\w+)|#### (\d+)")
    assert extract_answer("#### 42", pattern) == "42" and extract_answer("answer: Rome", pattern) == "Rome"


def test_numbers_of_any_length_compare_exactly() -> None:
    """A degenerate generation writes a 31-digit run: it is scored (wrong), not a crash that loses the run's
    generations, and long numbers compare by every digit, not to 28 significant ones."""
    long = "2" * 31
    assert normalize(long) == long and normalize("1e30") == "1" + "0" * 30
    assert normalize(long) != normalize("2" * 30 + "3")
    assert normalize("3.14159265358979323846264338327950288") == "3.14159265358979323846264338327950288"
    assert normalize("-0") == "0" and normalize("12.000") == "12"
    assert normalize("1e999999999") == "1e999999999"  # too long to write out: compared as text
    assert not score(f"It is {long}", "#### 5").correct and score(f"#### {long}", f"#### {long}").correct


@pytest.fixture(scope="module")
def tuned_chat_model():
    """A tiny chat Llama (fp64, so greedy decoding does not hinge on rounding) with a perturbed LoRA."""
    tokenizer = chat_tokenizer()
    model = tiny_chat_llama(len(tokenizer)).double()
    lorakit.apply(model, "lora", targets="all-linear", rank=4, dropout=0.0)
    with torch.no_grad():
        for _, layer in lorakit.adapted_layers(model):
            layer.variant.B.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return model, tokenizer


def test_batched_generation_equals_transformers_generate_on_the_merged_model(tuned_chat_model) -> None:
    model, tokenizer = tuned_chat_model
    questions = ["What is 2 plus 3?", "Natalia sold 48 clips", "hi", "What is 5 plus 5? Say it in words."]
    examples = [chat.Example(({"role": "user", "content": q},)) for q in questions]
    prompts = [chat.prompt_ids(tokenizer, CHATML, e) for e in examples]
    ours = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3, progress=False)
    merged = lorakit.merge(model, unload=False)
    expected = []
    for ids in prompts:  # one prompt at a time, no padding: transformers' own greedy decoding
        out = merged.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        expected.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip())
    lorakit.unmerge(model)
    assert ours == expected
    assert len({text for text in ours}) > 1  # the prompts got different answers: the check is not vacuous


def _arithmetic_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"question": f"What is {a} plus {b}?", "answer": f"The answer is {a + b}. #### {a + b}"})
    return rows


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_train_then_eval_generate_and_generate_on_a_chat_model(chat_llama_dir, tmp_path, capsys) -> None:
    train = _write(tmp_path / "train.jsonl", _arithmetic_rows(48, 0))
    dev = _write(tmp_path / "dev.jsonl", _arithmetic_rows(8, 1))
    run = tmp_path / "run"
    argv = [
        "train", "--model", str(chat_llama_dir), "--data", train, "--eval-data", dev,
        "--prompt-column", "question", "--response-column", "answer", "--max-length", "128",
        "--steps", "12", "--batch-size", "8", "--lr", "1e-2", "--targets", "all-linear",
        "--output-dir", str(run), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    job = json.loads((run / "job.json").read_text())
    assert job["task"] == "causal-lm"  # inferred from the model's architecture
    assert (run / "chat_template.jinja").read_text() == CHATML  # what eval and generate render prompts with
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["extra"]["tokens_per_second"] > 0 and metrics["extra"]["train_answers_cut"] == 0
    capsys.readouterr()

    assert main(["eval", "--adapter", str(run), "--generate", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert f"loss {metrics['metrics']['loss']:.4f}" in out and "exact match" in out and "/8)" in out
    saved = json.loads((run / "eval" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == saved["exact_match_total"] == 8
    assert saved["exact_match"] == sum(r["correct"] for r in rows) / 8
    assert all(r["expected"] == r["reference"].split("#### ")[1] for r in rows)
    # an evaluation already there is not replaced silently
    assert main(["eval", "--adapter", str(run), "--generate", "--max-new-tokens", "8"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    argv = ["eval", "--adapter", str(run), "--generate", "--generate-limit", "3", "--max-new-tokens", "4"]
    assert main([*argv, "--out", str(tmp_path / "e3")]) == 0
    three = json.loads((tmp_path / "e3" / "metrics.json").read_text())
    assert three["exact_match_total"] == 3 and three["loss"] == pytest.approx(saved["loss"])  # loss on all 8

    assert main(["generate", "--adapter", str(run), "What is 2 plus 3?", "--compare-base"]) == 0
    out = capsys.readouterr().out
    assert "--- tuned" in out and "--- base" in out and "What is 2 plus 3?" in out

    # the base model as it is, on the same data
    base_out = tmp_path / "base-eval"
    argv = [
        "eval", "--model", str(chat_llama_dir), "--data", dev, "--prompt-column", "question",
        "--response-column", "answer", "--max-length", "128", "--generate", "--max-new-tokens", "4",
        "--out", str(base_out),
    ]  # fmt: skip
    assert main(argv) == 0
    base = json.loads((base_out / "metrics.json").read_text())
    assert base["loss"] > metrics["metrics"]["loss"]  # the tuned model fits the answers better


def test_generation_errors_are_one_line(chat_llama_dir, tmp_path, capsys) -> None:
    assert main(["generate", "--model", str(chat_llama_dir)]) == 2
    assert "no prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(chat_llama_dir), "hi", "--compare-base"]) == 2
    assert "--compare-base" in capsys.readouterr().err
    assert main(["eval", "--model", str(chat_llama_dir), "--data", "x.jsonl", "--generate"]) == 2
    assert main(["eval"]) == 2
    assert "--adapter DIR" in capsys.readouterr().err


def test_eval_generate_writes_metrics_the_merged_model_reproduces(chat_llama_dir, tmp_path) -> None:
    """A merged adapter loads in plain transformers with the run's chat template, and answers as the
    adapted model did."""
    train = _write(tmp_path / "train.jsonl", _arithmetic_rows(16, 2))
    run, merged_dir = tmp_path / "run", tmp_path / "merged"
    argv = [
        "train", "--model", str(chat_llama_dir), "--data", train, "--prompt-column", "question",
        "--response-column", "answer", "--max-length", "128", "--steps", "4", "--batch-size", "8",
        "--lr", "1e-2", "--targets", "all-linear", "--output-dir", str(run), "--no-progress",
        "--dropout", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    assert main(["merge", "--adapter", str(run), "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    from lorakit.jobs.saved import load_adapted

    _, adapted, tokenizer = load_adapted(str(run))
    hi = chat.Example(({"role": "user", "content": "hi"},))
    ids = torch.tensor([chat.prompt_ids(tokenizer, CHATML, hi)])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted.eval()(ids).logits, rtol=1e-4, atol=1e-5)


GEMMA_LIKE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_generation_stops_at_the_templates_end_of_turn_not_only_at_the_end_of_sequence() -> None:
    """A base model's tokenizer (end of sequence ``<|endoftext|>``) with ChatML, or turn markers added as
    special tokens that the tokenizer does not name (Gemma's): a tuned model closes its answer with the
    template's marker, and generation ran on past it into a made-up next turn."""
    from tokenizers import AddedToken

    from lorakit.eval.generation import stop_tokens

    tokenizer = chat_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    model = tiny_chat_llama(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat.end_of_turn(tokenizer, CHATML) == im_end and tokenizer.eos_token_id != im_end
    assert im_end in stop_tokens(model, tokenizer, CHATML)
    assert stop_tokens(model, tokenizer, None) == [tokenizer.eos_token_id]
    tokenizer.add_tokens([AddedToken(t, special=True) for t in ("<start_of_turn>", "<end_of_turn>")])
    assert "<end_of_turn>" not in tokenizer.all_special_tokens
    turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert chat.end_of_turn(tokenizer, GEMMA_LIKE) == turn and chat.ends_answers(tokenizer, GEMMA_LIKE)
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert chat.end_of_turn(tokenizer, plain) is None and not chat.ends_answers(tokenizer, plain)


def test_greedy_generation_takes_none_of_the_models_own_decoding_settings(tuned_chat_model) -> None:
    """generation_config.json may hold a repetition penalty (Qwen2.5-Instruct's 1.05-1.1), which transformers
    applies to a greedy search too: answers were then not the greedy ones."""
    model, tokenizer = tuned_chat_model
    questions = ["What is 2 plus 3?", "Natalia sold 48 clips", "hi"]
    examples = [chat.Example(({"role": "user", "content": q},)) for q in questions]
    prompts = [chat.prompt_ids(tokenizer, CHATML, e) for e in examples]
    greedy = generate(model, tokenizer, prompts, template=CHATML, max_new_tokens=12, progress=False)
    own, saved = model.generation_config, copy.deepcopy(model.generation_config)
    own.repetition_penalty, own.no_repeat_ngram_size = 3.0, 1
    try:
        ours = generate(model, tokenizer, prompts, template=CHATML, max_new_tokens=12, progress=False)
        assert model.generation_config is own and own.repetition_penalty == 3.0  # put back as it was
        penalised = []
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
            penalised.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip())
    finally:
        model.generation_config = saved
    assert ours == greedy
    assert penalised != greedy  # the settings do change transformers' answers: the check is not vacuous


def test_a_long_prompt_caps_only_its_own_batch_and_the_cap_is_reported(tuned_chat_model, capsys) -> None:
    # One prompt near the end of the context used to cut every answer's budget to what it left.
    from lorakit.eval.generation import capped_rows
    from lorakit.eval.run import new_tokens

    model, tokenizer = tuned_chat_model
    context = model.config.max_position_embeddings
    questions = ["What is 2 plus 3?", "hi", "What is 5 plus 5?"]
    prompts = [
        chat.prompt_ids(tokenizer, CHATML, chat.Example(({"role": "user", "content": q},))) for q in questions
    ]
    long = (prompts[0] * context)[: context - 4]  # leaves 4 tokens of the context
    budget, limit = new_tokens(model, tokenizer, CHATML, [*prompts, long], 12, "row", 1)
    assert (budget, limit) == (12, context)
    err = capsys.readouterr().err
    assert (
        "1 of 4 answers have fewer than 12 tokens of the model's context" in err and "batch-size" not in err
    )
    assert new_tokens(model, tokenizer, CHATML, [*prompts, long], None, "row", 1) == (256, context)
    assert (
        "answers have fewer" not in capsys.readouterr().err
    )  # the default is "up to 256, within the context"
    assert (
        capped_rows([*prompts, long], 1, 12, context) == 1
        and capped_rows([*prompts, long], 4, 12, context) == 4
    )
    alone = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=1, progress=False)
    budgets, real = [], model.generate
    model.generate = lambda **kw: budgets.append(kw["max_new_tokens"]) or real(**kw)
    try:
        beside = generate(model, tokenizer, [*prompts, long], max_new_tokens=12, batch_size=1, progress=False,
                          context=context)  # fmt: skip
    finally:
        del model.generate
    assert beside[:3] == alone and budgets == [12, 12, 12, 4]  # the short prompts keep their whole budget


def test_json_numbers_are_written_as_plain_decimals() -> None:
    from lorakit.data.datasets import texts

    rows = [{"r": v} for v in (1e-05, 1.0e16, 3.5, 12, 0.1, -2.0)]
    assert texts(rows, "r", "d") == ["0.00001", "10000000000000000", "3.5", "12", "0.1", "-2.0"]
