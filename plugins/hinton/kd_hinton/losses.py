"""Hinton's soft-target loss and its selective variant, on the chunked kernels of kdcore.

``hinton``: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` per token, summed over the
vocabulary, masked mean over tokens (Hinton, Vinyals and Dean 2015, arXiv:1503.02531).

``selective``: the same KL restricted to the teacher's top-k tokens, and only at positions
where the teacher's entropy ``H(softmax(t))`` exceeds ``min_entropy`` nats.
"""

from __future__ import annotations

from typing import Literal

import attrs
import mlx.core as mx
import numpy as np

import kdcore
from kdcore import validators

Tail = Literal["renormalize", "tail-bucket"]


@attrs.define
class HintonConfig:
    """``temperature`` T (schedulable); ``top_k`` > 0 restricts the teacher to its top-k
    tokens (``tail`` says how the rest is treated); ``t_squared`` multiplies by T^2 so the
    gradient scale does not shrink as T grows (Hinton et al., section 2)."""

    temperature: float = attrs.field(default=2.0, validator=validators.positive)
    top_k: int = attrs.field(default=0, validator=validators.non_negative)
    t_squared: bool = True
    tail: Tail = "renormalize"


def hinton(config: HintonConfig, setup=None):
    """Soft-target KD loss: ``T^2 KL(p_T || q_T)``, dense, mixture or top-k teachers."""

    def rows(inputs: kdcore.LossInputs):
        params = inputs.params
        temperature = float(params.temperature)
        return kdcore.teacher_rows(
            inputs.teacher,
            "forward_kl",
            temperature=temperature,
            tail=params.tail,
            top_k=params.top_k,
            weight=temperature * temperature if params.t_squared else 1.0,
        )

    return kdcore.RowLoss(rows)


@attrs.define
class SelectiveConfig:
    """``top_k`` teacher tokens at positions whose teacher entropy (nats, at T = 1) exceeds
    ``min_entropy``; ``temperature``, ``t_squared`` and ``tail`` as in ``hinton``."""

    temperature: float = attrs.field(default=2.0, validator=validators.positive)
    top_k: int = attrs.field(default=32, validator=validators.non_negative)
    min_entropy: float = 0.5
    t_squared: bool = True
    tail: Tail = "renormalize"


def _entropy_rows(x: mx.array) -> mx.array:
    lp = kdcore.log_softmax(x)
    return -mx.where(lp > -mx.inf, mx.exp(lp) * lp, 0.0).sum(-1)


def teacher_entropy(teacher: kdcore.TeacherSignal) -> mx.array:
    """Entropy (nats) of the teacher at T = 1 per position [B, L], no gradient.

    Dense teachers: exact, computed in row chunks. Top-k teachers: the entropy of the
    (k + 1)-class distribution (top-k tokens and one tail class), a lower bound of the full
    entropy (merging classes never raises entropy); a mixture of them likewise on its support.
    """
    if teacher.is_sparse:
        _ids, lp = kdcore.teacher_support(teacher, 1.0, "tail-bucket")
        return mx.stop_gradient(_entropy_rows(lp))
    if teacher.final_hidden is not None and not teacher.has_logits:
        # a live teacher: its logits made chunk by chunk from hidden states and head
        hidden, head = teacher.final_hidden, teacher.head
        lead = tuple(hidden.shape[:-1])
        (rows,) = kdcore.map_rows(
            lambda h: _entropy_rows(head(h).astype(mx.float32)), [hidden], lead
        )
        return mx.array(rows.astype(np.float32))
    logits = teacher.logits if teacher.logits is not None else teacher.log_probs(1.0)
    lead = tuple(logits.shape[:-1])
    (rows,) = kdcore.map_rows(lambda x: _entropy_rows(x.astype(mx.float32)), [logits], lead)
    return mx.array(rows.astype(np.float32))


def _kept_positions(inputs: kdcore.LossInputs, params) -> tuple[mx.array, mx.array]:
    """(the batch's mask, that mask where the teacher's entropy exceeds ``min_entropy``)."""
    mask = inputs.batch["mask"].astype(mx.float32)
    keep = (teacher_entropy(inputs.teacher) > float(params.min_entropy)).astype(mx.float32)
    return mask, mask * keep


def selective(config: SelectiveConfig, setup=None):
    """Top-k KL at high-entropy positions; logs ``kept``, the share of positions distilled."""

    def rows(inputs: kdcore.LossInputs):
        params = inputs.params
        temperature = float(params.temperature)
        mask, kept_mask = _kept_positions(inputs, params)
        declared = kdcore.teacher_rows(
            inputs.teacher,
            "forward_kl",
            temperature=temperature,
            tail=params.tail,
            top_k=params.top_k,
            weight=temperature * temperature if params.t_squared else 1.0,
            mask=kept_mask,
        )
        kept = kept_mask.sum() / mx.maximum(mask.sum(), 1.0)
        return attrs.evolve(declared, metrics={"kept": kept})

    return kdcore.RowLoss(rows)
