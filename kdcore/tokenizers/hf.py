"""Hugging Face tokenizers (``tokenizer.json``) behind kdcore's tokenizer interface, and the
byte strings of their tokens."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from kdcore.errors import SpecError
from kdcore.io import read_json, write_json


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE vocabularies
    store token strings in these characters)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class HFTokenizer:
    """A ``tokenizers`` tokenizer (a Hugging Face ``tokenizer.json``) with kdcore's interface.

    ``tokens()`` gives each id's bytes as Latin-1 text, so a byte-level vocabulary whose ids
    are the byte values has the same fingerprint as ``ByteTokenizer``. ``to_json()`` is the
    ``tokenizer.json`` content itself. ``source`` is the folder it was read from, when known:
    a student saved with this tokenizer ships that folder's files (chat template, special
    tokens, generation config), not just ``tokenizer.json``.
    """

    kind = "hf"

    def __init__(self, tokenizer: Any, source: str | Path | None = None):
        self._tok = tokenizer
        self._bytes: list[bytes] | None = None
        self.source = Path(source) if source is not None else None

    @classmethod
    def from_json(cls, data: dict, source: str | Path | None = None) -> HFTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(json.dumps(data)), source)

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), Path(path).parent)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes of every id (computed once)."""
        if self._bytes is None:
            self._bytes = _hf_token_bytes(self._tok, self.vocab_size)
        return self._bytes

    def tokens(self) -> list[str]:
        return [b.decode("latin-1") for b in self.token_bytes()]

    def special_ids(self) -> set[int]:
        """Ids of special tokens (``<|endoftext|>``...): markers, not text."""
        added = json.loads(self._tok.to_str()).get("added_tokens", [])
        return {t["id"] for t in added if t.get("special")}

    def to_json(self) -> dict:
        return json.loads(self._tok.to_str())


def _hf_token_bytes(tok: Any, size: int) -> list[bytes]:
    data = json.loads(tok.to_str())
    decoder = json.dumps(data.get("decoder") or {})
    byte_level = '"ByteLevel"' in decoder
    metaspace = '"Metaspace"' in decoder or "\u2581" in decoder
    special = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    out = []
    for i in range(size):
        piece = tok.id_to_token(i)
        if piece is None:
            out.append(b"")
        elif i in special:
            out.append(special[i].encode("utf-8"))
        elif byte_level and all(c in inverse for c in piece):
            out.append(bytes(inverse[c] for c in piece))
        elif m := _BYTE_FALLBACK.match(piece):
            out.append(bytes([int(m.group(1), 16)]))
        elif metaspace:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
        else:
            out.append(piece.encode("utf-8"))
    return out


def byte_level_tokenizer_json() -> dict:
    """A ``tokenizer.json`` whose ids are the UTF-8 byte values (0..255), like
    ``ByteTokenizer``: a byte-level BPE with no merges. mlx-lm can load and stream-decode it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return json.loads(tok.to_str())


def train_bpe_tokenizer_json(
    text: str, vocab_size: int = 512, special_tokens: tuple[str, ...] = ("<|endoftext|>",)
) -> dict:
    """A byte-level BPE trained on ``text`` with the ``tokenizers`` library (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special_tokens),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return json.loads(tok.to_str())


def write_hf_tokenizer(
    directory: str | Path, tokenizer_json: dict, eos_token: str | None = None
) -> None:
    """Write ``tokenizer.json`` and the ``tokenizer_config.json`` that lets
    ``transformers.AutoTokenizer`` (hence ``mlx_lm.load``) open it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "tokenizer.json", tokenizer_json)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    if eos_token is not None:
        config["eos_token"] = eos_token
    write_json(directory / "tokenizer_config.json", config)


def token_byte_strings(tokenizer: Any) -> list[bytes]:
    """The UTF-8 bytes each id of ``tokenizer`` stands for."""
    if hasattr(tokenizer, "token_bytes"):
        return tokenizer.token_bytes()
    kind = getattr(tokenizer, "kind", None)
    if kind == "byte":
        return [bytes([i]) for i in range(256)]
    # Character vocabularies (and any tokenizer whose tokens() are text): UTF-8 of the text.
    return [t.encode("utf-8") for t in tokenizer.tokens()]


def load_hf_tokenizer(directory: Path) -> HFTokenizer | None:
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        return None
    data = read_json(path, "tokenizer")
    if "model" not in data:  # a kdcore tokenizer.json ({"type": "byte"})
        return None
    require_mlx_lm()
    warn_folder_code(directory, folder_code(directory, "tokenizer"), AS_DATA)
    return HFTokenizer.from_json(data, directory)


def require_mlx_lm():
    try:
        import mlx_lm  # noqa: F401
    except ImportError as exc:
        raise SpecError(
            "mlx-lm models need the optional extra: pip install 'kdcore[mlx-lm]'"
        ) from exc
    return sys.modules["mlx_lm"]


# ---------------------------------------------------------------- code in a model folder
#
# A model or tokenizer folder may name Python of its own: ``auto_map`` entries in
# tokenizer_config.json / config.json (transformers imports the module they name), or
# mlx-lm's ``model_file``. A folder is data, often downloaded: kdcore never runs its code.
# Every load passes ``trust_remote_code=False`` and says what the folder asked for; a load
# that cannot work without the code is refused.

NEVER = "kdcore never runs code from a model folder"
AS_DATA = "its tokenizer.json is read as data, which that code may tokenize differently"
_warned: set[tuple[str, tuple[str, ...]]] = set()


def folder_code(folder: str | Path, what: str) -> list[str]:
    """The Python ``folder`` asks to run to load its ``what`` (``"tokenizer"`` or
    ``"model"``), as ``"FILE: auto_map.KEY = module.Class"`` lines: a tokenizer's are its
    tokenizer_config.json ``auto_map`` and config.json's ``AutoTokenizer`` (transformers
    reads both); a model's, config.json's ``auto_map`` and ``model_file``. A file that
    cannot be read asks for nothing here (its loader reports it)."""
    folder = Path(folder)
    found = []
    names = ("tokenizer_config.json", "config.json") if what == "tokenizer" else ("config.json",)
    for name in names:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(data, dict):
            continue
        auto_map = data.get("auto_map")
        for key, value in auto_map.items() if isinstance(auto_map, dict) else ():
            if what == "tokenizer" and name == "config.json" and key != "AutoTokenizer":
                continue  # model classes: not the tokenizer's
            refs = value if isinstance(value, list) else [value]
            shown = " / ".join(str(r) for r in refs if r is not None)
            found.append(f"{name}: auto_map.{key} = {shown}")
        if what == "model" and data.get("model_file") is not None:
            found.append(f"{name}: model_file = {data['model_file']}")
    return found


def warn_folder_code(folder: str | Path, requests: list[str], instead: str) -> None:
    """Say once per folder (on stderr) that its code was not run, and what was done
    ``instead``."""
    key = (str(folder), tuple(requests))
    if not requests or key in _warned:
        return
    _warned.add(key)
    print(
        f"warning: {folder} asks to run its own Python ({'; '.join(requests)}); {NEVER}: {instead}",
        file=sys.stderr,
    )


def load_mlx_tokenizer(folder: str | Path, where: str) -> Any:
    """mlx-lm's ``TokenizerWrapper`` of ``folder`` (``mlx_lm.tokenizer_utils.load``), through
    transformers with ``trust_remote_code=False``: a folder whose tokenizer class is its own
    code is refused with the entry named (``where``: the spec place); one whose class
    transformers has loads with that class, and a warning."""
    require_mlx_lm()
    from mlx_lm.tokenizer_utils import load

    folder = Path(folder)
    requests = folder_code(folder, "tokenizer")
    try:
        wrapper = load(folder, tokenizer_config_extra={"trust_remote_code": False})
    except Exception as exc:  # transformers' errors for a broken folder vary
        if requests and _is_code_refusal(exc):
            raise SpecError(
                f"{folder} asks to run its own Python to load its tokenizer "
                f"({'; '.join(requests)}); {NEVER} @ {where}"
            ) from None
        raise SpecError(f"cannot load the tokenizer in {folder}: {exc} @ {where}") from None
    warn_folder_code(folder, requests, "transformers' own tokenizer class is used")
    return wrapper


def _is_code_refusal(exc: Exception) -> bool:
    # transformers' refusal of a folder's code names the option it was refused by
    return isinstance(exc, ValueError) and "trust_remote_code" in str(exc)
