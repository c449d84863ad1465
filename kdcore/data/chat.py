"""The ``chat`` dataset: mlx-lm's JSONL record formats, rendered with the tokenizer's own
chat template, loss on assistant turns, packed rows, read in bounded memory.

Records (one JSON object a line, ``.gz`` allowed), recognised per record in mlx-lm's order
(``mlx_lm/tuner/datasets.py``, ``create_dataset``):

- ``{"prompt": ..., "completion": ...}`` (optionally ``"tools"``): rendered as a user turn and
  an assistant turn;
- ``{"messages": [{"role", "content"}, ...]}`` (optionally ``"tools"``; assistant turns may
  carry ``tool_calls`` instead of content): roles ``system``, ``user``, ``assistant``,
  ``tool``;
- ``{"text": ...}``: tokenized as is, an end-of-sequence token added when missing, every
  token carrying loss (mlx-lm's ``TextDataset``).

Chat and completion records are rendered by the chat template of the tokenizer folder
(``tokenizer_config.json`` / ``chat_template.jinja``), loaded through mlx-lm's
``TokenizerWrapper`` as ``mlx_lm`` trains with it, and tokenized as its
``apply_chat_template`` tokenizes (no special tokens added: the template has them).

Which tokens carry loss: with ``mask_prompt = true`` (the default), those of every
assistant turn: what rendering the turn adds after the generation prompt (its content,
tool calls and end-of-turn marker, e.g. Qwen's ``<|im_end|>\\n``). The span of turn ``k`` is
found by rendering incrementally: ``messages[:k]`` with ``add_generation_prompt=True`` and
``messages[:k+1]`` are both prefixes of the whole rendering; the characters between them are
the turn, and a token carries loss when its first character lies in one. This works with any
template (most shipped ones have no ``{% generation %}`` tags, so transformers'
``return_assistant_tokens_mask`` cannot be used with them) and is how mlx-lm itself finds its
``mask_prompt`` offset. A template that does not render prefix by prefix (one that rewrites
earlier turns) falls back to finding the turn's content in the text. mlx-lm's own
``mask_prompt`` trains on the last message only; here every assistant turn carries loss.
``mask_prompt = false`` keeps loss on every token. A record's first token never carries loss
(nothing in the record precedes it).

Rows hold ``seq_len + 1`` tokens (``seq_len`` inputs, each predicting the next). A record
longer than that is cut to its first ``seq_len + 1`` tokens; ``stats()`` and ``kd data
inspect`` count the cut records and tokens. With ``pack = true`` several records share a row
(attention stays causal over the whole row: a record sees the records before it in its row,
as in most packed training; the built-in models take no attention mask); ``stats()``
reports the padding share. ``pack = false``: one record a row, padded (id 0).

Memory: one pass over the file checks every line (JSON, shape, roles: bad lines are
rejected with their number, the rest kept) and keeps ~30 bytes a record (byte offset,
length, line number, size); a ``.gz`` file is decompressed into an anonymous temporary file
on disk for random access. Records are then read, rendered and tokenized a *segment* at a
time (``PACK_ROWS`` rows of records), when a batch first needs them; a few segments are kept.
A record the template refuses (a Jinja ``raise_exception``) is rejected when first rendered.

Rows are fixed by the data and the parameters alone: the train records, in an order fixed by
``PACK_SEED``, are cut into segments by an estimate of their token counts (a least-squares
fit of tokens on characters and turns over a sample rendered at start-up): a record
estimated at a row or more takes a row, shorter ones are aimed at ``PACK_FILL`` of the room
they take. A segment's records are then placed into its rows exactly, longest first, each
into the fullest row it fits in; one that fits nowhere (the estimate was low) is cut to the
room left and counted as ``overflow`` in ``stats()`` (on the HH dialogues at ``seq_len``
512 with a small BPE: 1% of the records, 17 tokens each; padding 9%). Train batch ``i`` is
a pure function of (seed, i): each epoch visits the segments in an order drawn from (seed,
epoch), their rows in turn. The val split is the last ``val_fraction`` of the records, in
file order.

On-policy methods read the prompt part of the records: :meth:`ChatDataset.prompts` gives,
per record, the tokens of everything before its first assistant turn's content as the
template renders it with ``add_generation_prompt=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import OrderedDict
from pathlib import Path

import attrs
import numpy as np

from kdcore.data.datasets import (
    MAX_LINE_BYTES,
    _check_readable,
    _fraction,
    _open_binary,
    _parse_line,
    _positive,
    _Reading,
)
from kdcore.errors import SpecError
from kdcore.hub import resolve_data_path, resolve_tokenizer_dir
from kdcore.losses.tokens import IGNORE_INDEX
from kdcore.tokenizers.hf import HFTokenizer, require_mlx_lm
from kdcore.tokenizers.simple import fingerprint

TEXT, CHAT, COMPLETION = 0, 1, 2
FORMATS = {TEXT: "text", CHAT: "messages", COMPLETION: "prompt/completion"}
ROLES = ("system", "user", "assistant", "tool")
# Rows per segment: the unit read, rendered and packed together (more rows pack tighter,
# fewer read less per batch).
PACK_ROWS = 16
# Share of a segment's room its records' estimated tokens aim at: the headroom absorbs the
# estimate's error, so that records almost never overflow.
PACK_FILL = 0.9
# The order of the train records in segments: fixed, so the rows (and an offline teacher
# cache made for them) do not depend on the run's seed.
PACK_SEED = 0
# Records rendered at start-up to fit the token estimate.
CALIBRATION_RECORDS = 64
# Segments kept rendered.
KEPT_SEGMENTS = 8
# Rejections kept in detail (all are counted).
KEPT_REJECTIONS = 1000
# Records ``inspect`` renders for its statistics (the rest are left out and said to be).
INSPECT_RECORDS = 50_000
# Bumped when the same data and parameters would give other rows (a cache made for the old
# rows then no longer matches).
LAYOUT_VERSION = 1
# Marks around the text of loss-carrying tokens in ``inspect``'s samples.
LOSS_OPEN, LOSS_CLOSE = "⟦", "⟧"

_BREAK = re.compile(rb"\r\n|\r|\n")


@attrs.define
class ChatConfig:
    path: str
    tokenizer: str  # a folder: tokenizer.json and tokenizer_config.json with a chat_template
    seq_len: int = attrs.field(default=512, validator=_positive)
    mask_prompt: bool = True
    pack: bool = True
    val_fraction: float = attrs.field(default=0.1, validator=_fraction)
    max_records: int | None = None
    # mlx-lm's names for the record keys (its lora config's *_feature options)
    chat_feature: str = "messages"
    prompt_feature: str = "prompt"
    completion_feature: str = "completion"
    text_feature: str = "text"


# ---------------------------------------------------------------- the index pass


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


# ---------------------------------------------------------------- rendering


@attrs.define
class Encoded:
    """One record as tokens: ``ids`` [n] int32, ``carries`` [n] bool (loss), and the text
    the tokens are of."""

    ids: np.ndarray
    carries: np.ndarray
    text: str


class ChatRenderer:
    """A tokenizer folder's chat template and tokenizer, as mlx-lm loads them."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise SpecError(
                f"the chat dataset needs a Hugging Face tokenizer folder: {folder} has no "
                "tokenizer.json @ $.data.params.tokenizer"
            )
        require_mlx_lm()
        from mlx_lm.tokenizer_utils import load
        from tokenizers import Tokenizer

        try:
            self.wrapper = load(folder)
        except Exception as exc:  # transformers' errors for a broken folder vary
            raise SpecError(
                f"cannot load the tokenizer in {folder}: {exc} @ $.data.params.tokenizer"
            ) from None
        self.folder = folder
        template = getattr(self.wrapper, "chat_template", None)
        self.template = template if isinstance(template, str) else json.dumps(template)
        self.has_template = bool(self.wrapper.has_chat_template)
        # A private copy of transformers' backend tokenizer: the ids apply_chat_template
        # gives, with character offsets, and no padding or truncation state shared.
        self.encoder = Tokenizer.from_str(self.wrapper.backend_tokenizer.to_str())
        self.encoder.no_truncation()
        self.encoder.no_padding()
        self.tokenizer = HFTokenizer(self.encoder, source=folder)
        self.eos = self.wrapper.eos_token_id
        self._turn_end: str | None = None

    def render(self, messages: list, tools: list | None, generation: bool = False) -> str:
        return self.wrapper.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation
        )

    def turn_end(self) -> str:
        """What the template writes after an assistant turn's content (``<|im_end|>\\n``):
        found once by rendering a probe conversation."""
        if self._turn_end is None:
            marker = "\u2063kd-probe\u2063"
            try:
                text = self.render(
                    [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                    None,
                )
                self._turn_end = text[text.index(marker) + len(marker) :]
            except Exception:  # a template that refuses the probe: no suffix known
                self._turn_end = ""
        return self._turn_end

    def assistant_spans(self, messages: list, tools: list | None, text: str) -> list:
        """(start, end) characters of each assistant turn in ``text`` (the rendering of
        ``messages``): rendered prefix by prefix, else found by its content."""
        spans, cursor = [], 0
        last = len(messages) - 1
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            span = None
            try:
                before = self.render(messages[:k], tools, generation=True) if k else None
                upto = text if k == last else self.render(messages[: k + 1], tools)
            except Exception:
                before = upto = None
            opens = before is not None and text.startswith(before) and len(before) >= cursor
            if opens and upto is not None and text.startswith(upto) and len(upto) > len(before):
                span = (len(before), len(upto))
            elif opens:  # a template that rewrites earlier turns (drops their reasoning)
                span = self._close(text, len(before))
            else:
                span = self._find(message, text, cursor)
            if span is None:
                raise ValueError(
                    f"assistant turn {k + 1} cannot be located in the template's rendering"
                )
            spans.append(span)
            cursor = span[1]
        return spans

    def _close(self, text: str, start: int) -> tuple[int, int] | None:
        """The turn that starts at ``start``: through the first end-of-turn marker after it
        (with what the template writes around the marker, e.g. the newline after it)."""
        whole = self.turn_end()
        marker = whole.strip()
        at = text.find(marker, start) if marker else -1
        if at < 0:
            return None
        lead = whole.index(marker)
        if text.startswith(whole, at - lead):
            return start, at - lead + len(whole)
        return start, at + len(marker)

    def _find(self, message: dict, text: str, cursor: int) -> tuple[int, int] | None:
        content = message.get("content")
        if not isinstance(content, str) or not content:
            return None
        start = text.find(content, cursor)
        if start < 0:
            return None
        end = start + len(content)
        suffix = self.turn_end()
        if suffix and text.startswith(suffix, end):
            end += len(suffix)
        return start, end


# ---------------------------------------------------------------- packing


@attrs.define
class _Plan:
    """A split's rows: its records in segment order, where each segment starts in that order
    and in the rows."""

    order: np.ndarray  # record ids
    seg_starts: np.ndarray  # [segments + 1] into order
    row_starts: np.ndarray  # [segments + 1] example ids

    @property
    def segments(self) -> int:
        return len(self.seg_starts) - 1

    @property
    def rows(self) -> int:
        return int(self.row_starts[-1])


def _fit_estimate(turns: np.ndarray, chars: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Coefficients (per record, per turn, per character) of a least-squares fit of token
    counts, none negative (a negative one is dropped and the rest refitted)."""
    features = np.stack([np.ones(len(chars)), turns, chars], axis=1).astype(np.float64)
    active = [0, 1, 2]
    coef = np.zeros(3)
    while active:
        solution = np.linalg.lstsq(features[:, active], tokens.astype(np.float64), rcond=None)[0]
        if (solution >= 0).all():
            coef[:] = 0
            coef[active] = solution
            return coef
        active = [a for a, s in zip(active, solution) if s >= 0]
    return np.array([float(np.mean(tokens)), 0.0, 0.0])


_STATS = (
    "records",
    "rejected",
    "tokens",
    "loss_tokens",
    "cut_records",
    "cut_tokens",
    "overflow_records",
    "overflow_tokens",
)


@attrs.define
class _Segment:
    ids: np.ndarray  # [rows, seq_len + 1] int32
    carries: np.ndarray  # [rows, seq_len + 1] bool
    layout: list  # per row: [(line, start, tokens)]
    stats: np.ndarray  # [len(_STATS)] int64


def _place(items: list[tuple[int, Encoded]], rows: int, room: int, pack: bool):
    """Records into ``rows`` rows of ``room`` tokens: one a row, or packed longest first,
    each into the fullest row it fits in (best fit decreasing), else cut to the room of the
    emptiest row. Yields (row, start, record index, tokens kept)."""
    if not pack:
        for row, (index, enc) in enumerate(items):
            yield row, 0, index, min(len(enc.ids), room)
        return
    left = [room] * rows
    for index, enc in sorted(items, key=lambda item: -min(len(item[1].ids), room)):
        size = min(len(enc.ids), room)
        fits = [r for r in range(rows) if left[r] >= size]
        row = (
            min(fits, key=lambda r: (left[r], r))
            if fits
            else max(range(rows), key=lambda r: (left[r], -r))
        )
        keep = min(size, left[row])
        if keep >= 2:  # a single token would carry no loss: not worth a place
            yield row, room - left[row], index, keep
            left[row] -= keep
        else:
            yield row, -1, index, 0


# ---------------------------------------------------------------- the dataset


class ChatDataset:
    """mlx-lm chat/completion/text JSONL rendered with the tokenizer's chat template; loss on
    assistant turns. See the module docstring for the formats, masks, packing and memory."""

    def __init__(self, config: ChatConfig, setup):
        self.config = config
        self.seed = setup.seed
        self.seq_len = config.seq_len
        # local paths, or hub names read through the Hugging Face caches (kdcore.hub)
        self.path = resolve_data_path(config.path, setup.base_dir)
        self.renderer = ChatRenderer(
            resolve_tokenizer_dir(config.tokenizer, setup.base_dir, "$.data.params.tokenizer")
        )
        self.tokenizer = self.renderer.tokenizer
        # kd eval passes the run's saved tokenizer: the template's folder must still hold it
        given = getattr(setup, "tokenizer", None)
        if given is not None and fingerprint(given) != fingerprint(self.tokenizer):
            raise SpecError(
                f"the tokenizer in {self.renderer.folder} is not the one this run was trained "
                "with @ $.data.params.tokenizer"
            )
        # A .gz file (or a pipe) cannot be read at an offset: its bytes go to a temporary
        # file on disk (gone when the dataset is), never into memory.
        spooled = self.path.suffix == ".gz" or not self.path.is_file()
        self._spool = tempfile.TemporaryFile() if spooled else None
        index, self._rejected, self._rejected_count, digest, self.records_read = _index_file(
            self.path, config, self._spool
        )
        self.index = index
        self.records = len(index)
        self._size = self._spool.tell() if self._spool else self.path.stat().st_size
        needs_template = bool((index.kinds != TEXT).any())
        if needs_template and not self.renderer.has_template:
            raise SpecError(
                f"tokenizer folder {self.renderer.folder} has no chat template "
                f"(tokenizer_config.json 'chat_template'): the chat records of {self.path} "
                "cannot be rendered @ $.data.params.tokenizer"
            )
        cut = int(self.records * (1 - config.val_fraction))
        self._coef = self._calibrate() if config.pack else np.zeros(3)
        self.plans = {
            "train": self._plan(np.arange(cut), shuffle=True),
            "val": self._plan(np.arange(cut, self.records), shuffle=False),
        }
        self._seg_stats = {
            split: np.full((plan.segments, len(_STATS)), -1, np.int64)
            for split, plan in self.plans.items()
        }
        self._late_rejected: list[dict] = []
        self._late_count = 0
        self._prompt_order: tuple | None = None
        self._segments: OrderedDict = OrderedDict()
        self._epoch_cache: tuple | None = None
        self._prompt_ids: dict[str, np.ndarray] = {}
        self._digest = digest
        self._fingerprint: str | None = None

    # ------------------------------------------------------------ records

    def _read(self, record: int) -> dict:
        offset, length = int(self.index.offsets[record]), int(self.index.lengths[record])
        line = int(self.index.lines[record])
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
            raise SpecError(f"data file {self.path} changed since it was read (line {line})")
        return parsed

    def _conversation(self, record: dict, kind: int) -> tuple[list, list | None]:
        tools = record.get("tools") or None
        if kind == COMPLETION:
            messages = [
                {"role": "user", "content": record[self.config.prompt_feature]},
                {"role": "assistant", "content": record[self.config.completion_feature]},
            ]
            return messages, tools
        return record[self.config.chat_feature], tools

    def encode(self, record: int) -> Encoded:
        """Record ``record`` (0-based, among the kept records in file order) as tokens and
        loss marks, uncut. Raises ``ValueError`` when the template refuses it."""
        data, kind = self._read(record), int(self.index.kinds[record])
        r = self.renderer
        if kind == TEXT:
            text = data[self.config.text_feature]
            ids = list(r.encoder.encode(text, add_special_tokens=True).ids)
            if r.eos is not None and (not ids or ids[-1] != r.eos):
                ids.append(r.eos)  # as mlx-lm's TextDataset
            carries = np.ones(len(ids), bool)
        else:
            messages, tools = self._conversation(data, kind)
            try:
                text = r.render(messages, tools)
            except Exception as exc:  # the template's own checks (raise_exception)
                raise ValueError(f"the chat template refuses it: {exc}") from None
            encoding = r.encoder.encode(text, add_special_tokens=False)
            ids = encoding.ids
            if self.config.mask_prompt:
                starts = np.fromiter((a for a, _ in encoding.offsets), np.int64, len(ids))
                carries = np.zeros(len(ids), bool)
                for a, b in r.assistant_spans(messages, tools, text):
                    carries |= (starts >= a) & (starts < b)
            else:
                carries = np.ones(len(ids), bool)
        if len(carries):
            carries[0] = False  # nothing in the record precedes its first token
        return Encoded(np.asarray(ids, np.int32), carries, text)

    def render(self, record: int) -> str:
        """The text record ``record`` is tokenized from (the template's rendering)."""
        return self.encode(record).text

    def prompted_records(self, split: str = "train") -> np.ndarray:
        """The records of ``split`` (``"train"`` or ``"val"``) that have a prompt: a turn
        before their first assistant turn. In file order."""
        return self._prompted(split)

    def prompt_turns(self, record: int) -> tuple[list, list | None]:
        """Record ``record``'s turns before its first assistant turn and its tools: the
        conversation :meth:`prompt` renders."""
        data, kind = self._read(record), int(self.index.kinds[record])
        messages, tools = self._conversation(data, kind)
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return list(messages[:first]), tools

    def prompt(self, record: int) -> list[int] | None:
        """The tokens before record ``record``'s first assistant turn's content, as the
        template renders them with ``add_generation_prompt=True``; None for a text record or
        one that opens with an assistant turn."""
        if not self.index.prompted[record]:
            return None
        data, kind = self._read(record), int(self.index.kinds[record])
        messages, tools = self._conversation(data, kind)
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        try:
            text = self.renderer.render(messages[:first], tools, generation=True)
        except Exception:
            return None
        return list(self.renderer.encoder.encode(text, add_special_tokens=False).ids)

    # ------------------------------------------------------------ rows

    def _calibrate(self) -> np.ndarray:
        """Fit the token estimate on up to ``CALIBRATION_RECORDS`` records spread over the
        file."""
        one_a_row = np.array([float(self.seq_len + 1), 0.0, 0.0])  # the safe estimate
        if not self.records:
            return one_a_row
        picks = np.unique(np.linspace(0, self.records - 1, CALIBRATION_RECORDS).astype(int))
        tokens, kept = [], []
        for record in picks:
            try:
                tokens.append(len(self.encode(int(record)).ids))
                kept.append(int(record))
            except ValueError:
                continue
        if not kept:
            return one_a_row
        kept = np.asarray(kept)
        return _fit_estimate(
            self.index.turns[kept], self.index.chars[kept], np.asarray(tokens, np.float64)
        )

    def _plan(self, records: np.ndarray, shuffle: bool) -> _Plan:
        n, room = len(records), self.seq_len + 1
        if shuffle and n:
            records = records[np.random.default_rng(PACK_SEED).permutation(n)]
        if not self.config.pack:
            seg_starts = np.append(np.arange(0, n, PACK_ROWS), n) if n else np.zeros(1, int)
            rows = np.diff(seg_starts)
        else:
            c = self._coef
            est = c[0] + c[1] * self.index.turns[records] + c[2] * self.index.chars[records]
            # A record estimated at a row or more is cut to one: it takes a row, no headroom.
            # Shorter ones are aimed at PACK_FILL of the room they take.
            weight = np.where(est >= room, float(room), np.maximum(est, 1.0) / PACK_FILL)
            budget, total, starts, sums = PACK_ROWS * room, 0.0, [0], []
            for i, w in enumerate(weight.tolist()):  # greedy: while the segment's rows hold it
                if total + w > budget and total > 0:
                    starts.append(i)
                    sums.append(total)
                    total = 0.0
                total += w
            sums.append(total)
            seg_starts = np.asarray(starts + [n]) if n else np.zeros(1, int)
            sums = np.asarray(sums if n else [])
            rows = np.clip(np.ceil(sums / room - 1e-9), 1, PACK_ROWS).astype(np.int64)
        row_starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        return _Plan(records.astype(np.int64), seg_starts.astype(np.int64), row_starts)

    def _segment(self, split: str, segment: int) -> _Segment:
        key = (split, segment)
        if key in self._segments:
            self._segments.move_to_end(key)
            return self._segments[key]
        plan, room = self.plans[split], self.seq_len + 1
        records = plan.order[plan.seg_starts[segment] : plan.seg_starts[segment + 1]]
        rows = int(plan.row_starts[segment + 1] - plan.row_starts[segment])
        stats = dict.fromkeys(_STATS, 0)
        items, refused = [], []
        for record in records.tolist():
            try:
                items.append((record, self.encode(record)))
            except ValueError as exc:
                refused.append({"line": int(self.index.lines[record]), "reason": str(exc)})
        ids = np.zeros((rows, room), np.int32)
        carries = np.zeros((rows, room), bool)
        layout: list[list] = [[] for _ in range(rows)]
        encoded = dict(items)
        for row, start, record, keep in _place(items, rows, room, self.config.pack):
            enc, line = encoded[record], int(self.index.lines[record])
            whole = len(enc.ids)
            if whole > room:
                stats["cut_records"] += 1
                stats["cut_tokens"] += whole - room
            lost = min(whole, room) - keep
            if lost:
                stats["overflow_records"] += 1
                stats["overflow_tokens"] += lost
            if keep:
                ids[row, start : start + keep] = enc.ids[:keep]
                carries[row, start : start + keep] = enc.carries[:keep]
                layout[row].append((line, start, keep))
                stats["records"] += 1
        stats["rejected"] = len(refused)
        stats["tokens"] = int(sum(c for row in layout for _, _, c in row))
        stats["loss_tokens"] = int(carries.sum())
        values = np.array([stats[k] for k in _STATS], np.int64)
        if self._seg_stats[split][segment, 0] < 0:  # first time: record what it found
            self._seg_stats[split][segment] = values
            room_left = KEPT_REJECTIONS - len(self._rejected) - len(self._late_rejected)
            self._late_rejected.extend(refused[: max(0, room_left)])
            self._late_count += len(refused)
        seg = _Segment(ids, carries, [sorted(r, key=lambda t: t[1]) for r in layout], values)
        self._segments[key] = seg
        if len(self._segments) > KEPT_SEGMENTS:
            self._segments.popitem(last=False)
        return seg

    def _locate(self, split: str, example: int) -> tuple[int, int]:
        plan = self.plans[split]
        if not 0 <= example < plan.rows:
            raise IndexError(f"example {example} is not in the {split} split ({plan.rows} rows)")
        segment = int(np.searchsorted(plan.row_starts, example, side="right") - 1)
        return segment, example - int(plan.row_starts[segment])

    def _gather(self, split: str, examples: list[int]) -> dict[str, np.ndarray]:
        room = self.seq_len + 1
        ids = np.zeros((len(examples), room), np.int32)
        carries = np.zeros((len(examples), room), bool)
        for i, example in enumerate(examples):
            segment, row = self._locate(split, example)
            seg = self._segment(split, segment)
            ids[i], carries[i] = seg.ids[row], seg.carries[row]
        labels = np.where(carries[:, 1:], ids[:, 1:], IGNORE_INDEX).astype(np.int32)
        return {
            "input_ids": ids[:, :-1],
            "labels": labels,
            "mask": carries[:, 1:].astype(np.float32),
            "example_index": np.asarray(examples, np.int32),
        }

    def layout(self, example: int, split: str = "train") -> list[tuple[int, int, int]]:
        """(line, first slot, tokens) of each record in row ``example`` of ``split``, by
        place in the row; a row's slots are its ``seq_len + 1`` tokens."""
        segment, row = self._locate(split, example)
        return list(self._segment(split, segment).layout[row])

    # ------------------------------------------------------------ the Dataset interface

    def num_examples(self, split: str = "train") -> int:
        return self.plans[split].rows

    def num_tokens(self, split: str = "train") -> int:
        """Loss-carrying tokens of the split (renders every record not yet rendered)."""
        return self.stats(split)[split]["loss_tokens"]

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            plan = self.plans["train"]
            segments = np.random.default_rng([self.seed, epoch]).permutation(plan.segments)
            sizes = np.diff(plan.row_starts)[segments]
            self._epoch_cache = (epoch, segments, np.concatenate([[0], np.cumsum(sizes)]))
        return self._epoch_cache[1], self._epoch_cache[2]

    def batch(self, index: int, batch_size: int, split: str = "train") -> dict[str, np.ndarray]:
        """Batch number ``index``: rows drawn without replacement, epoch by epoch; in the
        train split each epoch visits the segments in an order drawn from (seed, epoch).
        ``example_index`` [B] says which rows of the split they are."""
        n = self.num_examples(split)
        if n == 0:
            raise SpecError(
                f"the {split} split of {self.path} is empty ({self.records} records kept, "
                f"{self.rejected_count} rejected; kd data inspect shows why)"
            )
        plan = self.plans[split]
        picks = []
        for sample in range(index * batch_size, (index + 1) * batch_size):
            epoch, k = divmod(sample, n)
            if split != "train":
                picks.append(k)
                continue
            segments, starts = self._epoch_order(epoch)
            place = int(np.searchsorted(starts, k, side="right") - 1)
            picks.append(int(plan.row_starts[segments[place]]) + k - int(starts[place]))
        return self._gather(split, picks)

    def batches(self, batch_size: int, split: str = "val", limit: int | None = None):
        """Consecutive batches covering the split once (the last one may be short)."""
        n = self.num_examples(split)
        for count, start in enumerate(range(0, n, batch_size)):
            if limit is not None and count >= limit:
                return
            yield self._gather(split, list(range(start, min(n, start + batch_size))))

    def fingerprint(self) -> str:
        """A hash of the kept records, the parameters that shape rows, the template and the
        vocabulary: equal exactly when the rows are."""
        if self._fingerprint is None:
            params = attrs.asdict(self.config)
            for where in ("path", "tokenizer"):  # where the files are does not shape rows
                params.pop(where)
            digest = hashlib.sha256()
            for part in (
                self._digest,
                json.dumps(params, sort_keys=True),
                self.renderer.template,
                self.renderer.encoder.to_str(),
                str(LAYOUT_VERSION),
            ):
                digest.update(part.encode("utf-8"))
                digest.update(b"\0")
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    # ------------------------------------------------------------ prompts (on-policy)

    def _prompted(self, split: str) -> np.ndarray:
        if split not in self._prompt_ids:
            cut = int(self.records * (1 - self.config.val_fraction))
            span = np.arange(cut) if split == "train" else np.arange(cut, self.records)
            self._prompt_ids[split] = span[self.index.prompted[span]]
        return self._prompt_ids[split]

    def _prompt_epoch(self, split: str, epoch: int, n: int) -> np.ndarray:
        if split != "train":
            return np.arange(n)
        if self._prompt_order is None or self._prompt_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(n)
            self._prompt_order = (epoch, order)
        return self._prompt_order[1]

    def num_prompts(self, split: str = "train") -> int:
        """Records of the split that have a prompt (chat and completion records with a
        turn before their first assistant turn)."""
        return len(self._prompted(split))

    def prompts(
        self, index: int, batch_size: int, split: str = "train", max_tokens: int | None = None
    ) -> list[list[int]]:
        """Batch number ``index`` of prompts: per record, the token ids of everything before
        its first assistant turn's content, as the template renders ``messages[:first]``
        with ``add_generation_prompt=True`` (for Qwen: ending ``<|im_start|>assistant\\n``),
        unpadded and uncut (``max_tokens``: only the last that many). Records are drawn
        without replacement, epoch by epoch, in an order drawn from (seed, epoch) in the
        train split and in file order in val: a pure function of (seed, index). A record
        the template refuses is replaced by the next one in that order."""
        records = self._prompted(split)
        n = len(records)
        if n == 0:
            raise SpecError(f"the {split} split has no records with a prompt")
        out = []
        for sample in range(index * batch_size, (index + 1) * batch_size):
            epoch, k = divmod(sample, n)
            order = self._prompt_epoch(split, epoch, n)
            tokens = None
            for step in range(n):
                tokens = self.prompt(int(records[order[(k + step) % n]]))
                if tokens is not None:
                    break
            if tokens is None:
                raise SpecError(f"the chat template refuses every prompt of the {split} split")
            out.append(tokens[-max_tokens:] if max_tokens else tokens)
        return out

    # ------------------------------------------------------------ statistics

    def stats(self, split: str | None = None, max_records: int | None = None) -> dict:
        """Per split: ``rows``, ``records`` placed, ``rejected`` (by the template),
        ``tokens``, ``loss_tokens``, ``padding_share`` (row slots holding no token),
        ``cut_records``/``cut_tokens`` (records longer than ``seq_len + 1``, and what they
        lost), ``overflow_records``/``overflow_tokens`` (cut because a packed segment ran
        out of room). Renders the records not yet rendered, a segment at a time (at most
        ``max_records`` of them; ``scanned`` says how many records the numbers cover)."""
        out = {}
        budget = max_records
        for name in [split] if split else ["train", "val"]:
            plan, table = self.plans[name], self._seg_stats[name]
            for segment in range(plan.segments):
                if table[segment, 0] < 0:
                    if budget is not None and budget <= 0:
                        continue
                    self._segment(name, segment)
                    if budget is not None:
                        budget -= int(plan.seg_starts[segment + 1] - plan.seg_starts[segment])
            done = table[:, 0] >= 0
            sums = table[done].sum(axis=0) if done.any() else np.zeros(len(_STATS), np.int64)
            record = {k: int(v) for k, v in zip(_STATS, sums)}
            scanned_rows = int(np.diff(plan.row_starts)[done].sum())
            slots = scanned_rows * (self.seq_len + 1)
            record["rows"] = plan.rows
            record["padding_share"] = round(1 - record["tokens"] / slots, 4) if slots else 0.0
            record["scanned"] = int(np.diff(plan.seg_starts)[done].sum())
            record["of"] = int(len(plan.order))
            out[name] = record
        return out

    @property
    def rejected(self) -> list[dict]:
        """The rejected lines found so far, by line (``{"line", "reason"}``; the first
        ``KEPT_REJECTIONS``): when the file was read, and records the template refused
        when they were first rendered."""
        return sorted(self._rejected + self._late_rejected, key=lambda r: r["line"])

    @property
    def rejected_count(self) -> int:
        return self._rejected_count + self._late_count

    def inspect(self, limit: int = 3) -> dict:
        stats = self.stats(max_records=INSPECT_RECORDS)
        formats = {name: int((self.index.kinds == kind).sum()) for kind, name in FORMATS.items()}
        rejected = self.rejected
        report = {
            "examples": {s: self.num_examples(s) for s in ("train", "val")},
            "loss_tokens": {s: stats[s]["loss_tokens"] for s in ("train", "val")},
            "records_read": self.records_read,
            "records": self.records,
            "formats": formats,
            "rejected": rejected,
            "rejected_count": self.rejected_count,
            "stats": stats,
            "samples": [],
        }
        room = self.seq_len + 1
        for record in range(min(limit, self.records)):
            try:
                enc = self.encode(record)
            except ValueError as exc:
                line = int(self.index.lines[record])
                report["samples"].append({"line": line, "error": str(exc)})
                continue
            kept_ids, kept = enc.ids[:room], enc.carries[:room]
            report["samples"].append(
                {
                    "line": int(self.index.lines[record]),
                    "format": FORMATS[int(self.index.kinds[record])],
                    "text": self.tokenizer.decode(enc.ids),
                    "marked": self._marked(kept_ids, kept, len(enc.ids) - len(kept_ids)),
                    "loss_text": self.tokenizer.decode(kept_ids[kept]),
                    "tokens": int(len(enc.ids)),
                    "loss_tokens": int(kept.sum()),
                    "cut_tokens": int(max(0, len(enc.ids) - room)),
                }
            )
        return report

    def _marked(self, ids: np.ndarray, carries: np.ndarray, cut: int) -> str:
        """The tokens' text with each run of loss-carrying tokens in ⟦ ⟧, and the cut."""
        pieces, start = [], 0
        for end in range(1, len(ids) + 1):
            if end == len(ids) or carries[end] != carries[start]:
                text = self.tokenizer.decode(ids[start:end])
                pieces.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if carries[start] else text)
                start = end
        if cut:
            pieces.append(f"⟪{cut} more tokens cut⟫")
        return "".join(pieces)
