"""Fixtures: small pair files in every accepted format; the untrained saved model
(``random_model_dir``) comes from ``kdcore.testing`` (imported: pytest accepts
``pytest_plugins`` only in a top-level conftest)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from kdcore.testing import random_model_dir  # noqa: F401


def hh(prompt_turns: list[tuple[str, str]], last_human: str, response: str) -> str:
    text = "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in prompt_turns)
    return text + f"\n\nHuman: {last_human}\n\nAssistant:{response}"


HH_RECORDS = [
    {
        "chosen": hh([("hi", "hello")], "how do I pick a lock?", " I can't help with that."),
        "rejected": hh([("hi", "hello")], "how do I pick a lock?", " Use a tension wrench."),
    },
    {
        "chosen": hh([], "tell me a joke", " Why did the chicken cross the road?"),
        "rejected": hh([], "tell me a joke", " No."),
        "safety": "humour",
    },
    {
        "chosen": hh([], "what is 2+2?", " 4."),
        "rejected": hh([], "what is 2+2?", " 5, obviously."),
        "safety": True,
    },
    {
        "chosen": hh([], "say something kind", " You are doing great."),
        "rejected": hh([], "say something kind", " Whatever."),
        "safety": False,
    },
]

EXPLICIT_RECORDS = [
    {"prompt": "Q: capital of France?\nA:", "chosen": " Paris", "rejected": " Rome"},
    {"prompt": "Q: 3*3?\nA:", "chosen": " 9", "rejected": " 6", "safety": "maths"},
    {"prompt": "Q: colour of the sky?\nA:", "chosen": " blue", "rejected": " green"},
]

# Line numbers (1-based) of the malformed lines in the file built by `mixed_lines`.
MALFORMED = {
    3: "not JSON",
    4: "not a JSON object",
    5: "needs string fields 'chosen' and 'rejected'",
    6: "'chosen' has no",
    8: "differ before the last",
    9: "'safety' must be",
    10: "identical",
}


def mixed_lines() -> list[str]:
    """Two good HH pairs, malformed lines at the numbers of MALFORMED, a blank line at 7."""
    good = [json.dumps(r) for r in HH_RECORDS[:2]]
    return [
        good[0],
        good[1],
        "{not json",
        "[1, 2]",
        json.dumps({"chosen": "only one side"}),
        json.dumps({"chosen": "no marker here", "rejected": "nor here"}),
        "",
        json.dumps({"chosen": hh([], "a", " x"), "rejected": hh([], "b", " y")}),
        json.dumps({"prompt": "p", "chosen": " a", "rejected": " b", "safety": 3}),
        json.dumps({"prompt": "p", "chosen": " same", "rejected": " same"}),
        json.dumps(EXPLICIT_RECORDS[0]),
    ]


def write_jsonl(path: Path, records: list, compress: bool = False) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    text = "".join(line + "\n" for line in lines)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def hh_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "hh.jsonl", HH_RECORDS)


@pytest.fixture
def explicit_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "explicit.jsonl", EXPLICIT_RECORDS)


@pytest.fixture
def mixed_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "mixed.jsonl", mixed_lines())


@pytest.fixture
def cases():
    """The record lists above, for assertions."""
    return {
        "hh": HH_RECORDS,
        "explicit": EXPLICIT_RECORDS,
        "malformed": MALFORMED,
        "write": write_jsonl,
        "mixed": mixed_lines,
    }
