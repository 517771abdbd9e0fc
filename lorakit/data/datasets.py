"""Datasets for training and evaluation: TSV / CSV / JSONL files, Hugging Face dataset ids, a built-in demo.

Classification rows have a text and a label, a class id or a class name (:class:`ClassLabels`); causal-LM
rows a prompt and a response (the loss covers the response tokens only). Texts are tokenised once; batches
are padded to their longest row.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorakit.common.errors import LorakitError
from lorakit.data import chat
from lorakit.data.chat import Truncation


class DataError(LorakitError):
    """A dataset cannot be read or lacks a column; the message names the file and the fix."""


Row = dict[str, Any]
FILE_TYPES = (".tsv", ".csv", ".jsonl", ".json")
_CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB per field) refuses long documents


def read_rows(source: str, *, split: str = "train") -> list[Row]:
    """Rows of a ``.tsv``/``.csv``/``.jsonl`` file, the built-in ``demo`` task or a Hugging Face dataset.

    A ``.json`` file holds JSON lines, or one array of objects. An empty file or a malformed line is a
    :class:`DataError` naming the line; so is a TSV/CSV row with missing or extra fields. JSON rows may carry
    fields beyond those a job reads (an ``id``, a source); a field the job needs is checked where it is read.
    """
    if source == "demo":
        return demo_rows(split)
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataError(
            f"{source} is a directory; pass a data file ({', '.join(FILE_TYPES)}) inside it, a Hugging Face "
            "dataset id or 'demo'"
        )
    if suffix not in FILE_TYPES:
        if path.exists():
            raise DataError(f"{source}: unknown data file type; use one of {', '.join(FILE_TYPES)}")
        return _hub_rows(source, split)
    if not path.exists():
        raise DataError(f"data file {source} does not exist; check the path")
    if not path.is_file():
        raise DataError(
            f"data file {source} is not a regular file (a pipe or a device); save the data to a file"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (spreadsheet exports) is dropped
    except UnicodeDecodeError as err:
        raise DataError(f"{source} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise DataError(f"cannot read {source}: {err.strerror or err}") from None
    rows = _json_rows(text, source) if suffix in (".jsonl", ".json") else _csv_rows(text, source, suffix)
    if not rows:
        raise DataError(f"{source} has no rows; add at least one example (after the header for .tsv/.csv)")
    return rows


def text_lines(text: str) -> list[str]:
    """``text``'s lines, split at line feeds only (a carriage return before one is dropped): what JSON Lines
    and a text file mean by a line. ``str.splitlines`` also splits at U+2028, U+0085 and other breaks, which
    may stand inside a line's text."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _json_rows(text: str, source: str) -> list[Row]:
    """JSON lines (one object per line), or a whole-file array of objects."""
    values = _json_array(text, source)
    if values is not None:
        lines = [(i + 1, v) for i, v in enumerate(values)]
        where = "item"
    else:
        lines, where = [], "line"
        for number, line in enumerate(text_lines(text), 1):
            if not line.strip():
                continue
            try:
                lines.append((number, json.loads(line, object_pairs_hook=_unique_keys)))
            except (ValueError, RecursionError) as err:  # bad JSON, a number past 4300 digits, deep nesting
                raise DataError(
                    f"{source} line {number} is not valid JSON ({_json_problem(err)}); each line must be one "
                    "JSON object"
                ) from None
    rows = []
    for number, value in lines:
        if not isinstance(value, dict):
            raise DataError(
                f"{source} {where} {number} is a JSON {type(value).__name__}, not an object; write each "
                'example as {"field": value, ...}'
            )
        if not _valid_unicode(value):
            raise DataError(
                f"{source} {where} {number} holds text that is not valid Unicode (an escaped lone surrogate "
                "such as \\ud800, half of a pair); fix or remove that text"
            )
        rows.append(value)
    return rows


def _valid_unicode(value: Any) -> bool:
    """Whether every string in a parsed JSON value (keys too) is valid Unicode: JSON's ``\\u`` escapes (four
    hex digits) can spell half of a surrogate pair, which no tokenizer encodes."""
    stack = [value]
    while stack:  # iterative: JSON may nest as deep as the parser allows
        item = stack.pop()
        if isinstance(item, str):
            if not valid_text(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def valid_text(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogate, which JSON escapes and undecodable bytes in a
    command line become): what a tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (with one given twice, the parser would keep the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"key {key!r} is given twice in one object")
        out[key] = value
    return out


def _json_array(text: str, source: str) -> list[Any] | None:
    """The items of a file holding one JSON array; None for JSON lines (which may start with an array)."""
    if not text.lstrip().startswith("["):
        return None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one value per line: read as JSON lines, each line judged on its own
            return None
        raise DataError(f"{source}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except (ValueError, RecursionError) as err:
        raise DataError(f"{source}: not valid JSON ({_json_problem(err)})") from None


def _json_problem(err: ValueError | RecursionError) -> str:
    """What is wrong with a JSON text, in a few words."""
    if isinstance(err, json.JSONDecodeError):
        return err.msg
    if isinstance(err, RecursionError):
        return "values nested too deeply to read"
    if isinstance(err, _DuplicateKey):
        return str(err)
    return f"a number too long to read: {str(err).split(';')[0]}"


def _csv_rows(text: str, source: str, suffix: str) -> list[Row]:
    """Rows of a TSV (tabs, no quoting) or CSV file with a header line; every row has the header's fields."""
    tsv = suffix == ".tsv"
    limit = csv.field_size_limit()
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        reader = csv.reader(
            io.StringIO(text, newline=""),
            delimiter="\t" if tsv else ",",
            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
            strict=True,  # a stray or unclosed quote is an error, not text that runs on into the next rows
        )
        table = [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise DataError(f"{source} line {reader.line_num}: {err}; fix the line") from None
    finally:
        csv.field_size_limit(limit)
    table = [(n, row) for n, row in table if row]  # blank lines
    if not table:
        return []
    header = table[0][1]
    if len(set(header)) != len(header) or not all(h.strip() for h in header):
        raise DataError(f"{source}: the header line {header} must name each column once; fix the first line")
    rows = []
    for number, row in table[1:]:
        if len(row) != len(header):
            sep = "tabs" if tsv else "commas"
            hint = (
                "; a .tsv field holds no tab or line break: put such text in .jsonl or quoted .csv"
                if tsv
                else ""
            )
            raise DataError(
                f"{source} line {number} has {len(row)} field(s) where the header has {len(header)} "
                f"({', '.join(header)}); separate every field with {sep}{hint}"
            )
        rows.append(dict(zip(header, row, strict=True)))
    return rows


def _hub_rows(dataset_id: str, split: str) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"'{dataset_id}' is not a .tsv/.csv/.jsonl file; to load Hugging Face dataset ids install "
            "lorakit[hub] (pip install 'lorakit[hub]')"
        ) from None
    try:
        rows = list(datasets.load_dataset(dataset_id, split=split))
    except Exception as err:  # offline, unknown id, unknown split
        raise DataError(f"cannot load dataset '{dataset_id}' split '{split}': {err}") from None
    if not rows:
        raise DataError(f"dataset '{dataset_id}' split '{split}' has no rows")
    return rows


def column(rows: list[Row], name: str, source: str) -> list[Any]:
    """One field of every row; a clear error naming the available columns, or the first row lacking it."""
    if not rows:
        raise DataError(f"{source} has no rows")
    if name not in rows[0]:
        raise DataError(
            f"{source} has no column '{name}'; its columns are {sorted(rows[0])} "
            "(set --text-column / --label-column / --prompt-column / --response-column)"
        )
    for number, row in enumerate(rows, 1):
        if row.get(name) is None:
            raise DataError(f"{source} row {number} has no '{name}' value; give every row one")
    return [row[name] for row in rows]


def texts(rows: list[Row], name: str, source: str) -> list[str]:
    """A text field of every row: strings (numbers are written out; lists, objects and a number that is not
    finite, a spreadsheet's missing value, are refused)."""
    values = column(rows, name, source)
    for number, value in enumerate(values, 1):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise DataError(f"{source} row {number}: '{name}' must be text, not {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(
                f"{source} row {number}: '{name}' is {value} (a missing value); give every row text"
            )
    return [number_text(v) if isinstance(v, float) else str(v) for v in values]


def number_text(value: float) -> str:
    """A JSON number as plain decimal text (``0.00001``, not Python's ``1e-05``, whose digits an answer
    extractor would misread)."""
    return format(Decimal(repr(value)), "f")


# --- classification labels -------------------------------------------------------------------------------
# The label rules, for every file format, every command and class names given with --labels:
# - a label is a class id or a class name, and one data set uses one or the other;
# - an integer, or a number with nothing after the point (1.0, "1.0"), is a class id; ids count from 0, so a
#   negative one is refused, and so is a number with a fraction (lorakit trains no regression heads);
# - text is stripped of surrounding whitespace; text that is a decimal number ([+-]digits[.digits]) is read as
#   that number, any other text ("pos", "nan", "inf", "1e3") is a class name;
# - text holding a control character (NUL, a line break, an escape) is refused, and so are empty text, true
#   and false, null, lists and mappings.
_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")


def _shown(value: Any) -> str:
    """A label as an error message quotes it: cut short, and a huge integer never converted to text."""
    if isinstance(value, int) and value.bit_length() > 14_000:  # over ~4200 digits: repr() would refuse
        return f"(an integer of {value.bit_length()} bits)"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}... ({len(text)} characters)"


def _label(value: Any, row: int, name: str, source: str) -> int | str:
    """One label as a class id (an integer) or a class name (text), by the rules above."""
    where = f"{source} row {row}: label {_shown(value)} in column '{name}'"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where} is not a class: use integer class ids or class names (text)")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise DataError(f"{source} row {row} has an empty label '{name}'; give every row its class")
        control = next((c for c in text if unicodedata.category(c) == "Cc"), None)
        if control is not None:
            raise DataError(
                f"{where} holds the control character {control!r}; remove it from the file (class names "
                "are plain text)"
            )
        if not _DECIMAL.fullmatch(text):
            return text
        if len(text.lstrip("+-").split(".")[0].lstrip("0")) > len(str(MAX_CLASSES)):
            value = -MAX_CLASSES if text.startswith("-") else MAX_CLASSES  # refused below, never converted
        else:
            value = float(text) if "." in text else int(text)
    if isinstance(value, float):
        if not value.is_integer():  # NaN and infinity too
            raise DataError(
                f"{where} is not a whole number: class ids are 0, 1, ... (lorakit trains no regression heads)"
            )
        value = int(value)
    if value < 0:
        raise DataError(f"{where} is negative: class ids count from 0")
    if value >= MAX_CLASSES:
        raise DataError(
            f"{where} is above {MAX_CLASSES - 1}, the largest class id lorakit takes; fix the label"
        )
    return value


def check_one_step(examples: int, batch_size: int, grad_accum: int = 1, ranks: int = 1) -> None:
    """Refuse training data with fewer examples than one optimizer step's batch (``batch_size`` per
    micro-batch and rank, ``grad_accum`` micro-batches, ``ranks`` processes): the step could not take the
    batch asked for without repeating examples in it."""
    step = batch_size * grad_accum * ranks
    if examples < step:
        parts = [f"--batch-size {batch_size}"]
        parts += [f"--grad-accum {grad_accum}"] if grad_accum > 1 else []
        parts += [f"{ranks} ranks"] if ranks > 1 else []
        raise DataError(
            f"the training data has {examples} examples, fewer than one optimizer step's batch of {step} "
            f"({' x '.join(parts)}); lower --batch-size{' or --grad-accum' if grad_accum > 1 else ''}, or "
            "use more data"
        )


def check_class_names(names: list[str], what: str = "--labels") -> list[str]:
    """Class names given by the user (``--labels``), stripped and checked by the label rules above: each must
    be read as a name, not as a class id, and appear once."""
    read = [_label(n, i, "labels", what) for i, n in enumerate(names, 1)]
    ids = [n for n in read if isinstance(n, int)]
    if ids:
        raise DataError(
            f"{what}: {ids[0]} is a class id, not a name; name classes with text, or leave {what} out when "
            "the data labels its rows with class ids"
        )
    return [str(n) for n in read]


def _labels(rows: list[Row], name: str, source: str) -> list[int | str]:
    return [_label(v, i, name, source) for i, v in enumerate(column(rows, name, source), 1)]


# The most classes a head may have: a million-class head on a 768-wide model is already 3 GB of weights, and
# a larger count is a typo in a label or --num-labels that would otherwise exhaust memory building it.
MAX_CLASSES = 1_000_000


@dataclass(frozen=True)
class ClassLabels:
    """The classes of a classification task: ``count`` of them, and ``names`` (in class-id order) when the
    training data labels its rows by name; ``names`` is None when the labels are the class ids themselves."""

    count: int
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.count < 2:
            raise DataError(
                f"a classification task needs at least 2 classes, got {self.count}; check the label column "
                "and --num-labels (lorakit does not train regression heads)"
            )
        if self.count > MAX_CLASSES:
            raise DataError(
                f"num_labels is {self.count}: lorakit takes at most {MAX_CLASSES} classes; check the label "
                "column and --num-labels"
            )
        if self.names is not None and len(self.names) != self.count:
            raise DataError(
                f"{len(self.names)} class names ({', '.join(self.names[:10])}) but num_labels is "
                f"{self.count}; give one name per class, or drop --num-labels"
            )

    @classmethod
    def from_rows(cls, rows: list[Row], name: str, source: str, count: int | None = None) -> ClassLabels:
        """The classes the training rows use: ids ``0..max`` (or ``count``), or their names sorted."""
        if count is not None:
            cls(count)  # a count below 2 is refused before the rows are read
        labels = _labels(rows, name, source)
        ids = sorted({v for v in labels if isinstance(v, int)})
        names = sorted({v for v in labels if isinstance(v, str)})
        if ids and names:
            raise DataError(
                f"{source}: labels in '{name}' mix class ids ({ids[:3]}) and class names ({names[:3]}); "
                "use one or the other"
            )
        if names:
            if count is not None and count != len(names):
                raise DataError(
                    f"{source} has {len(names)} classes ({', '.join(names[:10])}) but num_labels is {count}; "
                    "drop --num-labels (the data sets it) or fix the labels"
                )
            return cls(len(names), tuple(names))
        if count is not None and ids[-1] >= count:
            raise DataError(
                f"{source}: label {ids[-1]} is outside the {count} classes 0..{count - 1} num_labels allows; "
                f"set --num-labels {ids[-1] + 1} or fix the labels"
            )
        missing = len(ids) < ids[-1] + 1
        if count is None and missing:  # one mistyped id (1000 for 1) would silently make a 1001-class head
            absent = sorted(set(range(ids[-1] + 1)) - set(ids))
            more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
            shown = ", ".join(map(str, absent[:5])) + more
            raise DataError(
                f"{source}: the class ids in '{name}' run up to {ids[-1]} but {shown} never occur; fix the "
                f"labels, or set --num-labels {ids[-1] + 1} if those classes exist"
            )
        return cls(ids[-1] + 1 if count is None else count)

    def ids(self, rows: list[Row], name: str, source: str) -> list[int]:
        """Each row's class id, refusing labels outside these classes (naming the row and the fix)."""
        out = []
        for row, label in enumerate(_labels(rows, name, source), 1):
            if self.names is None:
                if not isinstance(label, int):
                    raise DataError(
                        f"{source} row {row}: label {label!r} is a name but the model's classes are the ids "
                        f"0..{self.count - 1}; use class ids"
                    )
                if label >= self.count:
                    raise DataError(
                        f"{source} row {row}: label {label} is outside the model's {self.count} classes "
                        f"0..{self.count - 1}; fix the labels or train with --num-labels {label + 1}"
                    )
                out.append(label)
            elif str(label) not in self.names:
                shown = ", ".join(self.names[:10])
                raise DataError(
                    f"{source} row {row}: label {label!r} is not one of the classes of the training data "
                    f"({shown}); fix the labels or add the class to the training data"
                )
            else:
                out.append(self.names.index(str(label)))
        return out


@dataclass
class TokenizedData:
    """Token ids per example plus labels (class ids, or per-token targets with -100 on prompt tokens);
    ``truncation``: how ``max_length`` cut a causal-LM data set's answers."""

    input_ids: list[list[int]]
    labels: list[int] | list[list[int]]
    pad_id: int
    truncation: Truncation | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        width = max(len(self.input_ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        token_labels = isinstance(self.labels[0], list)
        labels = torch.full((len(indices), width), -100, dtype=torch.long) if token_labels else None
        for row, i in enumerate(indices):
            n = len(self.input_ids[i])
            ids[row, :n] = torch.tensor(self.input_ids[i])
            mask[row, :n] = 1
            if labels is not None:
                labels[row, :n] = torch.tensor(self.labels[i])
        out = {"input_ids": ids, "attention_mask": mask}
        out["labels"] = labels if labels is not None else torch.tensor([self.labels[i] for i in indices])
        return out


def tokenize_classification(
    rows: list[Row],
    tokenizer: Any,
    text_column: str,
    label_column: str,
    max_length: int,
    source: str,
    classes: ClassLabels | None = None,
) -> TokenizedData:
    """Token ids and class ids; ``classes`` maps the labels to ids and bounds them (default: the labels are
    class ids, unbounded)."""
    if classes is None:
        labels = _labels(rows, label_column, source)
        named = [v for v in labels if isinstance(v, str)]
        if named:
            raise DataError(
                f"{source}: label {named[0]!r} is a class name, but no class names are known for this model; "
                "give class ids (0, 1, ...) in the model's order, or use an adapter trained on these labels "
                "(in Python: classes=ClassLabels.from_rows(training rows))"
            )
    else:
        labels = classes.ids(rows, label_column, source)
    text = texts(rows, text_column, source)
    ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return TokenizedData(ids, labels, tokenizer.pad_token_id or 0)


MESSAGES_COLUMN = "messages"  # the default conversations column: rows without it are prompt/response rows
PROMPT_COLUMN, RESPONSE_COLUMN = "prompt", "response"  # the default columns of prompt/response rows
COMPLETION_COLUMN = "completion"  # TRL's name for the response column, read where the default one is absent


def conversations(
    rows: list[Row],
    messages_column: str,
    prompt_column: str,
    response_column: str,
    source: str,
    answers: bool = True,
    named: bool = False,
) -> list[chat.Example]:
    """Causal-LM rows as conversations: a ``messages`` column (multi-turn, optional system turn) where the
    rows have one, else prompt/response columns (one user and one assistant turn). With ``answers`` (training
    and evaluation data) every conversation must end with the assistant's answer; without (prompts to answer)
    the response column may be absent and a conversation may end with the user's turn. ``named``: the prompt
    and response columns are the user's settings for this data (a training job's), so data with conversations
    refuses columns other than the defaults rather than passing them over."""
    if rows and messages_column in rows[0]:
        pairs = ((prompt_column, PROMPT_COLUMN), (response_column, RESPONSE_COLUMN))
        ignored = [c for c, default in pairs if c != default] if named else []
        if ignored:
            raise DataError(
                f"{source} has a '{messages_column}' column, whose conversations are used instead of the "
                f"prompt and response columns, so '{ignored[0]}' would be ignored; drop --prompt-column and "
                f"--response-column, or name data without a '{messages_column}' column"
            )
        values = column(rows, messages_column, source)
        return chat.examples_from_messages(values, messages_column, source, answers)
    if rows and messages_column != MESSAGES_COLUMN:  # named on purpose: no silent fall-back to other columns
        raise DataError(
            f"{source} has no column '{messages_column}' (--messages-column); its columns are "
            f"{sorted(rows[0])}"
        )
    if answers and prompt_column == response_column:
        raise DataError(
            f"the prompt and the response column are both '{prompt_column}': the answers would be the "
            "prompts; name the response column with --response-column"
        )
    if rows and prompt_column not in rows[0]:
        raise DataError(
            f"{source} has neither a '{messages_column}' column nor a '{prompt_column}' column; its columns "
            f"are {sorted(rows[0])} (set --messages-column, or --prompt-column and --response-column)"
        )
    if rows and response_column == RESPONSE_COLUMN and RESPONSE_COLUMN not in rows[0]:
        if COMPLETION_COLUMN in rows[0]:  # TRL's prompt-completion data
            response_column = COMPLETION_COLUMN
    if rows and isinstance(rows[0][prompt_column], list):  # TRL's conversational prompt-completion data
        turns, starts = _prompt_completion_turns(rows, prompt_column, response_column, source, answers)
        where = f"{prompt_column}' + '{response_column}"
        examples = chat.examples_from_messages(turns, where, source, answers)
        return [replace(e, trained_from=n) for e, n in zip(examples, starts, strict=True)]
    prompts = texts(rows, prompt_column, source)
    responses = texts(rows, response_column, source) if answers or response_column in rows[0] else None
    return chat.examples_from_pairs(prompts, responses, source, (prompt_column, response_column))


def _prompt_completion_turns(
    rows: list[Row], prompt_column: str, response_column: str, source: str, answers: bool
) -> tuple[list[list[Any]], list[int]]:
    """Each row's conversation as its prompt's turns followed by its completion's (lists of messages, TRL's
    conversational prompt-completion form), and where each completion starts; without ``answers`` the
    completion may be absent."""
    prompts = column(rows, prompt_column, source)
    completions = column(rows, response_column, source) if answers or response_column in rows[0] else None
    out = []
    for number, prompt in enumerate(prompts, 1):
        completion = completions[number - 1] if completions is not None else []
        for value, name in ((prompt, prompt_column), (completion, response_column)):
            if not isinstance(value, list):
                raise DataError(
                    f"{source} row {number}: '{name}' must be a list of messages like the first row's "
                    f"'{prompt_column}', not {type(value).__name__}"
                )
        if answers and not completion:  # only the completion trains: a row without one trains nothing
            raise DataError(
                f"{source} row {number}: '{response_column}' is empty; give every row the assistant's "
                "answer, or leave the row out"
            )
        out.append([*prompt, *completion])
    return out, [len(prompt) for prompt in prompts]


def tokenize_causal(
    examples: list[chat.Example],
    tokenizer: Any,
    template: str | None,
    max_length: int,
    source: str = "data",
    keep_unanswered: bool = False,
) -> TokenizedData:
    """Conversations as token ids with the loss on the assistant turns (see :mod:`lorakit.data.chat`;
    ``keep_unanswered``: :func:`~lorakit.data.chat.tokenize_examples`)."""
    ids, labels, truncation = chat.tokenize_examples(
        tokenizer, template, examples, max_length, source, keep_unanswered
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return TokenizedData(ids, labels, pad, truncation)


class BatchSampler:
    """Endless shuffled batches from a seeded generator whose state is checkpointed for exact resume.

    With ``group_by_length`` each epoch's shuffled examples are taken in runs of ``64 * batch_size``, sorted
    by length within the run and cut into batches, and the batches are shuffled: a batch then holds examples
    of similar length, so little of it is padding (transformers' ``LengthGroupedSampler`` does the same).
    """

    GROUP = 64  # batches per sorted run

    def __init__(
        self, data: TokenizedData, batch_size: int, seed: int, group_by_length: bool = False
    ) -> None:
        self.data, self.batch_size, self.group_by_length = data, batch_size, group_by_length
        self.generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        return self.data.batch(self.next_indices())

    def next_indices(self) -> list[int]:
        """The example indices of the next batch (epochs reshuffled; a batch may span two epochs)."""
        if len(self._order) < self.batch_size:
            self._order += self._epoch()
        take, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return take

    def _epoch(self) -> list[int]:
        order = torch.randperm(len(self.data), generator=self.generator).tolist()
        if not self.group_by_length:
            return order
        size, run = self.batch_size, self.batch_size * self.GROUP
        batches = []
        for start in range(0, len(order), run):
            chunk = sorted(order[start : start + run], key=lambda i: -len(self.data.input_ids[i]))
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        shuffled = torch.randperm(len(batches), generator=self.generator).tolist()
        return [i for b in shuffled for i in batches[b]]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": torch.tensor(self._order, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._order = state["order"].tolist()


def eval_batches(data: TokenizedData, batch_size: int) -> Iterator[dict[str, Tensor]]:
    for start in range(0, len(data), batch_size):
        yield data.batch(list(range(start, min(start + batch_size, len(data)))))


# --- the built-in demo task ----------------------------------------------------------------------------
_POSITIVE = [
    "a delight",
    "wonderful",
    "moving and funny",
    "beautifully made",
    "a joy to watch",
    "sharp and warm",
    "clever",
    "touching",
    "brilliant",
    "full of life",
    "gorgeous",
    "smart and tender",
    "a small gem",
    "charming",
    "gripping from start to end",
    "honest and kind",
    "fresh",
    "deeply satisfying",
]
_NEGATIVE = [
    "a mess",
    "dull",
    "tedious and flat",
    "badly made",
    "a chore to sit through",
    "lifeless",
    "clumsy",
    "boring",
    "awful",
    "empty",
    "ugly",
    "stiff and cold",
    "a waste of time",
    "tiresome",
    "confused from start to end",
    "cynical and mean",
    "stale",
    "deeply disappointing",
]
_SUBJECTS = [
    "the film",
    "this movie",
    "the story",
    "the acting",
    "the script",
    "the ending",
    "the soundtrack",
    "the direction",
    "the cast",
    "the second half",
    "this sequel",
    "the pacing",
]
_FRAMES = [
    "{s} is {p} .",
    "{s} feels {p} .",
    "honestly , {s} is {p} .",
    "i thought {s} was {p} .",
    "{s} turned out {p} .",
]


def demo_rows(split: str = "train") -> list[Row]:
    """A small sentiment task built from phrase templates: 1,800 training rows, 360 test rows.

    Held-out rows use subject/frame pairs never seen in training, so the test checks generalisation.
    """
    rows = []
    for si, subject in enumerate(_SUBJECTS):
        for fi, frame in enumerate(_FRAMES):
            held_out = (si + fi) % 6 == 0
            if held_out != (split != "train"):
                continue
            for label, phrases in ((1, _POSITIVE), (0, _NEGATIVE)):
                rows += [{"sentence": frame.format(s=subject, p=p), "label": label} for p in phrases]
    random.Random(0).shuffle(rows)
    return rows
