"""The ``identity`` (verified token by token) and ``truncate`` vocabulary aligners."""

from __future__ import annotations

import attrs
import mlx.core as mx

from kdcore.errors import SpecError
from kdcore.signal.teacher import TeacherSignal
from kdcore.tokenizers.simple import fingerprint


def _first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"token {i} is {x!r} for the teacher and {y!r} for the student"
    return f"the teacher has {len(a)} tokens and the student {len(b)}"


@attrs.define
class IdentityConfig:
    pass


class Identity:
    """Same vocabulary on both sides: checked token by token, not just by size."""

    def __init__(self, config=None, setup=None):
        pass

    def prepare(self, teacher_tokenizer, student_tokenizer) -> None:
        if teacher_tokenizer is None or student_tokenizer is None:
            return
        if fingerprint(teacher_tokenizer) != fingerprint(student_tokenizer):
            raise SpecError(
                "aligner 'identity': teacher and student vocabularies differ: "
                + _first_difference(teacher_tokenizer.tokens(), student_tokenizer.tokens())
                + "; use aligner 'truncate' or a token-mapping aligner @ $.aligner.name"
            )

    def __call__(self, signal: TeacherSignal) -> TeacherSignal:
        return signal


@attrs.define
class TruncateConfig:
    pass


class Truncate:
    """A teacher vocabulary that extends the student's: keep the student's first V tokens.

    The teacher's probabilities are renormalised over the kept tokens (the logits are
    sliced; softmax does the rest). Checked: the shared prefix must match token by token.
    """

    def __init__(self, config=None, setup=None):
        self.size = None

    def prepare(self, teacher_tokenizer, student_tokenizer) -> None:
        t, s = teacher_tokenizer.tokens(), student_tokenizer.tokens()
        if len(t) < len(s) or t[: len(s)] != s:
            raise SpecError(
                "aligner 'truncate': the student's vocabulary is not a prefix of the teacher's: "
                + _first_difference(t, s)
                + " @ $.aligner.name"
            )
        self.size = len(s)

    def __call__(self, signal: TeacherSignal) -> TeacherSignal:
        size = self.size
        if signal.final_hidden is not None and not signal.has_logits:
            head = signal.head  # stays lazy: the fused path slices each chunk's rows
            return attrs.evolve(signal, vocab_size=size, head=lambda x: head(x)[..., :size])
        if signal.logits is not None:
            return signal.with_logits(signal.logits[..., :size], vocab_size=size)
        if signal.topk_ids is not None:
            keep = signal.topk_ids < size
            # Tokens past the student's vocabulary join the tail.
            dropped = mx.where(keep, 0.0, mx.exp(signal.topk_logprobs.astype(mx.float32))).sum(-1)
            tail = mx.logaddexp(signal.tail_logmass.astype(mx.float32), mx.log(dropped + 1e-30))
            return attrs.evolve(
                signal,
                vocab_size=size,
                topk_ids=mx.where(keep, signal.topk_ids, 0),
                topk_logprobs=mx.where(keep, signal.topk_logprobs, -1e30),
                tail_logmass=tail,
            )
        return attrs.evolve(signal, vocab_size=size, members=tuple(self(m) for m in signal.members))
