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
is at most ``max_length`` characters and nests at most ``max_depth`` levels.
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction

Number = Fraction | float


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
) -> Number:
    """The value of an arithmetic expression such as ``"(48 / 2) + 48"``.

    Raises :class:`UnsafeExpression` for anything but numbers, ``+ - * / **`` and
    parentheses, and :class:`EvaluationError` for division by zero, an exponent beyond
    ``max_exponent`` or a value beyond ``max_magnitude``.
    """
    if not isinstance(source, str):
        raise UnsafeExpression(f"expected a string, got {type(source).__name__}")
    if len(source) > max_length:
        raise UnsafeExpression(f"expression longer than {max_length} characters")
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
    return _Walker(max_exponent, max_magnitude, max_depth).visit(tree.body, 0)


class _Walker:
    def __init__(self, max_exponent: int, max_magnitude: float, max_depth: int):
        self.max_exponent = max_exponent
        self.max_magnitude = max_magnitude
        self.max_depth = max_depth

    def visit(self, node: ast.AST, depth: int) -> Number:
        if depth > self.max_depth:
            raise UnsafeExpression(f"expression nests deeper than {self.max_depth}")
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
            # Bound the result before computing it: |base|**e can be astronomically large.
            if base != 0 and int(exponent) * _log10(abs(base)) > math.log10(self.max_magnitude):
                raise EvaluationError(f"value exceeds {self.max_magnitude:g}")
            return base ** int(exponent)
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
        return value


def _log10(value: Number) -> float:
    """log10 of a positive number; exact-enough for huge or tiny fractions (no float overflow)."""
    if isinstance(value, Fraction):
        return math.log10(value.numerator) - math.log10(value.denominator)
    return math.log10(value)


# ---------------------------------------------------------------- answers as numbers

_NUMBER = re.compile(r"^[-+]?(\d[\d,]*)?(\.\d+)?$")


def parse_number(text: str) -> Fraction | None:
    """A stated answer as an exact number: ``"1,000"``, ``"$18"``, ``"-3.5"``, ``"40%"``;
    None when the text is not a number."""
    cleaned = text.strip().replace("$", "").replace(" ", "").rstrip(".").rstrip("%")
    if not cleaned or not _NUMBER.match(cleaned) or not any(c.isdigit() for c in cleaned):
        return None
    return Fraction(cleaned.replace(",", ""))


def numbers_equal(a: Number | None, b: Number | None, rel_tol: float = 1e-9) -> bool:
    """Exact for fractions; relative tolerance where a float crept in (fractional powers)."""
    if a is None or b is None:
        return False
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-12)


def normalize_answer(text: str) -> str:
    """A key for voting and matching: the number in canonical form, else the stripped text."""
    value = parse_number(text)
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
        stated = parse_number(result)
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
