"""What a loss receives at each step (``LossInputs``), and what a component may use of the
running distillation outside autodiff (``StepContext``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn

from kdcore.models.output import ModelOutput
from kdcore.signal.teacher import TeacherSignal


@attrs.frozen(eq=False)
class LossInputs:
    """Everything a loss may look at in one step.

    ``student`` is the student's :class:`ModelOutput`: ``student.logits`` [B, L, V] (made on
    first use), or ``student.final_hidden`` with ``student.logits_of(rows)`` for a loss that
    works token chunk by token chunk without the full logits. ``teacher`` is the teacher
    signal, aggregated and aligned (None when the spec has no teacher). ``batch`` holds at
    least ``input_ids`` [B, L], ``labels`` [B, L] (next-token targets, ``IGNORE_INDEX``
    where no loss) and ``mask`` [B, L] (1.0 where ``labels`` is a real token). ``params`` is
    the component's config at this step: every scheduled float replaced by its value, a
    0-d float32 array (read scheduled values from here, never from the factory's config).
    """

    student: ModelOutput
    teacher: TeacherSignal | None
    batch: dict[str, mx.array]
    params: Any = None
    step: int = 0
    total_steps: int = 1
    extras: dict[str, Any] = attrs.field(factory=dict)  # e.g. aggregator weights, samples


@attrs.frozen(eq=False)
class StepContext:
    """The part of a running distillation a component may use outside autodiff, for
    example in ``prepare_batch(batch, context)`` to sample from the student.

    Attributes:
        step: the step about to run (0-based).
        total_steps: the run's steps over all stages.
        seed: the run's seed (randomness is already seeded from (seed, step)).
        student: the student model; call it, do not update it.
        num_teachers: how many teachers the spec names.
        teacher_signal: ``teacher_signal(batch, student_output=None)`` runs the run's
            teachers on ``batch`` and returns their signal aggregated and aligned, exactly
            as the step does (None without teachers).
        sample_continuations: ``sample_continuations(prompts, max_new_tokens,
            temperature=1.0, top_p=1.0, stop_token=None, *, teacher_mix_alpha=0.0)`` is
            the run's on-policy sampler (the one ``train.on_policy`` uses): the student's
            continuations of ``prompts`` [B, P], each token drawn from
            ``(1 - a) top_p(q_T) + a top_p(p_T)`` with ``a = teacher_mix_alpha``; returns
            ``(tokens [B, P + N], generated mask [B, P + N], importance weights [B, P + N])``.
    """

    step: int
    total_steps: int
    seed: int
    student: nn.Module
    num_teachers: int = 0
    teacher_signal: Callable[[dict[str, mx.array], ModelOutput | None], TeacherSignal | None] = (
        attrs.field(default=lambda batch, student_output=None: None)
    )
    sample_continuations: Callable[..., Any] = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.sample_continuations is None:

            def unavailable(*args: Any, **kwargs: Any) -> Any:
                raise ValueError("this step context has no sampler (built outside a run)")

            object.__setattr__(self, "sample_continuations", unavailable)
