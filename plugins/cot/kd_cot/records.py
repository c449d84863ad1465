"""Rationale records: GSM8K files and generic ``{question, rationale, answer}`` JSONL.

A :class:`RationaleRecord` is a question, a list of reasoning steps (or a program, for
program-of-thought records) and a final answer, with the line it came from. Readers return
the records that parse and a list of ``{"line", "reason"}`` for those that do not.

GSM8K (``{"question", "answer"}``): the answer field holds step lines, possibly with
calculator annotations ``<<48/2=24>>``, and ends with a line ``#### 72``. Socratic GSM8K
lines ``sub-question ** step`` keep the sub-question separately.

Generic: ``{"question", "rationale", "answer"}`` where ``rationale`` is a string (one step
per line) or a list of steps; or ``{"question", "program", "answer"}`` for a
program-of-thought record, whose program must evaluate (restricted evaluator, see
:mod:`kd_cot.evaluator`) to the answer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import attrs

from kd_cot.evaluator import (
    EvaluationError,
    check_digits,
    evaluate,
    numbers_equal,
    parse_number,
)
from kdcore.app import read_jsonl

Annotations = Literal["keep", "strip"]
_ANNOTATION = re.compile(r"<<[^<>]*>>")


@attrs.frozen
class Step:
    """One reasoning step; ``sub`` is the socratic sub-question when the data has one."""

    text: str
    sub: str | None = None


@attrs.frozen
class RationaleRecord:
    question: str
    steps: tuple[Step, ...]
    answer: str
    line: int = 0
    program: str | None = None  # program-of-thought records: an arithmetic expression

    @property
    def kind(self) -> str:
        return "pot" if self.program is not None else "cot"

    @property
    def rationale(self) -> str:
        """The steps (or the program) as text, one step per line."""
        if self.program is not None:
            return self.program
        return "\n".join(s.text for s in self.steps)

    def to_json(self) -> dict:
        out = {"question": self.question, "answer": self.answer}
        if self.program is not None:
            out["program"] = self.program
        else:
            out["rationale"] = [
                s.text if s.sub is None else f"{s.sub} ** {s.text}" for s in self.steps
            ]
        return out


class RecordError(ValueError):
    """A record that does not parse; the message is the reason reported with its line."""


def strip_annotations(text: str) -> str:
    """``"48/2 = <<48/2=24>>24"`` -> ``"48/2 = 24"``."""
    return _ANNOTATION.sub("", text)


def _steps_from_lines(lines: list[str], annotations: Annotations) -> tuple[Step, ...]:
    steps = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.count("<<") != line.count(">>"):
            raise RecordError(f"unbalanced calculator annotation in step {line[:60]!r}")
        for annotation in _ANNOTATION.findall(line):
            _bounded(annotation, f"calculator annotation {annotation[:40]!r}")
        if annotations == "strip":
            line = strip_annotations(line)
        sub, sep, rest = line.partition(" ** ")
        steps.append(Step(rest.strip(), sub.strip()) if sep else Step(line))
    return tuple(steps)


def _bounded(text: str, what: str) -> None:
    """Refuse a number of thousands of digits: no answer needs one, and checking it (Python
    refuses to read more than 4,300 digits as an int) must not abort the whole load."""
    try:
        check_digits(text)
    except EvaluationError as exc:
        raise RecordError(f"{what} holds {exc}") from None


def _string(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        what = "missing" if value is None else f"not a string ({type(value).__name__})"
        raise RecordError(f"field {key!r} is {what}")
    if not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value.strip()


def parse_gsm8k(record: dict, line: int = 0, annotations: Annotations = "keep") -> RationaleRecord:
    """One GSM8K record; raises :class:`RecordError` naming what is wrong."""
    question = _string(record, "question")
    body = _string(record, "answer")
    head, sep, answer = body.rpartition("####")
    if not sep:
        raise RecordError("no '#### answer' line in field 'answer'")
    if "\n" in answer.strip():
        raise RecordError("text after the '#### answer' line")
    answer = answer.strip()
    if not answer:
        raise RecordError("empty answer after '####'")
    _bounded(answer, "the answer after '####'")
    steps = _steps_from_lines(head.split("\n"), annotations)
    return RationaleRecord(question, steps, answer, line)


def parse_generic(
    record: dict,
    line: int = 0,
    annotations: Annotations = "keep",
    keys: tuple[str, str, str, str] = ("question", "rationale", "answer", "program"),
) -> RationaleRecord:
    """One ``{question, rationale | program, answer}`` record."""
    q_key, r_key, a_key, p_key = keys
    question = _string(record, q_key)
    answer = record.get(a_key)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
        record = {**record, a_key: answer}
    answer = _string(record, a_key)
    if "\n" in answer:
        raise RecordError(f"field {a_key!r} spans several lines")
    _bounded(answer, f"field {a_key!r}")
    if record.get(p_key) is not None:
        program = _string(record, p_key)
        stated = parse_number(answer)
        if stated is None:
            raise RecordError(f"program-of-thought answer {answer!r} is not a number")
        try:
            value = evaluate(program)
        except EvaluationError as exc:
            raise RecordError(f"program rejected: {exc}") from None
        if not numbers_equal(value, stated):
            raise RecordError(f"program evaluates to {_show(value)}, not the answer {answer}")
        return RationaleRecord(question, (), answer, line, program=program)
    rationale = record.get(r_key)
    if isinstance(rationale, str):
        lines = rationale.split("\n")
    elif isinstance(rationale, list) and all(isinstance(s, str) for s in rationale):
        lines = rationale
    else:
        raise RecordError(f"field {r_key!r} must be a string or a list of strings")
    steps = _steps_from_lines(lines, annotations)
    if not steps:
        raise RecordError(f"field {r_key!r} has no steps")
    return RationaleRecord(question, steps, answer, line)


def _show(value) -> str:
    value = value if not hasattr(value, "denominator") or value.denominator != 1 else int(value)
    return str(value)


def detect_format(record: dict) -> str:
    """``"generic"`` when the record has a rationale or program, else ``"gsm8k"``."""
    if "rationale" in record or "program" in record:
        return "generic"
    return "gsm8k"


def read_records(
    path: str | Path,
    fmt: str = "auto",
    annotations: Annotations = "keep",
    limit: int | None = None,
    keys: tuple[str, str, str, str] = ("question", "rationale", "answer", "program"),
) -> tuple[list[RationaleRecord], list[dict], int]:
    """(records, rejected ``{"line", "reason"}``, lines read) from a JSONL file."""
    raw, rejected = read_jsonl(Path(path), limit)
    lines_read = len(raw) + len(rejected)
    records = []
    for line, record in raw:
        kind = detect_format(record) if fmt == "auto" else fmt
        try:
            if kind == "gsm8k":
                records.append(parse_gsm8k(record, line, annotations))
            elif kind == "generic":
                records.append(parse_generic(record, line, annotations, keys))
            else:
                raise ValueError(f"unknown format {fmt!r}: 'auto', 'gsm8k' or 'generic'")
        except RecordError as exc:
            rejected.append({"line": line, "reason": str(exc)})
    rejected.sort(key=lambda r: r["line"])
    return records, rejected, lines_read
