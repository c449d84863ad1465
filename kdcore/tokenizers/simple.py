"""Byte- and character-level tokenizers, saved with every run as ``tokenizer.json``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kdcore.errors import CheckpointError
from kdcore.io import write_json


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, lossless for any text."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def tokens(self) -> list[str]:
        """The string of each token id, used to check that two vocabularies really match."""
        return [bytes([i]).decode("latin-1") for i in range(256)]

    def to_json(self) -> dict:
        return {"type": "byte"}


class CharTokenizer:
    """One token per character seen in the training text; id 0 stands for unknown ones."""

    kind = "char"
    UNKNOWN = "\ufffd"

    def __init__(self, chars: list[str]):
        self.chars = [self.UNKNOWN] + [c for c in chars if c != self.UNKNOWN]
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, 0) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < len(self.chars))

    def tokens(self) -> list[str]:
        return list(self.chars)

    def to_json(self) -> dict:
        return {"type": "char", "chars": self.chars[1:]}


Tokenizer = ByteTokenizer | CharTokenizer


def fingerprint(tokenizer) -> str:
    """A hash of the token strings: equal exactly when the vocabularies match."""
    payload = json.dumps(tokenizer.tokens(), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:16]


def tokenizer_from_json(data: dict, where: str = "tokenizer.json", source=None):
    kind = data.get("type")
    if kind is None and "model" in data:  # a Hugging Face tokenizers file (mlx-lm models)
        from kdcore.tokenizers.hf import HFTokenizer

        return HFTokenizer.from_json(data, source)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char" and isinstance(data.get("chars"), list):
        return CharTokenizer(data["chars"])
    raise CheckpointError(f"{where}: unknown tokenizer {kind!r} (expected 'byte' or 'char')")


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    write_json(Path(directory) / "tokenizer.json", tokenizer.to_json())


def load_tokenizer(directory: str | os.PathLike):
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"tokenizer not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and "model" in data:  # a Hugging Face folder: is it code?
        from kdcore.tokenizers.hf import AS_DATA, folder_code, warn_folder_code

        warn_folder_code(directory, folder_code(directory, "tokenizer"), AS_DATA)
    return tokenizer_from_json(data, str(path), Path(directory))
