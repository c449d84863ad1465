"""A restricted arithmetic evaluator for program-of-thought answers and calculator annotations.

The expression is parsed with :func:`ast.parse` and the tree is walked node by node: only
numeric literals, ``+ - * / **`` (binary), unary ``+``/``-`` and parentheses (which leave no
node of their own) are allowed. Names, calls, attributes, subscripts, comparisons, strings
and every other node are rejected with :class:`UnsafeExpression`. Nothing is ever passed to
``eval`` or ``exec``.

Arithmetic is exact where it can be: integers and decimal literals become
:class:`fractions.Fraction`, so ``0.1 + 0.2 == 0.3`` holds; a non-integer power falls back to
float. Sizes are bounded so that a hostile program cannot exhaust memory or time:
``|exponent| <= max_exponent``, every intermediate ``|value| <= max_magnitude``, the source
is at most ``max_length`` characters and nests at most ``max_depth`` levels, no number in it
has more than ``max_digits`` digits, and every exact intermediate (numerator and denominator)
has at most ``max_bits`` bits. The magnitude bound alone does not bound work: tiny values
such as ``(1e-300)**64`` carry huge denominators, and ``(((1e-300)**64)**64)**64`` ran for
minutes. Powers are refused *before* they are computed when their result could exceed
``max_bits`` (``|exponent| * bits(base)`` bounds it); the other operations take operands of
at most ``max_bits`` bits, so each costs microseconds, and their results are checked after.
``max_seconds`` is a backstop on the whole evaluation.
"""

from __future__ import annotations

import ast
import math
import re
import time
from fractions import Fraction

Number = Fraction | float

# A number's text is refused beyond this many digits: Python itself refuses to turn more than
# 4,300 digits into an int (a bare ValueError), and no answer or calculator result needs more.
MAX_DIGITS = 1000
# Exact values up to 4096 bits (about 1,200 decimal digits) keep every float literal exact,
# 5e-324 included (~1,080 bits), while each operation stays far below a millisecond.
MAX_BITS = 4096
_LITERAL_DIGITS = re.compile(r"\d[\d_]*")  # 1_000 is one literal in an expression
_TEXT_DIGITS = re.compile(r"\d[\d,]*")  # 1,000,000 is one number in an answer


class EvaluationError(ValueError):
    """The expression is arithmetic but cannot be evaluated (division by zero, overflow)."""


class UnsafeExpression(EvaluationError):
    """The expression contains something other than numbers and + - * / ** ( )."""


_BINARY = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)
_UNARY = (ast.UAdd, ast.USub)


def evaluate(
    source: str,
    *,
    max_exponent: int = 64,
    max_magnitude: float = 1e30,
    max_length: int = 2000,
    max_depth: int = 64,
    max_digits: int = MAX_DIGITS,
    max_bits: int = MAX_BITS,
    max_seconds: float = 1.0,
) -> Number:
    """The value of an arithmetic expression such as ``"(48 / 2) + 48"``.

    Raises :class:`UnsafeExpression` for anything but numbers, ``+ - * / **`` and
    parentheses, and :class:`EvaluationError` for division by zero, an exponent beyond
    ``max_exponent``, a value beyond ``max_magnitude``, a number of more than ``max_digits``
    digits, an exact value of more than ``max_bits`` bits or a run past ``max_seconds``.
    """
    if not isinstance(source, str):
        raise UnsafeExpression(f"expected a string, got {type(source).__name__}")
    if len(source) > max_length:
        raise UnsafeExpression(f"expression longer than {max_length} characters")
    # Before parsing: CPython turns a long int literal into a number while parsing.
    _check_digits(_LITERAL_DIGITS, source, max_digits)
    # Nesting is bounded before parsing: CPython's parser itself recurses per parenthesis.
    depth = 0
    for char in source:
        depth += (char == "(") - (char == ")")
        if depth > max_depth:
            raise UnsafeExpression(f"expression nests deeper than {max_depth} parentheses")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise UnsafeExpression(f"not an arithmetic expression: {exc.__class__.__name__}") from None
    walker = _Walker(max_exponent, max_magnitude, max_depth, max_bits, max_seconds)
    return walker.visit(tree.body, 0)


class _Walker:
    """Every value it returns has passed :meth:`check`, so every operand is bounded."""

    def __init__(
        self,
        max_exponent: int,
        max_magnitude: float,
        max_depth: int,
        max_bits: int,
        max_seconds: float,
    ):
        self.max_exponent = max_exponent
        self.max_magnitude = max_magnitude
        self.max_depth = max_depth
        self.max_bits = max_bits
        self.max_seconds = max_seconds
        self.deadline = time.monotonic() + max_seconds

    def visit(self, node: ast.AST, depth: int) -> Number:
        if depth > self.max_depth:
            raise UnsafeExpression(f"expression nests deeper than {self.max_depth}")
        # A backstop only: the bit bounds keep each step cheap, this keeps their sum bounded.
        if time.monotonic() > self.deadline:
            raise EvaluationError(f"evaluation exceeds its time budget of {self.max_seconds:g} s")
        if isinstance(node, ast.Constant):
            value = node.value
            # bool is an int subclass; True + 1 is not arithmetic on numbers we accept.
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UnsafeExpression(f"literal {value!r} is not a number")
            if isinstance(value, float):
                if not math.isfinite(value):
                    raise EvaluationError(f"literal {value!r} is not finite")
                # The literal's decimal text, not its binary approximation: 0.1 is 1/10.
                return self.check(Fraction(repr(value)))
            return self.check(Fraction(value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, _UNARY):
            value = self.visit(node.operand, depth + 1)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and isinstance(node.op, _BINARY):
            left = self.visit(node.left, depth + 1)
            right = self.visit(node.right, depth + 1)
            return self.check(self.binary(node.op, left, right))
        raise UnsafeExpression(
            f"{type(node).__name__} is not allowed (numbers and + - * / ** only)"
        )

    def binary(self, op: ast.operator, left: Number, right: Number) -> Number:
        if isinstance(op, ast.Add):
            return left + right
        if isinstance(op, ast.Sub):
            return left - right
        if isinstance(op, ast.Mult):
            return left * right
        if isinstance(op, ast.Div):
            if right == 0:
                raise EvaluationError("division by zero")
            return left / right
        return self.power(left, right)

    def power(self, base: Number, exponent: Number) -> Number:
        if abs(exponent) > self.max_exponent:
            raise EvaluationError(f"exponent {float(exponent):g} exceeds {self.max_exponent}")
        if base == 0 and exponent < 0:
            raise EvaluationError("zero to a negative power")
        if isinstance(exponent, Fraction) and exponent.denominator == 1:
            # Bound the result before computing it: |base|**e can be astronomically large,
            # or astronomically small with an astronomically long denominator.
            if base != 0 and int(exponent) * _log10(abs(base)) > math.log10(self.max_magnitude):
                raise EvaluationError(f"value exceeds {self.max_magnitude:g}")
            # n**e has at most e * bits(n) bits, for numerator and denominator alike.
            estimate = abs(int(exponent)) * _bits(base)
            if estimate > self.max_bits:
                raise EvaluationError(
                    f"exact value would need up to {estimate} bits; at most {self.max_bits}"
                )
            try:
                return base ** int(exponent)
            except OverflowError:  # a float base
                raise EvaluationError(f"value exceeds {self.max_magnitude:g}") from None
        if base < 0:
            raise EvaluationError("negative base to a fractional power")
        try:
            return float(base) ** float(exponent)
        except OverflowError:
            raise EvaluationError(f"value exceeds {self.max_magnitude:g}") from None

    def check(self, value: Number) -> Number:
        if isinstance(value, float) and not math.isfinite(value):
            raise EvaluationError("value is not finite")
        if abs(value) > self.max_magnitude:
            raise EvaluationError(f"value exceeds {self.max_magnitude:g}")
        bits = _bits(value)
        if bits > self.max_bits:
            raise EvaluationError(f"exact value needs {bits} bits; at most {self.max_bits}")
        return value


def _bits(value: Number) -> int:
    """The larger bit length of an exact value's numerator and denominator (floats: 0)."""
    if isinstance(value, Fraction):
        return max(value.numerator.bit_length(), value.denominator.bit_length())
    return 0


def check_digits(text: str, max_digits: int = MAX_DIGITS) -> None:
    """Raise :class:`EvaluationError` when a number in ``text`` (an answer, a calculator
    annotation) has more than ``max_digits`` digits."""
    _check_digits(_TEXT_DIGITS, text, max_digits)


def _check_digits(pattern: re.Pattern, text: str, max_digits: int) -> None:
    for match in pattern.finditer(text):
        digits = sum(c.isdigit() for c in match.group())
        if digits > max_digits:
            raise EvaluationError(f"a number of {digits} digits; at most {max_digits}")


def _log10(value: Number) -> float:
    """log10 of a positive number; exact-enough for huge or tiny fractions (no float overflow)."""
    if isinstance(value, Fraction):
        return math.log10(value.numerator) - math.log10(value.denominator)
    return math.log10(value)


# ---------------------------------------------------------------- answers as numbers

_NUMBER = re.compile(r"^[-+]?(\d[\d,]*)?(\.\d+)?$")


def parse_number(text: str, max_digits: int = MAX_DIGITS) -> Fraction | None:
    """A stated answer as an exact number: ``"1,000"``, ``"$18"``, ``"-3.5"``, ``"40%"``;
    None when the text is not a number. Raises :class:`EvaluationError` for a number of more
    than ``max_digits`` digits (not Python's bare ValueError beyond 4,300)."""
    cleaned = text.strip().replace("$", "").replace(" ", "").rstrip(".").rstrip("%")
    if not cleaned or not _NUMBER.match(cleaned) or not any(c.isdigit() for c in cleaned):
        return None
    digits = sum(c.isdigit() for c in cleaned)
    if digits > max_digits:
        raise EvaluationError(f"a number of {digits} digits; at most {max_digits}")
    return Fraction(cleaned.replace(",", ""))


def numbers_equal(a: Number | None, b: Number | None, rel_tol: float = 1e-9) -> bool:
    """Exact for fractions; relative tolerance where a float crept in (fractional powers)."""
    if a is None or b is None:
        return False
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-12)


def normalize_answer(text: str) -> str:
    """A key for voting and matching: the number in canonical form, else the stripped text
    (a number too long to parse is compared as its text)."""
    try:
        value = parse_number(text)
    except EvaluationError:
        value = None
    if value is None:
        return " ".join(text.strip().split()).lower()
    return str(value.numerator) if value.denominator == 1 else str(value)


_ANNOTATION = re.compile(r"<<([^<>]*)>>")


def check_annotations(text: str) -> dict[str, int]:
    """Count GSM8K calculator annotations ``<<expr=result>>`` that evaluate to their result.

    Returns ``{"checked": n, "correct": n, "wrong": n, "unsafe": n}``; an annotation whose
    expression is not plain arithmetic (or whose result is not a number) counts as unsafe.
    """
    counts = {"checked": 0, "correct": 0, "wrong": 0, "unsafe": 0}
    for match in _ANNOTATION.finditer(text):
        counts["checked"] += 1
        expr, sep, result = match.group(1).rpartition("=")
        try:
            stated = parse_number(result)
        except EvaluationError:  # thousands of digits: not a calculator result
            stated = None
        if not sep or stated is None:
            counts["unsafe"] += 1
            continue
        try:
            value = evaluate(expr)
        except EvaluationError:
            counts["unsafe"] += 1
            continue
        # GSM8K results are rounded to a few decimals: compare at the stated precision.
        digits = len(result.strip().partition(".")[2])
        close = round(float(value), digits) == float(stated) if digits else False
        counts["correct" if numbers_equal(value, stated) or close else "wrong"] += 1
    return counts
