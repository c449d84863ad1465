"""Distillation across tokenizers: Hugging Face tokenizers, sequence alignment, vocab aligners.

A teacher whose tokenizer differs from the run's sees the same *text* as the student, cut
into other tokens. Two things must then be aligned:

- **positions** (:class:`Retokenizer`): the batch's student ids are turned back into bytes,
  the text is encoded with the teacher's tokenizer, and student position ``i`` is paired
  with the teacher position ``j`` whose context ends at the same byte
  (``alignment = "offsets"``: both predict what follows the same prefix). Student
  positions inside a teacher token have no partner; their ``position_mask`` is 0 and the
  engine leaves them out of the teacher losses (cross-entropy keeps every token).
  ``alignment = "position"`` is ULD's rule (Boizard et al. 2024): position ``i`` with
  position ``i``, up to the shorter of the two lengths.
- **vocabularies**: the ``token-map`` aligner moves each teacher token's probability onto
  the student token with the same byte string (``match = "exact"``) or onto the longest
  student token that begins it (``match = "prefix"``: for a byte-level student this is the
  exact next-byte marginal of the teacher). Teacher mass with no student token is dropped
  and the rest renormalised (``unmatched = "renormalize"``, the default) or put on a
  named student token (``unmatched = "unknown"``). The ``uld`` aligner keeps no token
  identities at all: it sorts the teacher's probabilities, and the ``uld`` loss compares
  them with the student's sorted probabilities.

Token strings are compared as bytes: ``token_byte_strings`` gives the UTF-8 bytes each id
stands for (a byte of a byte-level vocabulary, the text of a BPE merge, the content of a
special token), the same convention as ``ByteTokenizer.tokens()``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import attrs
import mlx.core as mx
import numpy as np

from kdcore.errors import SpecError
from kdcore.io import write_json
from kdcore.losses import LossInputs, masked_mean
from kdcore.signal import TeacherSignal

FLOOR = -1.0e4  # log of a probability that is exactly 0 (exp underflows to 0 in float32)

# ---------------------------------------------------------------- Hugging Face tokenizers


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
    ``tokenizer.json`` content itself.
    """

    kind = "hf"

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self._bytes: list[bytes] | None = None

    @classmethod
    def from_json(cls, data: dict) -> HFTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(json.dumps(data)))

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

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


# ---------------------------------------------------------------- sequence alignment


def _teacher_text(raw: bytes) -> tuple[str, np.ndarray, np.ndarray]:
    """(text, text-byte ends, original-byte ends) per character of ``raw`` decoded.

    Bytes that are not valid UTF-8 (a window cut inside a character) become U+FFFD for the
    teacher, one per byte, so offsets after them still map back to ``raw``.
    """
    decoded = raw.decode("utf-8", errors="surrogateescape")
    chars, text_len, raw_len = [], [], []
    for c in decoded:
        if "\udc80" <= c <= "\udcff":
            chars.append("\ufffd")
            text_len.append(3)
            raw_len.append(1)
        else:
            chars.append(c)
            n = len(c.encode("utf-8"))
            text_len.append(n)
            raw_len.append(n)
    return "".join(chars), np.cumsum(text_len, dtype=np.int64), np.cumsum(raw_len, dtype=np.int64)


class Retokenizer:
    """Student ids -> teacher ids for the same text, and which teacher position each student
    position reads (see the module doc for the two ``alignment`` rules)."""

    def __init__(
        self,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        alignment: Literal["offsets", "position"] = "offsets",
        pad_id: int = 0,
    ):
        if alignment not in ("offsets", "position"):
            raise SpecError(f"alignment must be 'offsets' or 'position', got {alignment!r}")
        self.student_bytes = token_byte_strings(student_tokenizer)
        self.teacher_bytes = token_byte_strings(teacher_tokenizer)
        self.teacher = teacher_tokenizer
        self.alignment = alignment
        self.pad_id = pad_id

    def row(self, ids: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(teacher ids, teacher index [Ls], mask [Ls]) for one row of student ids."""
        sb = self.student_bytes
        pieces = [sb[i] if 0 <= i < len(sb) else b"" for i in np.asarray(ids).tolist()]
        s_ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
        text, text_ends, raw_ends = _teacher_text(b"".join(pieces))
        t_ids = self.teacher.encode(text) or [self.pad_id]
        L = len(pieces)
        index = np.zeros(L, np.int32)
        mask = np.zeros(L, np.float32)
        if self.alignment == "position":
            n = min(L, len(t_ids))
            index[:n] = np.arange(n)
            mask[:n] = 1.0
            return t_ids, index, mask
        tb = self.teacher_bytes
        t_pieces = [tb[j] if 0 <= j < len(tb) else b"" for j in t_ids]
        if b"".join(t_pieces) != text.encode("utf-8"):
            raise SpecError(
                "the teacher's tokenizer does not reproduce the text byte for byte (it "
                "normalises it), so positions cannot be aligned by offsets; use "
                'alignment = "position" @ $.teachers.params.alignment'
            )
        to_raw = dict(zip(text_ends.tolist(), raw_ends.tolist()))
        to_raw[0] = 0
        where = {}
        for j, end in enumerate(np.cumsum([len(p) for p in t_pieces]).tolist()):
            raw = to_raw.get(end)  # None: the teacher token ends inside a character
            if raw is not None:
                where[raw] = j
        for i, end in enumerate(s_ends.tolist()):
            j = where.get(end)
            if j is not None:
                index[i] = j
                mask[i] = 1.0
        return t_ids, index, mask

    def __call__(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(teacher ids [B, Lt] right-padded, index [B, Ls], mask [B, Ls])."""
        rows = [self.row(r) for r in np.asarray(input_ids)]
        Lt = max(len(r[0]) for r in rows)
        t_ids = np.full((len(rows), Lt), self.pad_id, np.int32)
        for b, (ids, _, _) in enumerate(rows):
            t_ids[b, : len(ids)] = ids
        return t_ids, np.stack([r[1] for r in rows]), np.stack([r[2] for r in rows])


@attrs.frozen(eq=False)
class AlignedSignal(TeacherSignal):
    """A teacher signal at the student's positions from a teacher with another tokenizer.

    ``position_mask`` [B, L] is 1 where the teacher had a position aligned with the
    student's (the engine multiplies it into the mask of losses that use the teacher);
    ``rank_space`` marks sorted probabilities (the ``uld`` aligner): index ``r`` is the
    ``r``-th most probable teacher token, not a token id.
    """

    position_mask: mx.array | None = None
    rank_space: bool = False


def position_mask(signal: TeacherSignal | None) -> mx.array | None:
    """The product of the position masks in ``signal`` (and its mixture members), or None."""
    if signal is None:
        return None
    found = getattr(signal, "position_mask", None)
    for member in signal.members or ():
        inner = position_mask(member)
        if inner is not None:
            found = inner if found is None else found * inner
    return found


def gather_positions(values: mx.array, index: mx.array) -> mx.array:
    """``values`` [B, Lt, ...] read at ``index`` [B, Ls] -> [B, Ls, ...]."""
    shape = index.shape + (1,) * (values.ndim - 2)
    return mx.take_along_axis(values, index.reshape(shape), axis=1)


# ---------------------------------------------------------------- token-map aligner


@attrs.define
class TokenMapConfig:
    match: Literal["exact", "prefix"] = "exact"
    unmatched: Literal["renormalize", "unknown"] = "renormalize"
    unknown_token: str | None = None  # the student token that takes unmatched mass


class TokenMap:
    """Teacher probabilities moved onto student tokens with the same bytes.

    ``q_j = sum_{v: map(v) = j} p_v`` where ``map`` pairs a teacher token with the student
    token of identical bytes (``exact``) or with the longest student token that is a prefix
    of its bytes (``prefix``). Unmatched teacher mass ``u = sum_{v unmapped} p_v`` is dropped
    and ``q`` renormalised by ``1 - u`` (``renormalize``; a position where ``u = 1`` gets
    position mask 0), or added to ``q_unk`` (``unknown``). The result is a dense signal with
    logits ``log q`` (``FLOOR`` where ``q = 0``); losses apply their temperature to it.
    """

    def __init__(self, config: TokenMapConfig | None = None, setup=None):
        self.config = config or TokenMapConfig()
        self.targets: mx.array | None = None
        self.sources: mx.array | None = None
        self.student_vocab = 0
        self.unknown_id: int | None = None
        self.report: dict[str, Any] = {}

    def prepare(self, teacher_tokenizer, student_tokenizer) -> None:
        if teacher_tokenizer is None or student_tokenizer is None:
            raise SpecError("aligner 'token-map' needs the teacher's and the student's tokenizer")
        t_bytes = token_byte_strings(teacher_tokenizer)
        s_bytes = token_byte_strings(student_tokenizer)
        index = {}
        for j, b in enumerate(s_bytes):
            if b:
                index.setdefault(b, j)
        longest = max((len(b) for b in index), default=0)
        special = getattr(teacher_tokenizer, "special_ids", set)()
        sources, targets = [], []
        for v, b in enumerate(t_bytes):
            j = index.get(b)
            if j is None and self.config.match == "prefix" and v not in special:
                for n in range(min(len(b), longest), 0, -1):
                    j = index.get(b[:n])
                    if j is not None:
                        break
            if j is not None:
                sources.append(v)
                targets.append(j)
        if not sources:
            raise SpecError(
                "aligner 'token-map': no teacher token has a student counterpart @ $.aligner"
            )
        self.student_vocab = student_tokenizer.vocab_size
        if self.config.unmatched == "unknown":
            name = self.config.unknown_token
            tokens = student_tokenizer.tokens()
            if name is None or name not in tokens:
                raise SpecError(
                    f"aligner 'token-map': unmatched = 'unknown' needs unknown_token naming a "
                    f"student token, got {name!r} @ $.aligner.params.unknown_token"
                )
            self.unknown_id = tokens.index(name)
        self.sources = mx.array(np.asarray(sources, np.int32))
        self.targets = mx.array(np.asarray(targets, np.int32))
        self.report = {"teacher_tokens": len(t_bytes), "mapped": len(sources)}

    def map_probs(self, probs: mx.array) -> tuple[mx.array, mx.array]:
        """(student probabilities [..., Vs], matched teacher mass [...]) from teacher probs."""
        lead = probs.shape[:-1]
        flat = probs.reshape(-1, probs.shape[-1]).astype(mx.float32)
        picked = mx.take(flat, self.sources, axis=1)
        out = mx.zeros((flat.shape[0], self.student_vocab), mx.float32)
        out = out.at[:, self.targets].add(picked)
        matched = picked.sum(-1)
        return out.reshape(*lead, self.student_vocab), matched.reshape(lead)

    def __call__(self, signal: TeacherSignal) -> TeacherSignal:
        if self.sources is None:
            raise RuntimeError("aligner 'token-map' was not prepared")
        if signal.members is not None:
            return attrs.evolve(
                signal,
                vocab_size=self.student_vocab,
                members=tuple(self(m) for m in signal.members),
            )
        if signal.logits is None:
            raise SpecError(
                "aligner 'token-map' needs dense teacher logits (a live teacher), not a top-k "
                "cache @ $.aligner"
            )
        probs = mx.softmax(signal.logits.astype(mx.float32), axis=-1)
        q, matched = self.map_probs(probs)
        keep = position_mask(signal)
        if self.unknown_id is not None:
            q = q.at[..., self.unknown_id].add(mx.maximum(1.0 - matched, 0.0))
        else:
            has_mass = (matched > 0).astype(mx.float32)
            keep = has_mass if keep is None else keep * has_mass
            q = q / mx.maximum(matched, 1e-30)[..., None]
        logits = mx.where(q > 0, mx.log(mx.maximum(q, 1e-38)), FLOOR)
        fields = {f.name: getattr(signal, f.name) for f in attrs.fields(type(signal))}
        fields.update(vocab_size=self.student_vocab, logits=mx.stop_gradient(logits))
        fields["position_mask"] = keep
        fields.pop("rank_space", None)
        return AlignedSignal(**fields)


# ---------------------------------------------------------------- ULD


@attrs.define
class UldAlignerConfig:
    top_k: int | None = None  # keep the k largest teacher probabilities (default: all)


class UldAligner:
    """ULD's vocabulary side: the teacher's probabilities sorted, largest first.

    No token identity survives, so any two vocabularies fit. The output is a dense
    rank-space signal (``rank_space = True``) whose logits are the teacher's logits sorted
    in decreasing order (softmax commutes with sorting, and losses may still apply a
    temperature). Pair it with the ``uld`` loss; a loss that indexes tokens (KL) would
    compare ranks with token ids.
    """

    def __init__(self, config: UldAlignerConfig | None = None, setup=None):
        self.config = config or UldAlignerConfig()

    def prepare(self, teacher_tokenizer, student_tokenizer) -> None:
        if self.config.top_k is not None and self.config.top_k < 1:
            raise SpecError("top_k must be >= 1 @ $.aligner.params.top_k")

    def __call__(self, signal: TeacherSignal) -> TeacherSignal:
        if signal.logits is not None:
            z = signal.logits.astype(mx.float32)
        elif signal.members is not None:
            z = signal.log_probs(1.0)
        else:
            # log p at Tc times Tc = z - const: tempering by T later gives softmax(z / T)
            # over the top-k (the unknown tail is left out).
            z = signal.topk_logprobs.astype(mx.float32) * signal.capture_temperature
        z = -mx.sort(-z, axis=-1)
        if self.config.top_k is not None:
            z = z[..., : self.config.top_k]
        return AlignedSignal(
            vocab_size=z.shape[-1],
            logits=mx.stop_gradient(z),
            hidden_states=signal.hidden_states,
            attentions=signal.attentions,
            position_mask=position_mask(signal),
            rank_space=True,
        )


@attrs.define
class UldLossConfig:
    temperature: float = 1.0
    top_k: int | None = None  # compare only the k largest probabilities of each side


def sorted_probs(logits_or_logp: mx.array, temperature, already_sorted: bool = False) -> mx.array:
    """softmax(z / T) sorted in decreasing order; differentiable through the gather."""
    z = logits_or_logp.astype(mx.float32) / temperature
    p = mx.softmax(z, axis=-1)
    if already_sorted:
        return p
    order = mx.argsort(mx.stop_gradient(-p), axis=-1)
    return mx.take_along_axis(p, order, axis=-1)


def _pad_last(x: mx.array, size: int) -> mx.array:
    if x.shape[-1] >= size:
        return x
    pad = mx.zeros((*x.shape[:-1], size - x.shape[-1]), x.dtype)
    return mx.concatenate([x, pad], axis=-1)


def uld_loss(config: UldLossConfig, setup=None):
    """Universal Logit Distillation (Boizard et al. 2024), per token position:

    ``d = sum_r |sort(p_s)_r - sort(p_t)_r|`` with ``p = softmax(z / T)`` sorted in
    decreasing order and the shorter vector padded with zeros (the L1 / Wasserstein-1
    distance between the sorted distributions); masked mean over tokens. No T^2 factor (the
    paper's loss is on probabilities). The teacher may have any vocabulary; a top-k cache
    contributes its k probabilities (exact at the capture temperature) and zeros.
    """

    def loss(inputs: LossInputs):
        T = inputs.params.temperature if inputs.params is not None else config.temperature
        ps = sorted_probs(inputs.student.logits, T)
        teacher = inputs.teacher
        if teacher.topk_ids is not None:
            _, logp = teacher.sparse_log_probs(T, "tail-bucket")
            pt = mx.exp(logp[..., :-1])
            pt = mx.take_along_axis(pt, mx.argsort(-pt, axis=-1), axis=-1)
        elif getattr(teacher, "rank_space", False):
            pt = sorted_probs(teacher.logits, T, already_sorted=True)
        else:
            pt = mx.exp(teacher.log_probs(T))
            pt = mx.take_along_axis(pt, mx.argsort(-pt, axis=-1), axis=-1)
        size = max(ps.shape[-1], pt.shape[-1])
        ps, pt = _pad_last(ps, size), _pad_last(mx.stop_gradient(pt), size)
        top_k = config.top_k
        if top_k is not None:
            ps, pt = ps[..., :top_k], pt[..., :top_k]
        distance = mx.abs(ps - pt).sum(-1)
        return masked_mean(distance, inputs.batch["mask"]), {}

    return loss
