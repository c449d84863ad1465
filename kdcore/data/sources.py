"""The chat dataset's several sources: ``path`` as a list of files (each named by its stem) or
a table ``{name = file}``, read as one set of records that remembers each record's source
(what ``route``'s ``by = "source"`` reads).

Each file is indexed on its own (:class:`kdcore.data.chat_index.ChatRecords`; ``max_records``
applies to each). The records are then ordered so that the val split, the last
``val_fraction`` of the records, takes that share of *every* source: the train records of
each source in turn, then the val records of each source in turn (a source's val records
are its last ones in file order). Packing shuffles the train records, so rows mix sources.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import attrs
import numpy as np

from kdcore.data.chat_index import ChatConfig, ChatRecords, _Index, conversation
from kdcore.errors import SpecError


def data_sources(path: str | list[str] | dict[str, str]) -> dict[str, str]:
    """``{source name: path}`` of a chat ``path``: one file (named by its stem), a list of
    files (their stems) or a table."""
    if isinstance(path, dict):
        if not path:
            raise SpecError("path must name at least one file @ $.data.params.path")
        return dict(path)
    files = [path] if isinstance(path, str) else list(path)
    if not files:
        raise SpecError("path must name at least one file @ $.data.params.path")
    names = [Path(f).name.split(".")[0] for f in files]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SpecError(
            f"files of the same name {repeated} in a list of sources: name each source with "
            'a table, path = { name = "file", ... } @ $.data.params.path'
        )
    return dict(zip(names, files))


def val_counts(sizes: list[int], val_fraction: float) -> list[int]:
    """How many of each source's records are val: shares of ``val_fraction`` summing to
    exactly the val split of all the records (``n - int(n * (1 - val_fraction))``)."""
    n = sum(sizes)
    total = n - int(n * (1 - val_fraction))
    wanted = [s * val_fraction for s in sizes]
    counts = [min(int(w), s) for w, s in zip(wanted, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: -(wanted[i] - int(wanted[i])))
    left = total - sum(counts)
    while left > 0:
        moved = False
        for i in order:
            if left and counts[i] < sizes[i]:
                counts[i] += 1
                left -= 1
                moved = True
        if not moved:
            break
    return counts


class SourcedRecords:
    """Several chat files as one set of records (the interface of ``ChatRecords``), each
    record's source kept (:meth:`source_of`) and its file and line (:meth:`where`)."""

    def __init__(self, paths: dict[str, Path], config: ChatConfig):
        self.names = list(paths)
        self.config = config
        self.parts = [ChatRecords(Path(p), config) for p in paths.values()]
        self.path = self.parts[0].path
        sizes = [len(p) for p in self.parts]
        vals = val_counts(sizes, config.val_fraction)
        train = [(s, np.arange(n - v)) for s, (n, v) in enumerate(zip(sizes, vals))]
        val = [(s, np.arange(n - v, n)) for s, (n, v) in enumerate(zip(sizes, vals))]
        pieces = train + val
        self.sources = np.concatenate(
            [np.full(len(ids), s, np.int32) for s, ids in pieces] or [np.zeros(0, np.int32)]
        )
        self.local = np.concatenate([ids for _, ids in pieces] or [np.zeros(0, np.int64)])
        fields = {}
        for field in attrs.fields(_Index):
            column = [getattr(self.parts[s].index, field.name)[ids] for s, ids in pieces]
            fields[field.name] = np.concatenate(column)
        self.index = _Index(**fields)
        digest = hashlib.sha256()
        for name, part in zip(self.names, self.parts):
            digest.update(f"{name}\0{part.digest}\0".encode())
        self.digest = digest.hexdigest()
        self.lines_read = sum(p.lines_read for p in self.parts)
        self.late: dict[int, str] = {}
        self._refused: list[dict] = []
        self._refused_count = 0

    def __len__(self) -> int:
        return len(self.index)

    def _part(self, record: int) -> tuple[ChatRecords, int]:
        return self.parts[int(self.sources[record])], int(self.local[record])

    def kind(self, record: int) -> int:
        return int(self.index.kinds[record])

    def line(self, record: int) -> int:
        return int(self.index.lines[record])

    def where(self, record: int) -> tuple[Path, int]:
        """(file, line) of record ``record``."""
        part, local = self._part(record)
        return part.path, part.line(local)

    def source_of(self, record: int) -> int:
        return int(self.sources[record])

    def read(self, record: int) -> dict:
        part, local = self._part(record)
        return part.read(local)

    def prompt_turns(self, record: int) -> tuple[list, list | None]:
        messages, tools = conversation(self.read(record), self.kind(record), self.config)
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return list(messages[:first]), tools

    def reject(self, refused: list[dict]) -> None:
        """Records the template refused (by line; the sources' files are not told apart)."""
        self._refused.extend(refused)
        self._refused_count += len(refused)

    @property
    def rejected(self) -> list[dict]:
        lines = [dict(r, file=str(p.path)) for p in self.parts for r in p.rejected]
        return lines + sorted(self._refused, key=lambda r: r["line"])

    @property
    def rejected_count(self) -> int:
        return sum(p.rejected_count for p in self.parts) + self._refused_count
