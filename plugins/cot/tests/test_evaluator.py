"""The restricted arithmetic evaluator: arithmetic in, everything else out, sizes bounded."""

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kd_cot.evaluator import (
    EvaluationError,
    UnsafeExpression,
    check_annotations,
    evaluate,
    normalize_answer,
    parse_number,
)


@pytest.mark.parametrize(
    ("source", "value"),
    [
        ("48/2 + 48", Fraction(72)),
        ("(3 + 4) * 5", Fraction(35)),
        ("2 ** 10", Fraction(1024)),
        ("-(2 - 7)", Fraction(5)),
        ("+3", Fraction(3)),
        ("0.1 + 0.2", Fraction(3, 10)),  # exact decimals, not binary floats
        ("10 / 4", Fraction(5, 2)),
        ("2 ** -2", Fraction(1, 4)),
        ("((1))", Fraction(1)),
        ("1e3 * 2", Fraction(2000)),
    ],
)
def test_accepts_arithmetic(source, value):
    assert evaluate(source) == value


def test_fractional_power_falls_back_to_float():
    assert evaluate("4 ** 0.5") == pytest.approx(2.0)


@pytest.mark.parametrize(
    "source",
    [
        "x + 1",  # a name
        "abs(-3)",  # a call
        "__import__('os').system('true')",
        "(1).real",  # an attribute
        "[1, 2][0]",  # a subscript
        "'a' * 3",  # a string
        "True + 1",  # a bool is not a number here
        "1 if 1 else 2",
        "lambda: 1",
        "1 < 2",
        "7 // 2",  # floor division is not on the list
        "7 % 2",
        "1 & 3",
        "1j * 2",  # complex
        "x = 3",  # a statement
        "",
        "(" * 200 + "1" + ")" * 200,  # nesting beyond the bound
    ],
)
def test_rejects_everything_but_arithmetic(source):
    with pytest.raises(UnsafeExpression):
        evaluate(source)


@pytest.mark.parametrize("source", ["2 ** 100000", "9 ** 9 ** 9", "10 ** 65", "(10 ** 20) ** 2"])
def test_rejects_huge_exponents_and_values(source):
    with pytest.raises(EvaluationError):
        evaluate(source)


def test_division_by_zero_is_an_error_not_a_crash():
    with pytest.raises(EvaluationError, match="division by zero"):
        evaluate("1 / (2 - 2)")


def test_never_calls_eval(monkeypatch):
    import builtins

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert evaluate("6 * 7") == 42


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(-(10**6), 10**6), st.integers(-(10**6), 10**6), st.sampled_from("+-*"))
def test_matches_integer_arithmetic(a, b, op):
    expected = {"+": a + b, "-": a - b, "*": a * b}[op]
    assert evaluate(f"({a}) {op} ({b})") == expected


def test_numbers_and_annotations():
    assert parse_number("1,000") == 1000
    assert parse_number("$18.50") == Fraction(37, 2)
    assert parse_number("seven") is None
    assert normalize_answer("1,000") == normalize_answer("1000.0") == "1000"
    counts = check_annotations("a <<48/2=24>>24, b <<2*3=7>>7, c <<len(x)=3>>3, d <<1/3=0.33>>")
    assert counts == {"checked": 4, "correct": 2, "wrong": 1, "unsafe": 1}
