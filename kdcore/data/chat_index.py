"""The chat dataset's records: mlx-lm's JSONL record formats, checked and indexed in one pass,
read back one at a time.

Records (one JSON object a line, ``.gz`` allowed), recognised per record in mlx-lm's order
(``mlx_lm/tuner/datasets.py``, ``create_dataset``):

- ``{"prompt": ..., "completion": ...}`` (optionally ``"tools"``): rendered as a user turn and
  an assistant turn;
- ``{"messages": [{"role", "content"}, ...]}`` (optionally ``"tools"``; assistant turns may
  carry ``tool_calls`` instead of content): roles ``system``, ``user``, ``assistant``,
  ``tool``;
- ``{"text": ...}``: tokenized as is, an end-of-sequence token added when missing, every
  token carrying loss (mlx-lm's ``TextDataset``).

Memory: one pass over the file checks every line (JSON, shape, roles: bad lines are
rejected with their number, the rest kept) and keeps ~30 bytes a record (byte offset,
length, line number, size); a ``.gz`` file is decompressed into an anonymous temporary file
on disk for random access. A record is read again (``ChatRecords.read``) only when its
segment of rows is first needed (``kdcore.data.packing``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import attrs
import numpy as np

from kdcore.data.datasets import (
    BOM,
    MAX_LINE_BYTES,
    _check_readable,
    _open_binary,
    _parse_line,
    _Reading,
)
from kdcore.errors import SpecError
from kdcore.spec import validators

TEXT, CHAT, COMPLETION = 0, 1, 2
FORMATS = {TEXT: "text", CHAT: "messages", COMPLETION: "prompt/completion"}
ROLES = ("system", "user", "assistant", "tool")
# Rejections kept in detail (all are counted).
KEPT_REJECTIONS = 1000

_BREAK = re.compile(rb"\r\n|\r|\n")


@attrs.define
class ChatConfig:
    # Here, not in kdcore.data.chat, because the record checks below read its feature names
    # and chat.py imports this module.
    # one file, or several sources: a list of files (named by their stems) or {name = file}
    path: dict[str, str] | str | list[str]
    tokenizer: str  # a folder: tokenizer.json and tokenizer_config.json with a chat_template
    seq_len: int = attrs.field(default=512, validator=validators.positive)
    mask_prompt: bool = True
    pack: bool = True
    # read once, when the rows are planned: a schedule is refused
    val_fraction: float = attrs.field(
        default=0.1, validator=[validators.number, validators.fraction]
    )
    max_records: int | None = None
    # mlx-lm's names for the record keys (its lora config's *_feature options)
    chat_feature: str = "messages"
    prompt_feature: str = "prompt"
    completion_feature: str = "completion"
    text_feature: str = "text"


def _line_spans(raw: bytes) -> list[tuple[int, int]]:
    """(start, end) of each line in ``raw`` without its terminator; a lone ``\\r`` ends a
    line too (text mode's universal newlines, as ``read_jsonl`` reads)."""
    if b"\r" not in raw:
        return [(0, len(raw) - 1 if raw.endswith(b"\n") else len(raw))]
    spans, start = [], 0
    for match in _BREAK.finditer(raw):
        spans.append((start, match.start()))
        start = match.end()
    if start < len(raw):
        spans.append((start, len(raw)))
    return spans


def classify(record: dict, config: ChatConfig) -> tuple[int, int, int, bool] | str:
    """(format, turns, characters, has a prompt) of a record, or why it is rejected."""
    tools = record.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        return "'tools' must be a list of objects"
    chars = len(json.dumps(tools)) if tools else 0
    p, c = config.prompt_feature, config.completion_feature
    if p in record and c in record:
        prompt, completion = record[p], record[c]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return f"{p!r} and {c!r} must be strings"
        return COMPLETION, 2, chars + len(prompt) + len(completion), True
    if config.chat_feature in record:
        messages = record[config.chat_feature]
        if not isinstance(messages, list) or not messages:
            return f"{config.chat_feature!r} must be a non-empty list of messages"
        first = None
        for number, message in enumerate(messages, 1):
            if not isinstance(message, dict):
                return f"message {number} is not an object"
            role = message.get("role")
            if role not in ROLES:
                return f"message {number} has unknown role {role!r} (expected one of {ROLES})"
            content, calls = message.get("content"), message.get("tool_calls")
            if calls is not None:
                if role != "assistant" or not isinstance(calls, list):
                    return f"message {number}: 'tool_calls' must be a list, on an assistant turn"
                chars += len(json.dumps(calls))
            if isinstance(content, str):
                chars += len(content)
            elif not (content is None and calls):
                return f"message {number} ({role}): 'content' must be a string"
            if role == "assistant" and first is None:
                first = number - 1
        if first is None:
            return "no assistant turn (nothing would carry loss)"
        return CHAT, len(messages), chars, first > 0
    t = config.text_feature
    if t in record:
        if not isinstance(record[t], str) or not record[t]:
            return f"{t!r} must be a non-empty string"
        return TEXT, 0, len(record[t]), False
    return f"needs {config.chat_feature!r}, {p!r} and {c!r}, or {t!r} (mlx-lm's record formats)"


def conversation(record: dict, kind: int, config: ChatConfig) -> tuple[list, list | None]:
    """The messages and tools of a chat or completion record (a completion record as a user
    turn and an assistant turn)."""
    tools = record.get("tools") or None
    if kind == COMPLETION:
        messages = [
            {"role": "user", "content": record[config.prompt_feature]},
            {"role": "assistant", "content": record[config.completion_feature]},
        ]
        return messages, tools
    return record[config.chat_feature], tools


@attrs.define
class _Index:
    """Where each kept record is, and what the pass learned about it."""

    offsets: np.ndarray  # int64: byte offset of its line
    lengths: np.ndarray  # uint32: bytes, without the line end
    lines: np.ndarray  # int64: 1-based line number
    kinds: np.ndarray  # uint8: TEXT / CHAT / COMPLETION
    turns: np.ndarray  # uint16: messages (saturating)
    chars: np.ndarray  # uint32: characters of content (saturating)
    prompted: np.ndarray  # bool: has a prompt before its first assistant turn

    def __len__(self) -> int:
        return len(self.offsets)


class _Columns:
    """Index columns grown in chunks (Python lists only for the last chunk)."""

    NAMES = (
        ("offsets", np.int64),
        ("lengths", np.uint32),
        ("lines", np.int64),
        ("kinds", np.uint8),
        ("turns", np.uint16),
        ("chars", np.uint32),
        ("prompted", np.bool_),
    )
    CHUNK = 1 << 16

    def __init__(self):
        self.done: dict[str, list[np.ndarray]] = {n: [] for n, _ in self.NAMES}
        self.open: list[tuple] = []
        self.count = 0

    def add(self, row: tuple) -> None:
        self.open.append(row)
        self.count += 1
        if len(self.open) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.open:
            return
        for (name, dtype), column in zip(self.NAMES, zip(*self.open)):
            limit = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else None
            values = np.asarray(column, np.int64 if limit else dtype)
            self.done[name].append(values.clip(0, limit).astype(dtype) if limit else values)
        self.open = []

    def finish(self) -> _Index:
        self._flush()
        return _Index(
            **{
                n: np.concatenate(self.done[n]) if self.done[n] else np.zeros(0, t)
                for n, t in self.NAMES
            }
        )


def _index_file(path: Path, config: ChatConfig, spool) -> tuple[_Index, list, int, str, int]:
    """One pass: (index, first rejections, rejection count, content digest, lines read).
    A ``.gz`` file's bytes are copied to ``spool`` (the offsets are then into it)."""
    _check_readable(path, bounded=True)  # lines are bounded by MAX_LINE_BYTES
    columns, rejected = _Columns(), []
    count = read = 0
    digest = hashlib.sha256()  # the fastest hashlib digest where CPUs have SHA instructions
    limit = config.max_records
    with _Reading(path), _open_binary(path) as handle:
        position = number = 0
        while limit is None or columns.count < limit:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            if len(raw) > MAX_LINE_BYTES:
                raise SpecError(
                    f"data file {path}: line {number + 1} is longer than "
                    f"{MAX_LINE_BYTES >> 20} MiB (not JSONL?)"
                )
            if spool is not None:
                spool.write(raw)
            if not position and raw.startswith(BOM):  # not the record's: offsets skip it
                raw, position = raw[len(BOM) :], len(BOM)
            for start, end in _line_spans(raw):
                number += 1
                if limit is not None and columns.count >= limit:
                    break
                parsed: list = []
                rejects: list = []
                _parse_line(raw[start:end], number, parsed, rejects)
                if parsed:
                    shape = classify(parsed[0][1], config)
                    if isinstance(shape, str):
                        rejects.append({"line": number, "reason": shape})
                    else:
                        digest.update(raw[start:end] + b"\n")
                        kind, turns, chars, prompted = shape
                        columns.add(
                            (position + start, end - start, number, kind, turns, chars, prompted)
                        )
                read += bool(parsed or rejects)
                for reject in rejects:
                    count += 1
                    if len(rejected) < KEPT_REJECTIONS:
                        rejected.append(reject)
            position += len(raw)
    if spool is not None:
        spool.flush()
    return columns.finish(), rejected, count, digest.hexdigest(), read


class ChatRecords:
    """A chat JSONL file's kept records, indexed in one pass; record ``i`` is the ``i``-th
    kept record in file order (0-based). Also keeps the rejections: the file's bad lines,
    and the records the template refuses when they are first rendered (:meth:`reject`)."""

    def __init__(self, path: Path, config: ChatConfig):
        self.path, self.config = path, config
        # A .gz file (or a pipe) cannot be read at an offset: its bytes go to a temporary
        # file on disk (gone when the dataset is), never into memory.
        spooled = path.suffix == ".gz" or not path.is_file()
        self._spool = tempfile.TemporaryFile() if spooled else None
        found = _index_file(path, config, self._spool)
        self.index, self._rejected, self.rejected_count, self.digest, self.lines_read = found
        # records whose rendering ran out of time, with why: not rendered again (a few: the
        # renderer refuses the template after FILE_TIMEOUT_SECONDS of them)
        self.late: dict[int, str] = {}
        self._size = self._spool.tell() if self._spool else path.stat().st_size

    def __len__(self) -> int:
        return len(self.index)

    def kind(self, record: int) -> int:
        return int(self.index.kinds[record])

    def line(self, record: int) -> int:
        return int(self.index.lines[record])

    def where(self, record: int) -> tuple[Path, int]:
        """(file, line) of record ``record``, for messages."""
        return self.path, self.line(record)

    def source_of(self, record: int) -> int:
        return 0

    def read(self, record: int) -> dict:
        """Record ``record`` parsed again; an error when the file changed since the pass."""
        offset, length = int(self.index.offsets[record]), int(self.index.lengths[record])
        if self._spool is not None:
            raw = os.pread(self._spool.fileno(), length, offset)
        else:
            with open(self.path, "rb") as handle:
                if os.fstat(handle.fileno()).st_size != self._size:
                    raise SpecError(f"data file {self.path} changed since it was read")
                raw = os.pread(handle.fileno(), length, offset)
        try:
            parsed = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            parsed = None
        shape = classify(parsed, self.config) if isinstance(parsed, dict) else "gone"
        if isinstance(shape, str) or shape[0] != self.index.kinds[record]:
            raise SpecError(
                f"data file {self.path} changed since it was read (line {self.line(record)})"
            )
        return parsed

    def prompt_turns(self, record: int) -> tuple[list, list | None]:
        """Record ``record``'s turns before its first assistant turn, and its tools."""
        messages, tools = conversation(self.read(record), self.kind(record), self.config)
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return list(messages[:first]), tools

    def reject(self, refused: list[dict]) -> None:
        """Count records the template refused (``{"line", "reason"}``), keeping the first
        ``KEPT_REJECTIONS`` rejections in detail."""
        room = KEPT_REJECTIONS - len(self._rejected)
        self._rejected.extend(refused[: max(0, room)])
        self.rejected_count += len(refused)

    @property
    def rejected(self) -> list[dict]:
        return sorted(self._rejected, key=lambda r: r["line"])
