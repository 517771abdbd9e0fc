"""The final answer of a generated text, and exact match against the reference's.

GSM8K (Cobbe et al., 2021, arXiv:2110.14168) ends every reference solution with ``#### N``; a model's answer
is read the same way when it writes that marker, else as the last number in its text (the usual lenient
reading for models that were not taught the marker). Numbers compare by value after dropping thousands
separators, a currency sign and trailing zeros (``1,000.00`` equals ``1000``, ``3/4`` equals ``0.75``). A
pattern of one's own (``--answer-pattern``) is a regular expression whose first group that took part (or
whole match) is the answer; its last match in a text counts, for the reference and the generation alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext
from fractions import Fraction

from lorakit.common.errors import SettingError

# A number: digits with commas only as thousands separators (``1,234``, not ``1,2,3``), an optional decimal
# part and an optional ``/denominator``; it ends where no digit (or comma and digit) follows, so ``12,5`` or
# ``1,2,3`` is no number of its own. A minus sign counts only where no word or number precedes it (``10-20``
# is a range, its last number 20), nor a number or bracket across spaces (``8 - 3`` is a subtraction, its
# last number 3; ``is -3`` is negative).
_BODY = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+)(?!\d|,\d)"
GSM8K_MARKER = re.compile(rf"####\s*(\$?\s*-?{_BODY})")
NUMBER = re.compile(rf"(?<![\w.])-?\$?\s*{_BODY}")
_OPERAND_BEFORE = re.compile(r"[\d)\]][ \t]*\Z")  # what makes a minus after it a subtraction


def compile_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """``--answer-pattern`` compiled (None: GSM8K's marker, else the last number); a pattern that is not a
    regular expression, or that matches empty text (it would find an answer in every text), is refused."""
    if pattern is None:
        return None
    example = r"pass one whose first group is the answer, e.g. 'answer is (\S+)'"
    try:
        compiled = re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as err:  # a repeat count past C's, a nesting too deep
        raise SettingError(
            f"--answer-pattern {pattern!r} is not a valid regular expression ({err}); {example}"
        ) from None
    if compiled.search("") is not None:
        raise SettingError(
            f"--answer-pattern {pattern!r} matches empty text, so it finds an answer in any text; {example}"
        )
    return compiled


def extract_answer(text: str, pattern: re.Pattern[str] | None = None) -> str | None:
    """The final answer in ``text``: the last match of ``pattern`` (its first group), else by default the
    number after GSM8K's ``####``, else the last number; None when there is none (or the match is blank)."""
    if pattern is not None:
        matches = list(pattern.finditer(text))
        if not matches:
            return None
        taking_part = [g for g in matches[-1].groups() if g is not None]  # none: an optional group
        found = (taking_part or [None])[0] if pattern.groups else matches[-1].group(0)
        return found.strip() if found and found.strip() else None
    marked = GSM8K_MARKER.findall(text)
    if marked:
        return marked[-1].strip()
    numbers = list(NUMBER.finditer(text))
    if not numbers:
        return None
    last = numbers[-1]
    found = last.group()
    if found.startswith("-") and _OPERAND_BEFORE.search(text, max(0, last.start() - 64), last.start()):
        found = found[1:]  # the minus of a subtraction, not the number's sign
    return found.strip()


# Numbers beyond this many digits either side of the point compare as text: the exact form of one with an
# exponent of a billion (``1e999999999``) would not fit in memory.
LONGEST_NUMBER = 1000


def _number(text: str) -> Decimal | None:
    """``text`` as a finite number short enough to write out, else None."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() and abs(value.adjusted()) <= LONGEST_NUMBER else None


def _written(value: Decimal) -> str:
    if value == value.to_integral_value():
        return str(int(value))
    with localcontext() as exact:  # normalize() rounds to the context's precision (28 digits by default)
        exact.prec = len(value.as_tuple().digits)
        return format(value.normalize(), "f")


def normalize(answer: str) -> str:
    """A number by value (``1,000.00`` -> ``1000``, ``$5`` -> ``5``, ``3/4`` -> ``0.75``; a fraction with no
    finite decimal stays ``p/q`` in lowest terms), exact at any length (a model may write a 40-digit run);
    other text stripped and lower-cased."""
    cleaned = answer.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    numerator, _, denominator = cleaned.partition("/")
    top, bottom = _number(numerator), _number(denominator) if denominator else Decimal(1)
    if top is None or bottom is None or bottom == 0:
        return answer.strip().lower()
    if not denominator:
        return _written(top)
    ratio = Fraction(top) / Fraction(bottom)
    rest = ratio.denominator
    for prime in (2, 5):
        while rest % prime == 0:
            rest //= prime
    if rest != 1:  # no finite decimal (1/3): lowest terms
        return f"{ratio.numerator}/{ratio.denominator}"
    with localcontext() as exact:  # a denominator of 2s and 5s: a finite decimal, computed exactly
        exact.prec = len(str(ratio.numerator)) + len(str(ratio.denominator)) + 2
        return _written(Decimal(ratio.numerator) / Decimal(ratio.denominator))


@dataclass(frozen=True)
class Scored:
    """One generation scored against its reference."""

    predicted: str | None
    expected: str | None
    correct: bool


def score(generated: str, reference: str, pattern: re.Pattern[str] | None = None) -> Scored:
    """Exact match of the final answers of ``generated`` and ``reference``."""
    predicted, expected = extract_answer(generated, pattern), extract_answer(reference, pattern)
    correct = predicted is not None and expected is not None and normalize(predicted) == normalize(expected)
    return Scored(predicted, expected, correct)
