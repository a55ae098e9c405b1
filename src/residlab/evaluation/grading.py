"""Pull the final answer out of a model's text and decide whether it matches the gold answer."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from fractions import Fraction

logger = logging.getLogger(__name__)

NUMERIC_DATASETS = frozenset({"gsm8k", "synthetic"})
_MATH_VERIFY_TIMEOUT_S = 5


@dataclass(frozen=True)
class Extraction:
    """The answer found in a text (``None`` if none) and the rule that found it."""

    value: str | None
    rule: str  # "boxed" | "hash" | "answer_is" | "last_number" | "none"


# --------------------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASH = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"\banswer\s*(?:is\b\s*:?|:)", re.IGNORECASE)
_NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
# A number not glued to a preceding word or decimal point; "$5", "-3", "1,234", "2.50", "3/4".
_LAST_NUMBER = re.compile(rf"(?<![\w.])(?:-\$?|\$-?)?{_NUMBER}(?:/\d+(?![\d.,]))?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _braced(text: str, start: int) -> str | None:
    """The contents of the ``{...}`` opening at ``text[start]``, matching nested braces; None if unbalanced."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped brace (\{ or \}) does not open or close a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def _boxed_argument(text: str, end: int) -> str | None:
    """The argument of a ``\\boxed`` command ending at ``end``: ``{...}`` or a bare ``\\boxed 5``."""
    i = end
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        return _braced(text, i)
    if i > end:
        bare = re.match(r"[^\s$]+", text[i:])
        return bare.group(0) if bare else None
    return None


def _clean(value: str) -> str:
    """Strip whitespace, ``$`` (also ``\\$``) and thousands separators of a plain number."""
    value = value.strip()
    if value.startswith("\\$"):
        value = value[2:]
    value = value.strip().strip("$").strip()
    if _THOUSANDS.fullmatch(value):
        value = value.replace(",", "")
    return value


def _answer_is_value(rest: str) -> str:
    """The answer after "the answer is": up to the end of the sentence, markdown and ``$`` removed."""
    rest = rest.lstrip(" \t*:\n").split("\n", 1)[0].strip()
    if rest.startswith("$") and not rest.startswith("$$"):
        closing = rest.find("$", 1)
        if closing > 1:
            rest = rest[1:closing]
    else:
        sentence_end = re.search(r"\.(?:\s|$)", rest)
        if sentence_end:
            rest = rest[: sentence_end.start()]
    rest = rest.strip().strip("*").strip().rstrip(".").strip()
    return _clean(rest)


def extract_answer(text: str) -> Extraction:
    """Find the final answer in ``text``.

    Rules, first that fires wins: the last ``\\boxed{...}``/``\\fbox{...}``; the last ``#### X``;
    the last "the answer is X" / "final answer: X" / "**Answer:** X"; the last number.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        argument = _boxed_argument(text, match.end())
        if argument is not None and argument.strip():
            return Extraction(_clean(argument), "boxed")
    for match in reversed(list(_HASH.finditer(text))):
        value = _clean(match.group(1).rstrip().rstrip("."))
        if value:
            return Extraction(value, "hash")
    for match in reversed(list(_ANSWER_IS.finditer(text))):
        value = _answer_is_value(text[match.end() :])
        if value:
            return Extraction(value, "answer_is")
    numbers = _LAST_NUMBER.findall(text)
    if numbers:
        return Extraction(numbers[-1].replace("$", "").replace(",", ""), "last_number")
    return Extraction(None, "none")


# --------------------------------------------------------------------------- numbers

_PLAIN = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_SLASH = re.compile(rf"({_PLAIN.pattern})\s*/\s*({_PLAIN.pattern})")
_FRAC = re.compile(r"(-?)\\[dt]?frac(?:\{\s*(-?[\d.]+)\s*\}|(\d))(?:\{\s*(-?[\d.]+)\s*\}|(\d))")
_LEADING_NUMBER = re.compile(rf"\s*(?:\\?\$)?\s*([-+]?\s*(?:\\?\$)?\s*{_NUMBER}(?:\s*/\s*\d+)?)")


def _to_fraction(text: str | None) -> Fraction | None:
    """Exact value of a plain, fractional or percentage number; None if ``text`` is not one."""
    if text is None:
        return None
    value = text.strip()
    for junk in ("\\$", "$", "\\!", "{,}", "\\%", "%", "\\,"):
        value = value.replace(junk, "" if junk != "{,}" else ",")
    value = value.strip().rstrip(".").strip()
    if _THOUSANDS.fullmatch(value):
        value = value.replace(",", "")
    try:
        if _PLAIN.fullmatch(value):
            return Fraction(value)
        if match := _SLASH.fullmatch(value):
            return Fraction(match.group(1)) / Fraction(match.group(2))
        if match := _FRAC.fullmatch(value):
            sign, num_braced, num_digit, den_braced, den_digit = match.groups()
            result = Fraction(num_braced or num_digit) / Fraction(den_braced or den_digit)
            return -result if sign else result
    except (ValueError, ZeroDivisionError):
        return None
    return None


def parse_number(text: str) -> float | None:
    """A number's value: ``"1,234"`` -> 1234.0, ``"$5.00"`` -> 5.0, ``"50%"`` -> 50.0,
    ``"3/4"`` or ``"\\frac{3}{4}"`` -> 0.75; None if ``text`` is not a number."""
    value = _to_fraction(text)
    if value is None:
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def numbers_equal(a: str | None, b: str | None, rel_tol: float = 1e-6) -> bool:
    """Whether both strings are numbers (see :func:`parse_number`) equal within ``rel_tol``."""
    x, y = _to_fraction(a), _to_fraction(b)
    if x is None or y is None:
        return False
    # Exact rational arithmetic, so huge integers compare correctly instead of overflowing floats.
    return x == y or abs(x - y) <= Fraction(rel_tol) * max(abs(x), abs(y))


def _leading_number(text: str) -> str | None:
    """The number a text starts with, dropping units or words after it (``"72 clips"`` -> ``"72"``)."""
    match = _LEADING_NUMBER.match(text)
    return match.group(1).replace(" ", "") if match else None


# --------------------------------------------------------------------------- matching


def _normalise_text(text: str) -> str:
    text = text.strip().strip("$").rstrip(".")
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac")):
        text = text.replace(old, new)
    return re.sub(r"\s+", "", text).lower()


def _math_verify(gold: str, predicted: str) -> bool:
    """math-verify's symbolic comparison of two bare answers (raises if math-verify is unavailable)."""
    import math_verify

    # math-verify times out with SIGALRM, which only works in the main thread; elsewhere run without it.
    timeout = _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    # Wrapped in \boxed{} so math-verify's LaTeX extraction reads the whole answer as one expression.
    gold_parsed = math_verify.parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    pred_parsed = math_verify.parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def answers_match(predicted: str | None, gold: str, *, dataset: str) -> bool:
    """Whether an extracted answer matches the gold answer. Never raises.

    GSM8K and synthetic problems compare numbers (units after the number are ignored); anything
    else goes through math-verify, falling back to numeric and then string comparison.
    """
    if predicted is None or not predicted.strip():
        return False
    try:
        if dataset in NUMERIC_DATASETS:
            return numbers_equal(predicted, gold) or numbers_equal(_leading_number(predicted), gold)
        try:
            if _math_verify(gold, predicted):
                return True
        except BaseException as exc:  # math-verify's TimeoutException derives from BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            logger.debug("math-verify failed on %r vs %r", predicted, gold, exc_info=True)
            if numbers_equal(predicted, gold):
                return True
        return _normalise_text(predicted) == _normalise_text(gold)
    except Exception:
        logger.debug("could not compare %r with %r", predicted, gold, exc_info=True)
        return False


def grade(text: str, gold: str, *, dataset: str) -> tuple[Extraction, bool]:
    """Extract the answer from ``text`` and check it against ``gold``."""
    try:
        extraction = extract_answer(text)
    except Exception:  # defensive: grading a batch must not stop on one odd text
        logger.debug("answer extraction failed", exc_info=True)
        extraction = Extraction(None, "none")
    return extraction, answers_match(extraction.value, gold, dataset=dataset)
