"""Which teacher each record of the data routes to (the ``route`` aggregator's table), read
from the records themselves: a record without the routing field, or naming no teacher, is an
error naming its file and line, when the data loads and in ``kd validate``."""

from __future__ import annotations

import difflib
import json
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdcore.data.chat_index import ChatConfig
from kdcore.data.datasets import MAX_LINE_BYTES, _open_binary, _strip_bom
from kdcore.errors import SpecError
from kdcore.signal.route import NONE, RouteConfig, record_text, teacher_index

# Bad records named in detail (all are counted).
SHOWN = 5
WHERE = "$.aggregator.params"


def _names(labels: Sequence[str]) -> str:
    return ", ".join(repr(x) for x in labels)


def close_match(name: str, choices: Sequence[str]) -> str:
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {found[0]!r}?)" if found else ""


class RecordRouter:
    """A record (parsed JSON) -> its teacher index (-1: none), or the reason it has none."""

    def __init__(self, config: RouteConfig, labels: Sequence[str], chat: ChatConfig | None):
        self.config, self.labels = config, list(labels)
        self.keys = (
            (chat.chat_feature, chat.prompt_feature, chat.completion_feature, chat.text_feature)
            if chat is not None
            else ("messages", "prompt", "completion", "text")
        )
        self.rules = [(re.compile(r.pattern), r) for r in config.rules]
        self.default = None if config.default is None else teacher_index(config.default, labels)

    def __call__(self, record: dict) -> int | str:
        config = self.config
        if config.by == "rule":
            text = None
            for pattern, rule in self.rules:
                if rule.field is not None:
                    value = record.get(rule.field)
                else:
                    text = record_text(record, *self.keys) if text is None else text
                    value = text
                if isinstance(value, str) and pattern.search(value):
                    return teacher_index(rule.teacher, self.labels)
            return -1 if self.default is None else self.default
        if config.field not in record:
            if self.default is not None:
                return self.default
            return f"has no field {config.field!r} (give every record one, or set default)"
        value = record[config.field]
        if not isinstance(value, str):
            return f"field {config.field!r} is {value!r}, not a string naming a teacher"
        name = config.map.get(value, value)
        if name != NONE and name not in self.labels:
            known = self.labels + sorted(config.map)
            hint = close_match(value, known)
            return (
                f"field {config.field!r} is {value!r}, which names no teacher{hint}"
                f" (teacher labels: {_names(self.labels)}"
                + (f"; map keys: {_names(sorted(config.map))}" if config.map else "")
                + ")"
            )
        return teacher_index(name, self.labels)


def record_teachers(dataset: Any, config: RouteConfig, labels: Sequence[str]) -> np.ndarray:
    """The teacher index (-1: none) of every record of a chat ``dataset``; ``SpecError``
    naming the file and line of each record (the first ``SHOWN``) that routes nowhere."""
    source = getattr(dataset, "source", None)
    if source is None or not hasattr(dataset, "track_records"):
        raise SpecError(
            f"route by {config.by} reads each record, and dataset {type(dataset).__name__} has "
            "no records to read (use the chat dataset) @ $.aggregator.params.by"
        )
    route = RecordRouter(config, labels, getattr(dataset, "config", None))
    table = np.full(len(source), -1, np.int32)
    bad: list[str] = []
    count = 0
    for record in range(len(source)):
        found = route(source.read(record))
        if isinstance(found, str):
            count += 1
            if len(bad) < SHOWN:
                path, line = source.where(record)
                bad.append(f"record at {path}:{line} {found} @ {WHERE}.{_param(config)}")
            continue
        table[record] = found
    if bad:
        more = f" (and {count - len(bad)} more records)" if count > len(bad) else ""
        raise SpecError(bad[:-1] + [bad[-1].replace(" @ ", more + " @ ", 1)])
    return table


def _param(config: RouteConfig) -> str:
    return "field" if config.by == "field" else "rules"


def source_teachers(config: RouteConfig, names: Sequence[str], labels: Sequence[str]) -> list:
    """Each source's teacher index, or the problems (``message @ path`` lines)."""
    problems, table = [], []
    for name in config.map:
        if name not in names:
            hint = close_match(name, names)
            problems.append(
                f"map names source {name!r}, which the data does not have{hint} "
                f"(sources: {_names(names)}) @ {WHERE}.map.{name}"
            )
    for name in names:
        target = config.map.get(name, name)
        if target != NONE and target not in labels:
            if config.default is None:
                problems.append(
                    f"source {name!r} routes to no teacher: map it to a teacher label "
                    f'(map = {{ {name} = "..." }}; labels: {_names(labels)}), name the '
                    f'teacher {name!r}, or set default (a label, or "none") @ {WHERE}.map'
                )
                table.append(-1)
                continue
            target = config.default
        table.append(teacher_index(target, labels) if target in (*labels, NONE) else -1)
    return problems if problems else table


def _records(path: Path, limit: int | None) -> Iterator[tuple[int, dict]]:
    """(line, record) of each JSON object line of a JSONL file (others are the dataset's to
    report), at most ``limit`` records."""
    with _open_binary(path) as handle:
        number = kept = 0
        for raw in iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""):
            number += 1
            if number == 1:
                raw = _strip_bom(raw)
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                kept += 1
                yield number, record
                if limit is not None and kept >= limit:
                    return


def scan_files(
    config: RouteConfig, chat: ChatConfig, files: dict[str, Path], labels: Sequence[str]
) -> list[str]:
    """``kd validate``'s check of the records: each routing record of ``files`` (name: path)
    must route somewhere (the first ``SHOWN`` failures named by file and line)."""
    route = RecordRouter(config, labels, chat)
    bad: list[str] = []
    count = 0
    for path in files.values():
        try:
            for line, record in _records(path, chat.max_records):
                found = route(record)
                if isinstance(found, str):
                    count += 1
                    if len(bad) < SHOWN:
                        bad.append(f"record at {path}:{line} {found} @ {WHERE}.{_param(config)}")
        except (OSError, EOFError, ValueError, zlib.error):
            continue  # an unreadable file is the dataset's to report
    if bad and count > len(bad):
        bad[-1] = bad[-1].replace(" @ ", f" (and {count - len(bad)} more records) @ ", 1)
    return bad
