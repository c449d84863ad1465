"""What the engine calls on the object each kind of component's factory returns.

A factory is ``factory(config, setup) -> object``. The object must satisfy its kind's
protocol below; the *optional* capabilities (``PreparesBatch``, ``AfterStep``, ``HasState``,
``Learnable``, ``HasRequirements``, ``PreparesVocabularies``, and ``ReadsTeacherModel`` on an
initializer's config) are separate protocols that the engine checks with ``isinstance`` —
implement a method and it is called, nothing else is looked up by name.
docs/authoring-plugins.md shows each one in use.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from kdcore.losses.inputs import LossInputs, StepContext
from kdcore.losses.rows import Rows
from kdcore.models.output import ModelOutput
from kdcore.signal.teacher import TeacherSignal

# ---------------------------------------------------------------- the kinds


@runtime_checkable
class Loss(Protocol):
    """``loss(inputs) -> (value, metrics)``: ``value`` a scalar ``mx.array``, ``metrics`` a
    dict of scalars logged as ``LABEL/KEY``. Returning an ``mlx.nn.Module`` makes its
    parameters train with the student (saved in checkpoints, never in ``student/``).
    Optional: ``PreparesBatch``."""

    def __call__(self, inputs: LossInputs) -> tuple[mx.array, dict[str, mx.array]]: ...


@runtime_checkable
class TeacherSource(Protocol):
    """Where a teacher's signal comes from (a model folder, a top-k cache, an EMA copy).

    ``tokenizer`` is the teacher's tokenizer or None (then it is taken to be the run's);
    ``model`` the teacher ``nn.Module`` when one exists (the ``from-teacher`` initializer and
    ``kd eval`` use it; None for a cache); ``config`` the teacher's model config (a student
    initializer may read its shape; None when unknown); ``num_parameters`` its size.
    ``signal(batch, capture, student)`` returns the teacher's :class:`TeacherSignal` for the
    batch, with hidden states / attentions when ``capture`` names them; ``student`` is the
    student model, for sources that derive from it. Optional: ``AfterStep``, ``HasState``.
    """

    tokenizer: Any
    model: nn.Module | None
    num_parameters: int

    def signal(
        self, batch: dict[str, mx.array], capture: frozenset[str], student: nn.Module
    ) -> TeacherSignal: ...


@runtime_checkable
class Aggregator(Protocol):
    """``aggregate(signals, inputs) -> signal``: one signal per teacher (spec order) in, one
    out. ``inputs`` are the step's :class:`LossInputs` without a teacher (student outputs and
    batch, for instance-dependent weights). An aggregator may attach ``weights`` ([B, K] or
    [B, L, K], rows summing to 1) to the signal it returns. Returning an ``nn.Module`` makes
    its parameters train with the student. Optional: ``HasRequirements``, ``Learnable``."""

    def __call__(self, signals: list[TeacherSignal], inputs: LossInputs) -> TeacherSignal: ...


@runtime_checkable
class Aligner(Protocol):
    """``align(signal) -> signal`` in the student's vocabulary. Optional:
    ``PreparesVocabularies`` (called once, before training)."""

    def __call__(self, signal: TeacherSignal) -> TeacherSignal: ...


@runtime_checkable
class Initializer(Protocol):
    """``init(student, teachers) -> report``: modify the freshly built student in place
    (``teachers`` are the teacher models, None where a source has none) and return a dict
    that the run's summary records under ``init``."""

    def __call__(self, student: nn.Module, teachers: list[nn.Module | None]) -> dict: ...


@runtime_checkable
class ReadsTeacherModel(Protocol):
    """An initializer *config* whose initializer copies a teacher's weights:
    ``teacher_model(student_loaded)`` is the index (spec order) of the teacher whose model it
    reads, or None when it reads none (``student_loaded``: the student comes from a saved
    folder). ``kd validate`` and ``kd distill`` both refuse, before anything is built, a
    spec where that teacher does not exist or has no model (a top-k cache)."""

    def teacher_model(self, student_loaded: bool) -> int | None: ...


@runtime_checkable
class Scheduler(Protocol):
    """``value(step, total_steps) -> float``."""

    def __call__(self, step: int, total_steps: int) -> float: ...


@runtime_checkable
class Model(Protocol):
    """An ``nn.Module``: ``model(input_ids, capture=frozenset()) -> ModelOutput``."""

    def __call__(self, input_ids: mx.array, capture: frozenset[str] = ...) -> ModelOutput: ...


@runtime_checkable
class Dataset(Protocol):
    """Batches of NumPy arrays: ``input_ids``, ``labels`` (``IGNORE_INDEX`` where no loss),
    ``mask``, and any extra arrays its losses need. Subclass :class:`kdcore.Dataset` to get
    ``batch``/``batches``/``num_examples``/``fingerprint``/``inspect`` from the rows it
    stores in ``self._examples``."""

    tokenizer: Any

    def batch(self, index: int, batch_size: int, split: str = "train") -> dict[str, np.ndarray]: ...

    def batches(
        self, batch_size: int, split: str = "val", limit: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]: ...

    def inspect(self, limit: int = 3) -> dict: ...


@runtime_checkable
class Metric(Protocol):
    """``metric(student, teacher, context) -> dict`` for ``kd eval`` (``{}`` when it does
    not apply); ``context`` has ``run_dir``, ``spec``, ``tokenizer`` and the options."""

    def __call__(self, student: nn.Module, teacher: nn.Module | None, context: dict) -> dict: ...


class RunCallback(Protocol):
    """Any subset of ``on_start(info)``, ``on_log(step, record)``, ``on_eval(step, record)``
    and ``on_end(summary)``; ``info`` is a :class:`kdcore.app.RunInfo` (``output``: the run
    folder, ``spec``, ``total_steps``). Every method is optional (the engine calls those
    present)."""


# ---------------------------------------------------------------- optional capabilities


@runtime_checkable
class PreparesBatch(Protocol):
    """A loss that changes the batch before the step, outside autodiff: ``prepare_batch
    (batch, context) -> batch`` (sample from ``context.student``, add a reference model's
    log-likelihoods, ...). Called in spec order; each sees the previous one's batch."""

    def prepare_batch(
        self, batch: dict[str, mx.array], context: StepContext
    ) -> dict[str, mx.array]: ...


@runtime_checkable
class DeclaresRows(Protocol):
    """A token loss that says what it computes per token row: ``rows(inputs) -> Rows |
    [Rows] | None`` (``kdcore.Rows``; ``kdcore.teacher_rows`` builds one for a divergence).
    The engine runs the rows fused with the output heads, chunk by chunk, without
    ``[tokens, vocab]`` logits, or on the full logits where it cannot fuse: the loss is
    written once. None means "these inputs are not rows": the engine calls the loss's
    ``__call__`` (e.g. a policy gradient on sampled batches). ``kdcore.RowLoss`` makes a
    whole loss from one ``rows`` function."""

    def rows(self, inputs: LossInputs) -> Rows | list[Rows] | None: ...


@runtime_checkable
class AfterStep(Protocol):
    """A teacher source updated after each optimizer step: ``after_step(student, step,
    total_steps)`` (an EMA teacher)."""

    def after_step(self, student: nn.Module, step: int, total_steps: int) -> None: ...


@runtime_checkable
class HasState(Protocol):
    """A teacher source with state to checkpoint: ``state_arrays() -> {name: array}`` and
    ``load_state_arrays(arrays)`` on resume."""

    def state_arrays(self) -> dict[str, mx.array]: ...

    def load_state_arrays(self, arrays: dict[str, mx.array]) -> None: ...


@runtime_checkable
class Learnable(Protocol):
    """An ``nn.Module`` aggregator that says whether its parameters train: ``learnable``
    False keeps it frozen in every stage."""

    learnable: bool


@runtime_checkable
class HasRequirements(Protocol):
    """An aggregator whose needs depend on its config: ``requires`` is a frozenset of
    :data:`kdcore.app.REQUIREMENTS` (``{"hidden_states"}``), added to the component's own."""

    requires: frozenset[str]


@runtime_checkable
class PreparesVocabularies(Protocol):
    """An aligner that checks and maps the two vocabularies once: ``prepare(teacher_tokenizer,
    student_tokenizer)``, raising :class:`kdcore.SpecError` when they cannot be aligned."""

    def prepare(self, teacher_tokenizer: Any, student_tokenizer: Any) -> None: ...
