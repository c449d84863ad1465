"""The ``token-map`` aligner: each teacher token's probability moved onto the student token
with the same bytes (``exact``) or the longest student token that begins it (``prefix``)."""

from __future__ import annotations

from typing import Any, Literal

import attrs
import mlx.core as mx
import numpy as np

from kdcore.errors import SpecError
from kdcore.signal.aligned import AlignedSignal, position_mask
from kdcore.signal.teacher import TeacherSignal
from kdcore.tokenizers.hf import token_byte_strings

FLOOR = -1.0e4  # log of a probability that is exactly 0 (exp underflows to 0 in float32)


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
        fields = {f.alias: getattr(signal, f.name) for f in attrs.fields(type(signal))}
        fields.update(vocab_size=self.student_vocab, logits=mx.stop_gradient(logits))
        fields.update(final_hidden=None, head=None)
        fields["position_mask"] = keep
        fields.pop("rank_space", None)
        return AlignedSignal(**fields)
