"""The synthetic arithmetic task: right answers, steps that carry, disjoint splits."""

from __future__ import annotations

import re

import numpy as np
import pytest
from kd_cot.records import read_records
from kd_cot.synthetic import (
    add_steps,
    labelled,
    make_problem,
    make_task,
    mul_steps,
    problem_key,
    to_base,
)


def test_steps_write_out_the_carries():
    assert add_steps(347, 589, "abc") == (["a:7+9+0=16", "b:4+8+1=13", "c:3+5+1=09"], "936")
    assert add_steps(95, 8, "de") == (["d:5+8+0=13", "e:9+0+1=10"], "103")
    assert mul_steps(347, 6, "abc") == (["a:7*6+0=42", "b:4*6+4=28", "c:3*6+2=20"], "2082")
    assert labelled(347, "def") == "f3e4d7"
    # base 5: 72 + 44 = 116 is 242 + 134 = 431
    assert to_base(72, 5) == "242" and to_base(0, 5) == "0"
    assert add_steps(72, 44, "abc", base=5) == (["a:2+4+0=11", "b:4+3+1=13", "c:2+1+1=04"], "431")
    assert mul_steps(72, 3, "abc", base=5) == (["a:2*3+0=11", "b:4*3+1=23", "c:2*3+2=13"], "1331")


@pytest.mark.parametrize("base", [10, 5])
def test_problems_are_right_and_their_steps_rebuild_the_answer(base):
    rng = np.random.default_rng(0)
    for i in range(300):
        record = make_problem(rng, int(rng.integers(1, 5)), "+*"[i % 2], base)
        question = record["question"]
        numbers = [int(re.sub(r"[a-j]", "", part), base) for part in re.split(r"[+*]", question)]
        value = numbers[0] + numbers[1] if "+" in question else numbers[0] * numbers[1]
        assert int(record["answer"], base) == value
        digits, carry = [], 0
        for step in record["rationale"]:
            label, expr = step.split(":")
            assert label in question  # the step names a column of the question
            lhs, column = expr.split("=")
            assert len(column) == 2  # carry out and answer digit: every line as wide
            assert int(lhs.rsplit("+", 1)[1]) == carry
            carry, digit = int(column[0]), column[1]
            digits.append(digit)
        rebuilt = str(carry) + "".join(reversed(digits))
        assert int(rebuilt, base) == value


def test_task_files_hold_out_their_test_problems(tmp_path):
    paths = make_task(tmp_path, seed=1, train=300, test=40, digits=(2, 3), base=5)
    train, rejected, _ = read_records(paths["train"])
    test, _, _ = read_records(paths["test"])
    longer, _, _ = read_records(paths["longer"])
    assert not rejected and len(train) == 300 and len(test) == 40
    assert not {problem_key(r.question) for r in train} & {problem_key(r.question) for r in test}
    assert {len(r.steps) for r in train} == {2, 3}
    assert {len(r.steps) for r in test} == {3}  # the largest training size
    assert {len(r.steps) for r in longer} == {4}  # one more digit than in training
    assert len({r.question for r in train}) == 300
    assert set("".join(r.answer for r in train)) <= set("01234")
