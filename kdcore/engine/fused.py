"""The fused pass: every loss of a step that runs fused with the output heads, over token
chunks (``kdcore.kernels.fused``), so neither model's ``[tokens, vocab]`` logits exist.
Which losses run fused is decided once per run, in ``kdcore.engine.terms``; the student's
own output is checked here at each step (``student_reason``).

The teacher side is always possible: a live teacher gives hidden states and its head (any
head, quantized too: it runs per chunk without gradient), a top-k cache its small support,
an aligner's or cache's dense output its logits rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from kdcore.kernels.fused import Head, Term, fused_token_terms
from kdcore.losses.rows import LABELS, TEACHER, Rows
from kdcore.models.output import ModelOutput
from kdcore.signal.teacher import TeacherSignal


@attrs.frozen(eq=False)
class FusedTerm:
    """One loss of the step that runs fused: its label, its rows and its spec weight."""

    label: str
    rows: Rows
    weight: float
    mask: mx.array


def student_reason(out: ModelOutput) -> str | None:
    """Why the student's output cannot run fused (None: it can)."""
    if out.has_logits or out.final_hidden is None:
        return "the student model returns logits, not hidden states and a head"
    if out.head_weight is None:
        return "the student's head is not a plain matrix (quantized?)"
    return None


def _source(signal: TeacherSignal) -> tuple[mx.array, Any]:
    if not signal.has_logits and signal.final_hidden is not None:
        return signal.final_hidden, signal.head
    return signal.logits, None


def reads_teacher(name: str) -> bool:
    """Whether a read name is the teacher's logits (``"teacher"``) or a member's."""
    return name == TEACHER or name.startswith(f"{TEACHER}:")


def teacher_sources(teacher: TeacherSignal | None, terms: Sequence[FusedTerm]) -> dict:
    """``{read name: (hidden states or logits, head or None)}`` for every teacher read."""
    wanted = {name for t in terms for name in t.rows.reads if reads_teacher(name)}
    if not wanted:
        return {}
    if teacher is None:
        raise ValueError("a fused loss reads the teacher, but the step has no teacher")
    out = {}
    for name in wanted:
        if name == TEACHER:
            out[name] = _source(teacher)
        else:
            out[name] = _source(teacher.members[int(name.split(":", 1)[1])])
    return out


def head_trains(student: nn.Module, weight: mx.array) -> bool:
    """Whether ``weight`` (the student's head) is among its trainable parameters."""
    return any(v is weight for _, v in tree_flatten(student.trainable_parameters()))


def fused_pass(
    terms: Sequence[FusedTerm],
    out: ModelOutput,
    teacher: TeacherSignal | None,
    batch: dict[str, mx.array],
    head_grad: bool = True,
) -> tuple[mx.array, list[mx.array]]:
    """``(weighted total, [each term's mean]) `` of ``terms`` in one pass over token
    chunks (a term's mean before its weights; constants, for logging)."""
    extras: dict[str, mx.array] = {}
    kernel_terms = []
    for i, term in enumerate(terms):
        rows = term.rows
        names = []
        for name in rows.reads:
            if reads_teacher(name):
                names.append(name)
            elif name in rows.extras:
                extras[f"{i}/{name}"] = rows.extras[name]
                names.append(f"{i}/{name}")
            elif name == LABELS:
                extras[LABELS] = batch["labels"]
                names.append(LABELS)
            else:
                raise ValueError(
                    f"loss {term.label!r}: its rows read {name!r}, which is neither a teacher, "
                    "the labels nor one of its extras"
                )
        kernel_terms.append(
            Term(rows.fn, term.weight * float(rows.weight), tuple(names), term.mask)
        )
    mask = terms[0].mask
    total, values = fused_token_terms(
        kernel_terms,
        out.final_hidden,
        Head(out.head_weight, out.head_bias),
        None,
        None,
        mask,
        teachers=teacher_sources(teacher, terms),
        extras=extras,
        head_grad=head_grad,
    )
    return total, list(values)
