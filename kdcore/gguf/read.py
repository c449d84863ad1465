"""A GGUF file's header: metadata and tensor descriptions, read without loading weights
(``kd validate`` stays cheap). Through the ``gguf`` package, llama.cpp's own reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcore.errors import CheckpointError

# Arrays kept out of a metadata summary (tens of thousands of entries each).
BULKY = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
)


def require_gguf():
    try:
        import gguf
    except ImportError as exc:
        raise CheckpointError(
            "reading GGUF files needs the gguf package: pip install 'kdcore[mlx-lm]'"
        ) from exc
    return gguf


def open_gguf(path: str | Path):
    """llama.cpp's ``GGUFReader`` on ``path`` (memory-mapped: no weights are read)."""
    gguf = require_gguf()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic at its start)")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
        raise CheckpointError(f"{path}: unreadable GGUF header ({exc})") from exc


def read_metadata(path: str | Path, skip: tuple[str, ...] = (), reader=None) -> dict[str, Any]:
    """Every metadata key of ``path`` as plain Python values (str, int, float, bool,
    lists of them), less the keys in ``skip``. ``reader``: an open ``open_gguf(path)``
    (parsing a 49k-token header takes seconds: open it once)."""
    reader = reader or open_gguf(path)
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in skip or key.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable metadata value {key!r} ({exc})") from exc
        out[key] = value
    return out


def tensor_types(path: str | Path) -> dict[str, str]:
    """``{tensor name: GGML type name}`` (``"Q4_1"``, ``"F32"``...)."""
    return {t.name: t.tensor_type.name for t in open_gguf(path).tensors}
