"""Data reading: files by path with named columns, the demo task, clear errors, padding and exact resume."""

from __future__ import annotations

import pytest
import torch
from conftest import SST2
from transformers import AutoTokenizer

from lorakit.data.datasets import (
    BatchSampler,
    DataError,
    column,
    conversations,
    demo_rows,
    read_rows,
    tokenize_causal,
    tokenize_classification,
)
from lorakit.jobs.models import resolve_model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("minilm"))


def test_reads_tsv_csv_jsonl(tmp_path) -> None:
    (tmp_path / "a.tsv").write_text('text\tlabel\nit "works" well\t1\nnot at all\t0\n')
    (tmp_path / "a.csv").write_text('text,label\n"it, works",1\n')
    (tmp_path / "a.jsonl").write_text('{"prompt": "2+2=", "response": "4"}\n\n')
    assert read_rows(str(tmp_path / "a.tsv"))[0] == {"text": 'it "works" well', "label": "1"}
    assert read_rows(str(tmp_path / "a.csv"))[0]["text"] == "it, works"
    assert read_rows(str(tmp_path / "a.jsonl")) == [{"prompt": "2+2=", "response": "4"}]


def test_sst2_files_read_completely() -> None:
    rows = read_rows(str(SST2 / "test.tsv"))
    assert len(rows) == 872 and set(rows[0]) == {"sentence", "label"}


def test_demo_task_is_balanced_and_held_out() -> None:
    train, test = demo_rows("train"), demo_rows("test")
    assert len(train) == 1800 and len(test) == 360
    assert sum(r["label"] for r in train) == 900
    assert not {r["sentence"] for r in train} & {r["sentence"] for r in test}


def test_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_rows(str(tmp_path / "nope.tsv"))
    with pytest.raises(DataError, match=r"no column 'text'; its columns are \['label', 'sentence'\]"):
        column(demo_rows(), "text", "demo")
    with pytest.raises(DataError, match="lorakit\\[hub\\]|cannot load dataset"):
        read_rows("someone/some-dataset")


def test_classification_batches_pad_and_mask(tokenizer) -> None:
    data = tokenize_classification(demo_rows()[:5], tokenizer, "sentence", "label", 8, "demo")
    batch = data.batch([0, 1, 2])
    assert batch["input_ids"].shape[1] <= 8 and batch["labels"].tolist() == data.labels[:3]
    lengths = [len(data.input_ids[i]) for i in range(3)]
    assert batch["attention_mask"].sum(1).tolist() == lengths


def test_causal_labels_cover_the_response_only(tokenizer) -> None:
    rows = [{"prompt": "good morning", "response": "hello"}]
    data = tokenize_causal(conversations(rows, "messages", "prompt", "response", "x"), tokenizer, None, 32)
    ids, labels = data.input_ids[0], data.labels[0]
    n_prompt = len(tokenizer("good morning")["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]


def test_sampler_state_resumes_the_same_order(tokenizer) -> None:
    data = tokenize_classification(demo_rows()[:50], tokenizer, "sentence", "label", 16, "demo")
    a = BatchSampler(data, 8, seed=3)
    next(a)
    state = a.state_dict()
    expected = [next(a)["input_ids"] for _ in range(10)]
    b = BatchSampler(data, 8, seed=99)
    b.load_state_dict(state)
    assert all(torch.equal(x, next(b)["input_ids"]) for x in expected)
