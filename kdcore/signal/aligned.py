"""A teacher signal read at positions aligned to the student's tokens, with the mask of
the positions that have a partner."""

from __future__ import annotations

import attrs
import mlx.core as mx

from kdcore.signal.teacher import TeacherSignal


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
