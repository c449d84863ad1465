"""Which losses of a step run fused with the output heads, and that one fused pass.

A loss runs fused (``kdcore.kernels.fused``: logits one chunk of tokens at a time, never
``[tokens, vocab]``) when all of these hold, else it is called on full logits (the
fallback, exact and unchanged):

- ``train.fused_loss`` is true (the default);
- the loss declares rows (``kdcore.DeclaresRows``) and returns some for this step;
- the loss has no parameters of its own to train (the kernel differentiates only the
  student's hidden states and head);
- the student's output is hidden states and a plain head (``ModelOutput.head_weight``:
  the built-in transformer and mlx-lm's plain-head families; not a quantized head);
- for a loss that reads the teacher: no learnable aggregator (the kernel treats the
  teacher as a constant).

The teacher side is always possible: a live teacher gives hidden states and its head (any
head, quantized too: it runs per chunk without gradient), a top-k cache its small support,
an aligner's or cache's dense output its logits rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from kdcore.io import read_json
from kdcore.kernels.fused import Head, Term, fused_token_terms
from kdcore.losses.rows import LABELS, TEACHER, Rows
from kdcore.models.mlxlm import PLAIN_HEAD_TYPES
from kdcore.models.output import ModelOutput
from kdcore.protocols import DeclaresRows
from kdcore.registry.manager import get_registry
from kdcore.registry.setup import Setup
from kdcore.signal.teacher import TeacherSignal
from kdcore.spec.compose import TEACHER_NEEDS
from kdcore.spec.load import loss_labels

FUSED = "fused"


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


def loss_reason(loss: Any, reads_teacher: bool, learnable_teacher: bool) -> str | None:
    """Why this loss cannot run fused (None: it can, if its rows are not None)."""
    if not isinstance(loss, DeclaresRows):
        return "the loss declares no rows"
    if isinstance(loss, nn.Module) and tree_flatten(loss.trainable_parameters()):
        return "the loss has parameters of its own to train"
    if reads_teacher and learnable_teacher:
        return "a learnable aggregator needs gradients through the teacher"
    return None


def _source(signal: TeacherSignal) -> tuple[mx.array, Any]:
    if not signal.has_logits and signal.final_hidden is not None:
        return signal.final_hidden, signal.head
    return signal.logits, None


def teacher_sources(teacher: TeacherSignal | None, terms: Sequence[FusedTerm]) -> dict:
    """``{read name: (hidden states or logits, head or None)}`` for every teacher read."""
    wanted = {name for t in terms for name in t.rows.reads if name.startswith(TEACHER)}
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
            if name.startswith(TEACHER):
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


# ---------------------------------------------------------------- what a spec will do


def model_head_reason(spec_model: Any, init_name: str | None, base_dir: str = ".") -> str | None:
    """Why a student built from this model spec will not run fused (None: it will), read
    from the spec alone (``kd validate`` / ``kd explain``)."""
    if init_name == "quantize":
        return "a quantized student's head is not a plain matrix"
    if spec_model.name == "transformer":
        return None
    if spec_model.name == "mlx-lm":
        params = spec_model.params or {}
        config = params.get("config") or {}
        if not config and params.get("path"):
            try:
                config = read_json(Path(base_dir) / params["path"] / "config.json")
            except Exception:
                return None  # unreadable here: decided when the run builds
        model_type = config.get("model_type")
        if model_type and model_type not in PLAIN_HEAD_TYPES:
            return f"mlx-lm model type {model_type!r} has no plain head kdcore can split off"
        return None
    return f"model {spec_model.name!r}: decided when the run builds"


def _learnable_aggregator(spec: Any) -> bool:
    """Whether the spec's aggregator has parameters to train (it is built, cheaply)."""
    if len(spec.teachers) < 2:
        return False
    component = get_registry().get("teacher_aggregator", spec.aggregator.name)
    setup = Setup(base_dir=Path(spec.base_dir), seed=spec.run.seed, spec=spec)
    setup = attrs.evolve(setup, num_teachers=len(spec.teachers))
    try:
        aggregator = component.factory(spec.aggregator.config, setup)
    except Exception:
        return False  # it fails again, with its own message, when the run builds
    return isinstance(aggregator, nn.Module) and bool(
        tree_flatten(aggregator.trainable_parameters())
    )


def spec_loss_paths(spec: Any) -> list[tuple[str, str]]:
    """``[(loss label, "fused" or "full logits (why)")]`` as a run of ``spec`` will take
    them, from the spec and the registry alone (``kd validate`` prints it). A loss whose
    rows depend on the batch (minillm's on-policy batches) is "fused" when it may be."""
    registry = get_registry()
    head = model_head_reason(spec.student.model, spec.student.init.name, spec.base_dir)
    learnable = _learnable_aggregator(spec)
    paths = []
    for ref, label in zip(spec.losses, loss_labels(spec)):
        component = registry.get("loss", ref.name)
        if not spec.train.fused_loss:
            why = "train.fused_loss is false"
        elif "fused" not in component.properties:
            why = "the loss declares no rows"
        elif head is not None:
            why = head
        elif learnable and TEACHER_NEEDS & component.requires:
            why = "a learnable aggregator needs gradients through the teacher"
        else:
            paths.append((label, FUSED))
            continue
        paths.append((label, f"full logits ({why})"))
    return paths
