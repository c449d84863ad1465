"""``kd sample``'s journal, ``OUTPUT.partial``: the answers so far, a chunk at a time, so a
killed or interrupted run is continued by the same command to the bytes an uninterrupted
run writes (``kdcore.cli.sample``'s docstring says what the header records and when a
partial file is refused)."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kdcore.errors import CheckpointError
from kdcore.io import atomic_path

PARTIAL = ".partial"  # OUTPUT.partial: the answers so far (see the module docstring)
JOURNAL = 1  # the partial file's layout; another is stale
HEADER = b'{"kd_sample_partial": '  # how a partial file starts, whole or cut short


def teacher_stamps(folder: Path) -> dict[str, list[int]]:
    """Size and modification time of the teacher's config and weights: a partial file of
    another teacher in the same folder (retrained since) is not continued."""
    stamps = {}
    for path in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        if path.is_file():
            stat = path.stat()
            stamps[path.name] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def prompt_hash(prompt: np.ndarray, turns: dict | None) -> str:
    """What identifies a prompt in the partial file: its tokens and its conversation."""
    digest = hashlib.sha256(np.asarray(prompt, np.int32).tobytes())
    digest.update(json.dumps(turns, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


class StalePartial(CheckpointError):
    """OUTPUT.partial holds answers this run cannot continue (refused, kept)."""


class Journal:
    """``OUTPUT.partial``: a header line (``{"kd_sample_partial": JOURNAL, "identity":
    {...}}``), then one line per prompt answered (``{"prompt": hash, "stopped": bool,
    "record": {...} or null}``: null for a dropped answer), appended a chunk at a time and
    flushed to disk. Held under an exclusive ``flock`` while a run uses it (the OS drops it
    when the process dies, so a kill leaves no stale lock)."""

    def __init__(self, path: Path, handle: Any):
        self.path = path
        self.handle = handle
        self.prompts: list[str] = []  # the hash of each prompt answered, in order
        self.header_end = 0  # byte offset after the header line

    @property
    def answered(self) -> int:
        return len(self.prompts)

    @classmethod
    def open(cls, path: Path, identity: dict, batch_size: int, force: bool) -> Journal:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise CheckpointError(f"cannot write {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CheckpointError(
                f"{path} is in use by another kd sample writing the same output; wait for it "
                "to end, or stop it"
            ) from None
        journal = cls(path, os.fdopen(fd, "r+b"))
        try:
            journal._load(json.loads(json.dumps(identity)), batch_size, force)
        except BaseException:
            journal.close()
            raise
        return journal

    def _load(self, identity: dict, batch_size: int, force: bool) -> None:
        self.handle.seek(0)
        head = self.handle.readline()
        if not head.endswith(b"\n") and (not head or head.startswith(HEADER)):
            self._start(identity)  # new, or killed before its header was whole
            return
        try:
            header = json.loads(head)
        except (ValueError, RecursionError):
            header = None
        if not isinstance(header, dict) or header.get("kd_sample_partial") != JOURNAL:
            if not force:
                raise StalePartial(
                    f"{self.path} is not a partial output of this kd sample: pass --force to "
                    "replace it"
                )
            self._start(identity)
            return
        held = header.get("identity")
        if held != identity:
            answered = journal_entry(self.handle.readline()) is not None
            if not force and answered:  # one with no answer is nothing to keep
                held = held if isinstance(held, dict) else {}
                keys = sorted(
                    k for k in identity.keys() | held.keys() if held.get(k) != identity.get(k)
                )
                raise StalePartial(
                    f"{self.path} holds the answers of a kd sample with other arguments "
                    f"({', '.join(keys)}): pass --force to discard them and start over, or "
                    "give the arguments that made them to continue"
                )
            self._start(identity)
            return
        self.header_end = offset = len(head)
        ends = []  # the byte offset after each whole entry
        for line in self.handle:
            entry = journal_entry(line)
            if entry is None:  # a line a kill cut short, and anything after it
                break
            offset += len(line)
            self.prompts.append(entry["prompt"])
            ends.append(offset)
        # from the last whole chunk: the chunks of the rest (and so their seeds) are the
        # uninterrupted run's
        keep = len(self.prompts) // batch_size * batch_size
        del self.prompts[keep:]
        self._truncate(ends[keep - 1] if keep else self.header_end)

    def _start(self, identity: dict) -> None:
        self.prompts = []
        self._truncate(0)
        head = json.dumps({"kd_sample_partial": JOURNAL, "identity": identity}) + "\n"
        self._write(head.encode("utf-8"))
        self.header_end = len(head.encode("utf-8"))

    def reset(self) -> None:
        """Discard every answer (the header stays)."""
        self.prompts = []
        self._truncate(self.header_end)

    def _truncate(self, offset: int) -> None:
        self.handle.truncate(offset)
        self.handle.seek(offset)

    def _write(self, data: bytes) -> None:
        self.handle.write(data)
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def append(self, entries: list[dict]) -> None:
        lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
        self._write(lines.encode("utf-8"))
        self.prompts.extend(e["prompt"] for e in entries)

    def entries(self) -> Iterator[dict]:
        """The entries held, in order (read back from the file: records are not kept in
        memory)."""
        with open(self.path, "rb") as handle:
            handle.seek(self.header_end)
            for _, line in zip(range(self.answered), handle):
                entry = journal_entry(line)
                if entry is None:
                    raise CheckpointError(f"{self.path} changed while kd sample wrote it")
                yield entry

    def write_output(self, output: Path) -> None:
        """The output from the entries (atomically), then the partial file removed."""
        with atomic_path(output) as tmp:
            opener = (
                gzip.GzipFile(tmp, "wb", mtime=0) if output.suffix == ".gz" else open(tmp, "wb")
            )
            with opener as handle:
                for entry in self.entries():
                    if entry["record"] is not None:
                        line = json.dumps(entry["record"], ensure_ascii=False) + "\n"
                        handle.write(line.encode("utf-8"))
        self.path.unlink(missing_ok=True)

    def abandon(self, exc: BaseException) -> None:
        """After an error: keep the partial file when it holds answers to continue (and say
        so), else remove it."""
        if self.handle.closed or not self.path.exists() or isinstance(exc, StalePartial):
            return
        if not self.answered:
            self.path.unlink(missing_ok=True)
            return
        print(
            f"kd sample: {self.answered} answers kept in {self.path}: the same command "
            "continues from there (--force with other arguments discards them)",
            file=sys.stderr,
        )

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()  # closing the descriptor drops the flock


def journal_entry(line: bytes) -> dict | None:
    """One whole entry line of a partial file, or None (cut short, or not an entry)."""
    if not line.endswith(b"\n"):
        return None
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        return None
    ok = (
        isinstance(entry, dict)
        and isinstance(entry.get("prompt"), str)
        and isinstance(entry.get("stopped"), bool)
        and (entry.get("record") is None or isinstance(entry.get("record"), dict))
    )
    return entry if ok else None
