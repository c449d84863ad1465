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


# ---------------------------------------------------------------- bounded work (issue 20.2)

# Each is 24-30 characters; unbounded, the first ran past 120 s and the second took 12 s
# building a 26-million-bit denominator.
HOSTILE = ["(((1e-300)**64)**64)**64", "((((1/3)**64)**64)**64)**64"]


def test_hostile_exact_fractions_are_refused_quickly():
    """Run in a child process so that an unbounded evaluator fails the test, not the suite."""
    import subprocess
    import sys

    code = (
        "import time\n"
        "from kd_cot.evaluator import evaluate, EvaluationError\n"
        f"for source in {HOSTILE!r}:\n"
        "    start = time.perf_counter()\n"
        "    try:\n"
        "        evaluate(source)\n"
        "        print('accepted', source)\n"
        "    except EvaluationError as exc:\n"
        "        print('refused', round(time.perf_counter() - start, 3), exc)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the evaluator ran past 30 s on a 24-character expression")
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused") for line in lines), done
    assert all(float(line.split()[1]) < 1.0 for line in lines), lines
    assert all("bits" in line for line in lines), lines


@pytest.mark.parametrize(
    "source",
    ["((1/3)**64)**64", "(1e-300)**64", "(0.5**64)**64", "(1e-300)**4 * (1e-300)**4"],
)
def test_exact_fractions_are_bounded_in_bits(source):
    with pytest.raises(EvaluationError, match="bits"):
        evaluate(source, max_bits=4096)


def test_small_fractions_within_the_bound_stay_exact():
    assert evaluate("(1/3) ** 64") == Fraction(1, 3**64)
    assert evaluate("(1e-300 * 3) / 1e-300") == 3


def test_time_budget_is_a_backstop():
    with pytest.raises(EvaluationError, match="time budget"):
        evaluate("1 + 2 * 3", max_seconds=0.0)


_LEAF = st.sampled_from(["1e-300", "1/3", "0.7", "3", "64", "2", "1e-9", "7/9"])


def _expr(children):
    return st.tuples(children, st.sampled_from("+-*/"), children).map(
        lambda t: f"({t[0]}){t[1]}({t[2]})"
    ) | st.tuples(children, st.sampled_from(["64", "63", "32", "-64", "8"])).map(
        lambda t: f"({t[0]})**{t[1]}"
    )


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.recursive(_LEAF, _expr, max_leaves=12))
def test_every_expression_is_cheap_and_bounded(source):
    """Whatever the expression: refused or evaluated within the budget, never a huge fraction."""
    import time

    start = time.perf_counter()
    try:
        value = evaluate(source, max_bits=4096)
    except EvaluationError:
        value = None
    assert time.perf_counter() - start < 1.0, source
    if isinstance(value, Fraction):
        assert max(value.numerator.bit_length(), value.denominator.bit_length()) <= 4096


def test_numbers_with_thousands_of_digits_are_refused_not_a_crash():
    huge = "7" * 5000  # beyond Python's int-from-text limit: once a bare ValueError
    with pytest.raises(EvaluationError, match="digits"):
        parse_number(huge)
    with pytest.raises(EvaluationError, match="digits"):
        evaluate(f"{'9' * 1500} - 1")
    assert normalize_answer(huge) == huge  # a vote key all the same, compared as text
    counts = check_annotations(f"a <<1+1={huge}>> b <<{HOSTILE[0]}=0>> c <<2*3=6>>6")
    assert counts == {"checked": 3, "correct": 1, "wrong": 0, "unsafe": 2}
