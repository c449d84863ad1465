"""Spec -> parts: every component of a run constructed, in the order that fixes the random
stream (dataset, teachers, student, initializer, aggregator, aligner, losses, callbacks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn

from kdcore.engine.distributed import DataParallel
from kdcore.errors import SpecError
from kdcore.protocols import HasRequirements, PreparesVocabularies
from kdcore.registry.components import Component
from kdcore.registry.manager import get_registry
from kdcore.registry.setup import Setup
from kdcore.spec.compose import check_composition
from kdcore.spec.load import loss_labels
from kdcore.spec.schema import RunSpec
from kdcore.tokenizers.simple import fingerprint

CAPTURABLE = ("hidden_states", "attentions")
TEACHER_NEEDS = frozenset({"teacher", "dense_teacher"})


def total_steps(spec: RunSpec) -> int:
    return sum(s.steps for s in spec.train.stages) if spec.train.stages else spec.train.steps


class Trainable(nn.Module):
    """Everything that learns: the student and any learnable aggregator or loss."""

    def __init__(self, student: nn.Module, aggregator: Any, losses: list[Any]):
        super().__init__()
        self.student = student
        if isinstance(aggregator, nn.Module):
            self.aggregator = aggregator
        # Keys must not be numbers: MLX rebuilds numeric paths as lists.
        self.losses = {
            f"loss{i}": loss for i, loss in enumerate(losses) if isinstance(loss, nn.Module)
        }


@attrs.define(eq=False)
class Parts:
    """A built run: the spec's components, constructed and ready to train or evaluate."""

    spec: RunSpec
    total: int
    dp: DataParallel
    setup: Setup
    dataset: Any
    tokenizer: Any
    teachers: list[Any]
    student: nn.Module
    student_arch: str
    student_config: Any
    init_report: dict
    aggregator: Any
    aligner: Any
    loss_components: list[Component]
    losses: list[Any]
    labels: list[str]
    capture: frozenset[str]
    callbacks: list[Any]
    trainable: Trainable

    def teacher_signals(self, batch: dict[str, mx.array]) -> list:
        """Each teacher's signal for ``batch`` (spec order), capturing what the run's
        components need (``capture``)."""
        return [t.signal(batch, self.capture, self.student) for t in self.teachers]

    def uses_teacher(self, index: int) -> bool:
        """Whether loss ``index`` reads the teacher signal (and so its aligned mask)."""
        return bool(TEACHER_NEEDS & self.loss_components[index].requires)


def build_parts(spec: RunSpec) -> Parts:
    problems = check_composition(spec)
    if problems:
        raise SpecError(problems)
    registry = get_registry()

    def component(kind: str, ref) -> Component:
        return registry.get(kind, ref.name)

    total = total_steps(spec)
    dp = DataParallel()
    mx.random.seed(spec.run.seed)
    base = Setup(base_dir=Path(spec.base_dir), seed=spec.run.seed, spec=spec)

    dataset = component("dataset", spec.data).factory(spec.data.config, attrs.evolve(base))
    tokenizer = dataset.tokenizer
    # Teacher sources see the dataset (a cache checks its fingerprint against it).
    teacher_setup = attrs.evolve(base, extras={"dataset": dataset})
    teachers = [_build_teacher(registry, ref, teacher_setup) for ref in spec.teachers]
    teacher_tok = next((t.tokenizer for t in teachers if t.tokenizer is not None), None)

    model_ref = spec.student.model
    model_config = model_ref.config
    if "vocab_size" not in model_ref.params and hasattr(model_config, "vocab_size"):
        model_config = attrs.evolve(model_config, vocab_size=tokenizer.vocab_size)
    if getattr(model_config, "vocab_size", 1 << 30) < tokenizer.vocab_size:
        raise SpecError(
            f"student vocab_size {model_config.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} @ $.student.model.params.vocab_size"
        )
    mx.random.seed(spec.run.seed)
    student = component("model", model_ref).factory(model_config, base)
    mx.eval(student.parameters())
    if spec.train.checkpoint_layers:
        if not hasattr(student, "checkpoint_layers"):
            raise SpecError(
                f"model {model_ref.name!r} does not support gradient checkpointing "
                "@ $.train.checkpoint_layers"
            )
        student.checkpoint_layers = True
    setup = attrs.evolve(
        base,
        tokenizer=tokenizer,
        student_config=model_config,
        teacher_configs=[getattr(t, "config", None) for t in teachers],
        num_teachers=max(1, len(teachers)),
    )
    init = component("student_initializer", spec.student.init).factory(
        spec.student.init.config, setup
    )
    init_report = init(student, [getattr(t, "model", None) for t in teachers])

    aggregator = component("teacher_aggregator", spec.aggregator).factory(
        spec.aggregator.config, setup
    )
    aligner = component("vocab_aligner", spec.aligner).factory(spec.aligner.config, setup)
    if teachers:
        _check_vocabularies(teachers, aligner, teacher_tok, tokenizer)

    loss_components = [component("loss", ref) for ref in spec.losses]
    losses = [c.factory(ref.config, setup) for c, ref in zip(loss_components, spec.losses)]
    requires = set().union(*(c.requires for c in loss_components))
    if isinstance(aggregator, HasRequirements):
        requires |= aggregator.requires
    callbacks = [
        component("run_callback", ref).factory(ref.config, setup) for ref in spec.callbacks
    ]
    return Parts(
        spec=spec,
        total=total,
        dp=dp,
        setup=setup,
        dataset=dataset,
        tokenizer=tokenizer,
        teachers=teachers,
        student=student,
        student_arch=model_ref.name,
        student_config=model_config,
        init_report=init_report,
        aggregator=aggregator,
        aligner=aligner,
        loss_components=loss_components,
        losses=losses,
        labels=loss_labels(spec),
        capture=frozenset(r for r in CAPTURABLE if r in requires),
        callbacks=callbacks,
        trainable=Trainable(student, aggregator, losses),
    )


def _build_teacher(registry, ref, base: Setup):
    component = registry.get("teacher_source", ref.source_name)
    config = ref.config if ref.config is not None else component.config()
    return component.factory(config, attrs.evolve(base, teacher=ref))


def _check_vocabularies(teachers, aligner, teacher_tok, tokenizer) -> None:
    toks = [t.tokenizer for t in teachers if t.tokenizer is not None]
    if len({fingerprint(t) for t in toks}) > 1:
        raise SpecError(
            "teachers have different vocabularies; aggregation needs one vocabulary @ $.teachers"
        )
    if isinstance(aligner, PreparesVocabularies):
        aligner.prepare(teacher_tok, tokenizer)
