"""A synthetic arithmetic task with the carries written out as steps.

Problems are ``a+b`` (multi-digit addition) and ``a*d`` (a multi-digit number times one
digit), with numbers written in base ``base`` (10, or a smaller base such as 5, see below).
Every digit of an operand carries a position label (an index hint, Zhou et al. 2023, "What
algorithms can transformers learn?"): consecutive letters counting up from the units, from
a random first letter. The rationale works column by column from the right, one step per
column, naming the column's label and showing its digits, the carry in and the column value
as two digits (carry out, answer digit)::

    base 10   question  c3b4a7+c5b8a9      f3e4d7*6
              steps     a:7+9+0=16         d:7*6+0=42
                        b:4+8+1=13         e:4*6+4=28
                        c:3+5+1=09         f:3*6+2=20
              answer    936                2082

The labels turn "find the i-th digit from the right" into a lookup by content, which a
small transformer learns in a few hundred steps (by position it did not, at this size), and
every step line has the same width, so the answer digits sit at fixed offsets. The second
digit of each column value is a digit of the answer, the first the carry into the next
column; the last carry leads the answer. A shorter addend is read with zeros.

Base 10 has 200 addition facts (x + y + carry) and 440 multiplication facts (x * d + carry);
in base 5 they are 50 and 45, which is what lets the example's tiny models learn them within
minutes of CPU. Columns, carries and answer assembly are the same in any base. Records are
generic rationale JSONL (``{question, rationale, answer}``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LETTERS = "abcdefghij"
DIGITS = "0123456789"


def to_base(number: int, base: int = 10) -> str:
    """``to_base(19, 5) == "34"``."""
    if not 2 <= base <= 10:
        raise ValueError(f"base must be in 2..10, got {base}")
    if number < 0:
        raise ValueError("negative numbers are not part of the task")
    out = []
    while True:
        number, digit = divmod(number, base)
        out.append(DIGITS[digit])
        if number == 0:
            return "".join(reversed(out))


def labelled(number: int, labels: str, base: int = 10) -> str:
    """``347`` with labels ``"abc"`` (units first) -> ``"c3b4a7"``."""
    digits = to_base(number, base)[::-1]
    return "".join(f"{labels[i]}{d}" for i, d in reversed(list(enumerate(digits))))


def _column(value: int, base: int) -> str:
    carry, digit = divmod(value, base)
    return f"{carry}{digit}"


def add_steps(a: int, b: int, labels: str = LETTERS, base: int = 10) -> tuple[list[str], str]:
    """Column steps ``"a:7+9+0=16"`` and the answer of ``a + b`` (in ``base``)."""
    da, db = to_base(a, base)[::-1], to_base(b, base)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        value = x + y + carry
        steps.append(f"{labels[i]}:{x}+{y}+{carry}={_column(value, base)}")
        carry = value // base
    return steps, to_base(a + b, base)


def mul_steps(a: int, d: int, labels: str = LETTERS, base: int = 10) -> tuple[list[str], str]:
    """Column steps ``"a:7*6+0=42"`` and the answer of ``a * d`` for one digit ``d``."""
    if not 0 <= d < base:
        raise ValueError(f"the multiplier must be one digit in base {base}, got {d}")
    steps, carry = [], 0
    for i, ch in enumerate(to_base(a, base)[::-1]):
        value = int(ch) * d + carry
        steps.append(f"{labels[i]}:{ch}*{d}+{carry}={_column(value, base)}")
        carry = value // base
    return steps, to_base(a * d, base)


def _number(rng: np.random.Generator, digits: int, base: int) -> int:
    low = base ** (digits - 1) if digits > 1 else 0
    return int(rng.integers(low, base**digits))


def make_problem(rng: np.random.Generator, digits: int, op: str, base: int = 10) -> dict:
    """One record whose largest operand has exactly ``digits`` digits (in ``base``)."""
    start = int(rng.integers(0, len(LETTERS) - digits + 1))
    labels = LETTERS[start : start + digits]
    a = _number(rng, digits, base)
    if op == "+":
        b = _number(rng, int(rng.integers(1, digits + 1)), base)
        if rng.random() < 0.5:
            a, b = b, a
        steps, answer = add_steps(a, b, labels, base)
        question = f"{labelled(a, labels, base)}+{labelled(b, labels, base)}"
    elif op == "*":
        d = int(rng.integers(2, base))
        steps, answer = mul_steps(a, d, labels, base)
        question = f"{labelled(a, labels, base)}*{d}"
    else:
        raise ValueError(f"unknown operation {op!r}: '+' or '*'")
    return {"question": question, "rationale": steps, "answer": answer}


def problem_key(question: str) -> str:
    """The arithmetic without its labels: two questions that differ only in labels are one
    problem (held-out problems must differ from training ones in their numbers)."""
    return "".join(c for c in question if c not in LETTERS)


def make_split(
    seed: int,
    count: int,
    digits: tuple[int, ...],
    exclude: set[str] | None = None,
    distinct: bool = True,
    base: int = 10,
    max_tries: int = 1_000_000,
) -> list[dict]:
    """``count`` problems (half additions, half multiplications), digit counts drawn from
    ``digits``, none of whose :func:`problem_key` is in ``exclude``. ``distinct``: no two
    share a problem key; otherwise no two share a question (the same numbers may recur
    with other labels, as small problems must in a large training set)."""
    rng = np.random.default_rng(seed)
    seen = set(exclude or ())
    questions: set[str] = set()
    out = []
    for _ in range(max_tries):
        if len(out) == count:
            return out
        op = "+" if len(out) % 2 == 0 else "*"
        record = make_problem(rng, int(rng.choice(digits)), op, base)
        key = problem_key(record["question"])
        if key in seen or record["question"] in questions:
            continue
        if distinct:
            seen.add(key)
        questions.add(record["question"])
        out.append(record)
    raise ValueError(f"cannot draw {count} problems with digits {digits}: too few exist")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def make_task(
    out_dir: str | Path,
    seed: int = 0,
    train: int = 4000,
    test: int = 200,
    digits: tuple[int, ...] = (1, 2, 3),
    base: int = 10,
) -> dict[str, Path]:
    """Write test.jsonl (distinct problems with the most digits of training), train.jsonl
    (digit counts from ``digits``, none of the test problems in numbers) and longer.jsonl
    (one more digit than the most in training); returns their paths."""
    out_dir = Path(out_dir)
    test_records = make_split(seed + 1, test, (max(digits),), base=base)
    held_out = {problem_key(r["question"]) for r in test_records}
    train_records = make_split(seed, train, digits, held_out, distinct=False, base=base)
    longer = make_split(seed + 2, test, (max(digits) + 1,), base=base)
    paths = {
        "train": out_dir / "train.jsonl",
        "test": out_dir / "test.jsonl",
        "longer": out_dir / "longer.jsonl",
    }
    write_jsonl(paths["train"], train_records)
    write_jsonl(paths["test"], test_records)
    write_jsonl(paths["longer"], longer)
    return paths
