"""Datasets: a plain text corpus and prompt/response JSONL, batched deterministically.

Batch ``i`` of a run is a pure function of (seed, i): resuming at a data position gives the
same batches as the uninterrupted run, and two runs with one seed see the same data.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from kdcore.errors import SpecError
from kdcore.hub import resolve_data_path, resolve_tokenizer_dir
from kdcore.losses.tokens import IGNORE_INDEX
from kdcore.spec import validators
from kdcore.tokenizers.simple import ByteTokenizer, CharTokenizer, load_tokenizer


def resolve_tokenizer(
    spec: str,
    base_dir: Path,
    text_for_char: str | None = None,
    where: str = "$.data.params.tokenizer",
):
    """``"byte"``, ``"char"`` (built from the text), a folder holding ``tokenizer.json``, or a
    Hugging Face hub name (``owner/name[@revision]``) whose tokenizer files are read through
    the hub cache."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "char":
        if text_for_char is None:
            raise SpecError("the char tokenizer is built from a text dataset")
        return CharTokenizer.from_text(text_for_char)
    return load_tokenizer(resolve_tokenizer_dir(spec, base_dir, where))


# Bytes read at a time; a text file is decoded chunk by chunk so that ``max_chars`` bounds
# what is read (a data path of /dev/zero must not fill memory).
CHUNK_BYTES = 1 << 20
# Longest JSONL line read (a record is kilobytes; a file with no newline is not JSONL).
MAX_LINE_BYTES = 64 << 20
# Windows editors (Notepad, Excel's "UTF-8 CSV") open a UTF-8 file with a byte-order mark:
# it is not part of the text, and json.loads refuses a line that starts with it.
BOM = codecs.BOM_UTF8


def _strip_bom(raw: bytes) -> bytes:
    """``raw`` (a file's first bytes) without a UTF-8 byte-order mark."""
    return raw[len(BOM) :] if raw.startswith(BOM) else raw


def _check_readable(path: Path, bounded: bool) -> None:
    if not path.exists():
        raise SpecError(f"data file not found: {path}")
    if path.is_dir():
        raise SpecError(f"data path {path} is a directory, not a file")
    if not path.is_file() and not bounded:
        # a device or a pipe may never end: read one only up to a limit
        raise SpecError(
            f"data path {path} is not a regular file; set max_chars to read from a device or a pipe"
        )


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


class _Reading:
    """Turn the ways reading a data file fails into SpecErrors naming the file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, _tb) -> bool:
        if exc is None or isinstance(exc, SpecError):
            return False
        if isinstance(exc, (gzip.BadGzipFile, EOFError, zlib.error)):
            raise SpecError(
                f"data file {self.path} is not a whole gzip file ({exc or 'cut short'})"
            ) from None
        if isinstance(exc, OSError):
            raise SpecError(f"cannot read data file {self.path}: {exc.strerror or exc}") from None
        return False


def open_text(path: Path, max_chars: int | None = None) -> str:
    """A UTF-8 text file (``.gz``: gzip-compressed), at most ``max_chars`` characters of it,
    read no further than that. Raises ``SpecError`` naming the file (and, for bytes that are
    not UTF-8, the line)."""
    path = Path(path)
    _check_readable(path, bounded=max_chars is not None)
    # universal newlines, as text mode reads: \r\n and \r become \n
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)
    pieces: list[str] = []
    chars = lines = 0
    with _Reading(path), _open_binary(path) as handle:
        first = True
        while max_chars is None or chars < max_chars:
            block = handle.read(CHUNK_BYTES)
            if first:  # the first block holds all of a mark: a read returns all it asks but at EOF
                block, first = _strip_bom(block), False
            pending = decoder.getstate()[0]  # bytes of a character split across blocks
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                where = lines + (pending + block)[: exc.start].count(b"\n") + 1
                raise SpecError(
                    f"data file {path}: line {where} is not valid UTF-8 ({exc.reason})"
                ) from None
            lines += block.count(b"\n")
            pieces.append(text)
            chars += len(text)
            if not block:
                break
    text = "".join(pieces)
    return text[:max_chars] if max_chars is not None else text


class Dataset:
    """The base of a dataset component: fixed-length examples split into train and val;
    subclasses fill ``_examples``. It satisfies the dataset protocol the engine reads
    (``kdcore.protocols.Dataset``: ``tokenizer``, ``num_examples``, ``num_tokens``,
    ``batch``).

    ``_examples[split]`` is a dict of equal-length NumPy arrays, first axis = examples.

    Example::

        class Lines(kdcore.Dataset):
            def __init__(self, config, setup):
                self.tokenizer = app.resolve_tokenizer(config.tokenizer, setup.base_dir)
                self._examples = {"train": ..., "val": ...}
    """

    tokenizer: Any
    _examples: dict[str, dict[str, np.ndarray]]
    seed: int = 0

    def num_examples(self, split: str = "train") -> int:
        return len(self._examples[split]["input_ids"])

    def num_tokens(self, split: str = "train") -> int:
        return int(self._examples[split]["mask"].sum())

    def batch(self, index: int, batch_size: int, split: str = "train") -> dict[str, np.ndarray]:
        """Batch number ``index``: examples drawn without replacement, epoch by epoch.

        ``example_index`` [B] says which examples of the split the rows are (an offline
        teacher cache is looked up by it).
        """
        n = self.num_examples(split)
        if n == 0:
            raise SpecError(
                f"the {split} split is empty: more data or a smaller seq_len @ $.data.params"
            )
        picks = []
        for sample in range(index * batch_size, (index + 1) * batch_size):
            epoch, k = divmod(sample, n)
            if split == "train":
                order = np.random.default_rng([self.seed, epoch]).permutation(n)
                picks.append(order[k])
            else:
                picks.append(k)
        picks = np.asarray(picks)
        batch = {key: value[picks] for key, value in self._examples[split].items()}
        batch["example_index"] = picks.astype(np.int32)
        return batch

    def batches(
        self, batch_size: int, split: str = "val", limit: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive batches covering the split once (the last one may be short)."""
        n = self.num_examples(split)
        count = 0
        for start in range(0, n, batch_size):
            if limit is not None and count >= limit:
                return
            batch = {k: v[start : start + batch_size] for k, v in self._examples[split].items()}
            rows = len(batch["input_ids"])
            batch["example_index"] = np.arange(start, start + rows, dtype=np.int32)
            yield batch
            count += 1

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for split in ("train", "val"):
            for key in sorted(self._examples[split]):
                digest.update(key.encode())
                digest.update(np.ascontiguousarray(self._examples[split][key]).tobytes())
        return digest.hexdigest()[:16]

    def inspect(self, limit: int = 3) -> dict:
        report = {
            "examples": {s: self.num_examples(s) for s in ("train", "val")},
            "loss_tokens": {s: self.num_tokens(s) for s in ("train", "val")},
            "records_read": getattr(self, "records_read", None),
            "rejected": getattr(self, "rejected", []),
            "samples": [],
        }
        for i in range(min(limit, self.num_examples("train"))):
            ids = self._examples["train"]["input_ids"][i]
            labels = self._examples["train"]["labels"][i]
            carried = [int(t) for t in labels if t != IGNORE_INDEX]
            report["samples"].append(
                {
                    "text": self.tokenizer.decode(ids),
                    "loss_text": self.tokenizer.decode(carried),
                    "tokens": int(len(ids)),
                    "loss_tokens": len(carried),
                }
            )
        return report


def _windows(tokens: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    count = max(0, (len(tokens) - 1) // seq_len)
    idx = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    chunk = tokens[idx] if count else np.zeros((0, seq_len + 1), np.int32)
    return {
        "input_ids": chunk[:, :-1].astype(np.int32),
        "labels": chunk[:, 1:].astype(np.int32),
        "mask": np.ones((count, seq_len), np.float32),
    }


@attrs.define
class TextConfig:
    path: str
    tokenizer: str = "byte"
    seq_len: int = attrs.field(default=128, validator=validators.positive)
    val_fraction: float = attrs.field(
        default=0.1, validator=[validators.number, validators.fraction]
    )
    max_chars: int | None = None


class TextDataset(Dataset):
    """A UTF-8 text file cut into windows of ``seq_len`` tokens; the tail is the val split."""

    def __init__(self, config: TextConfig, setup):
        # a local file, or a hub dataset's "text" column written to one
        path = resolve_data_path(config.path, setup.base_dir, fmt="text")
        text = open_text(path, config.max_chars or None)
        self.seed = setup.seed
        self.tokenizer = setup.tokenizer or resolve_tokenizer(
            config.tokenizer, setup.base_dir, text
        )
        tokens = np.asarray(self.tokenizer.encode(text), dtype=np.int32)
        cut = int(len(tokens) * (1 - config.val_fraction))
        self._examples = {
            "train": _windows(tokens[:cut], config.seq_len),
            "val": _windows(tokens[cut:], config.seq_len),
        }
        self.records_read = 1


@attrs.define
class JsonlConfig:
    path: str
    prompt_key: str = "prompt"
    response_key: str = "response"
    tokenizer: str = "byte"
    seq_len: int = attrs.field(default=256, validator=validators.positive)
    val_fraction: float = attrs.field(
        default=0.1, validator=[validators.number, validators.fraction]
    )
    separator: str = ""
    max_records: int | None = None


def read_jsonl(path: Path, limit: int | None = None) -> tuple[list[tuple[int, dict]], list[dict]]:
    """(line number, record) for each parsable line, and the rejected lines with reasons (a
    line that is not UTF-8 is one). A missing, unreadable or cut-short file raises
    ``SpecError``; so does a line longer than ``MAX_LINE_BYTES``."""
    path = Path(path)
    _check_readable(path, bounded=True)  # lines are bounded by MAX_LINE_BYTES
    records, rejected = [], []
    with _Reading(path), _open_binary(path) as handle:
        number = 0
        while limit is None or len(records) < limit:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            if len(raw) > MAX_LINE_BYTES:
                raise SpecError(
                    f"data file {path}: line {number + 1} is longer than "
                    f"{MAX_LINE_BYTES >> 20} MiB (not JSONL?)"
                )
            if not number:
                raw = _strip_bom(raw)
            # universal newlines, as text mode reads: a lone \r ends a line too
            for part in raw.splitlines():
                number += 1
                if limit is not None and len(records) >= limit:
                    break
                _parse_line(part, number, records, rejected)
    return records, rejected


def _parse_line(raw: bytes, number: int, records: list, rejected: list) -> None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        rejected.append({"line": number, "reason": f"not valid UTF-8 ({exc.reason})"})
        return
    if not line.strip():
        return
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        rejected.append({"line": number, "reason": f"not JSON: {exc.msg}"})
        return
    except (ValueError, RecursionError) as exc:  # a 5,000-digit number, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:80]
        rejected.append({"line": number, "reason": f"not JSON: {reason}"})
        return
    if not isinstance(record, dict):
        rejected.append({"line": number, "reason": "not a JSON object"})
        return
    # UTF-8 bytes cannot hold a surrogate, but a JSON escape can (valid JSON, a Python
    # string, yet no tokenizer's input): only a line with such an escape needs the check.
    if b"\\ud" in raw or b"\\uD" in raw:
        surrogate = _lone_surrogate(record)
        if surrogate is not None:
            reason = f"not Unicode text: a lone surrogate {ascii(surrogate)} (half of a pair)"
            rejected.append({"line": number, "reason": reason})
            return
    records.append((number, record))


def _lone_surrogate(record: dict) -> str | None:
    """The first unpaired surrogate in ``record``'s strings (keys too), or None."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.object[exc.start]
    except (ValueError, RecursionError):  # json.loads read it: only a guard
        return None
    return None


def encode_prompt_response(tokenizer, pairs: list[tuple[str, str]], seq_len: int):
    """Token windows where only response tokens carry loss; padded with id 0."""
    n = len(pairs)
    ids = np.zeros((n, seq_len + 1), np.int32)
    carries = np.zeros((n, seq_len + 1), bool)
    for row, (prompt, response) in enumerate(pairs):
        p, r = tokenizer.encode(prompt), tokenizer.encode(response)
        seq = (p + r)[: seq_len + 1]
        ids[row, : len(seq)] = seq
        carries[row, len(p) : len(seq)] = True
    labels = np.where(carries[:, 1:], ids[:, 1:], IGNORE_INDEX).astype(np.int32)
    return {"input_ids": ids[:, :-1], "labels": labels, "mask": carries[:, 1:].astype(np.float32)}


class JsonlDataset(Dataset):
    """Prompt/response records; loss on the response tokens only."""

    def __init__(self, config: JsonlConfig, setup):
        path = resolve_data_path(config.path, setup.base_dir)  # a local or a hub dataset
        records, self.rejected = read_jsonl(path, config.max_records)
        self.records_read = len(records) + len(self.rejected)
        self.seed = setup.seed
        self.tokenizer = setup.tokenizer or resolve_tokenizer(config.tokenizer, setup.base_dir)
        pairs = []
        for number, record in records:
            prompt, response = record.get(config.prompt_key), record.get(config.response_key)
            if not isinstance(prompt, str) or not isinstance(response, str):
                self.rejected.append(
                    {
                        "line": number,
                        "reason": f"needs string fields {config.prompt_key!r} "
                        f"and {config.response_key!r}",
                    }
                )
                continue
            pairs.append((prompt + config.separator, response))
        cut = int(len(pairs) * (1 - config.val_fraction))
        self._examples = {
            "train": encode_prompt_response(self.tokenizer, pairs[:cut], config.seq_len),
            "val": encode_prompt_response(self.tokenizer, pairs[cut:], config.seq_len),
        }
