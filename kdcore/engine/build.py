"""Spec -> parts: every component of a run constructed, in the order that fixes the random
stream (dataset, teachers, student, initializer, aggregator, aligner, losses, callbacks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn

from kdcore.engine.distributed import DataParallel
from kdcore.engine.routed import bind_route, route_problems
from kdcore.engine.sizes import size_problems
from kdcore.engine.terms import BuiltLoss, build_losses, learnable_teacher
from kdcore.errors import KdError, SpecError
from kdcore.kernels.native import use_row_kernels
from kdcore.protocols import HasRequirements, PreparesVocabularies, ReadsTeacherModel
from kdcore.registry.components import Component
from kdcore.registry.manager import get_registry
from kdcore.registry.setup import Setup
from kdcore.signal.route import Route, routed_signals
from kdcore.spec.compose import cache_manifests, check_composition, check_parameter_groups
from kdcore.spec.load import blame_overrides
from kdcore.spec.schema import RunSpec
from kdcore.tokenizers.simple import fingerprint

CAPTURABLE = ("hidden_states", "attentions")


def total_steps(spec: RunSpec) -> int:
    return sum(s.steps for s in spec.train.stages) if spec.train.stages else spec.train.steps


class Trainable(nn.Module):
    """Everything that learns: the student and any learnable aggregator or loss."""

    def __init__(self, student: nn.Module, aggregator: Any, losses: list[BuiltLoss]):
        super().__init__()
        self.student = student
        if isinstance(aggregator, nn.Module):
            self.aggregator = aggregator
        # Keys must not be numbers: MLX rebuilds numeric paths as lists.
        self.losses = {b.key: b.loss for b in losses if isinstance(b.loss, nn.Module)}


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
    losses: list[BuiltLoss]
    capture: frozenset[str]
    callbacks: list[Any]
    trainable: Trainable

    def teacher_signals(self, batch: dict[str, mx.array]) -> list:
        """Each teacher's signal for ``batch`` (spec order), capturing what the run's
        components need (``capture``). With the ``route`` aggregator a teacher runs only on
        the rows that hold its positions (None: it has none in this batch)."""
        if isinstance(self.aggregator, Route):
            return routed_signals(self.aggregator, self.teachers, batch, self.capture, self.student)
        return [t.signal(batch, self.capture, self.student) for t in self.teachers]


def check_run(spec: RunSpec) -> list[str]:
    """Every problem ``kd distill`` refuses while building the run that can be found without
    loading weights or data; ``kd validate`` reports exactly these, and :func:`build_parts`
    runs the same checks (the composition and the initializer's teacher before building
    anything, :func:`student_problems` once the student is built), so the two agree.

    Not found here, since they need the data tokenized or a teacher's weights loaded: a
    cache made for other data, a student vocabulary smaller than the tokenizer's, teachers
    with different vocabularies, an explicit layer map out of the teacher's range."""
    problems = check_composition(spec) + initializer_problems(spec) + _sizes(spec)
    problems += route_problems(spec)
    student = None
    if getattr(spec.student.model.config, "path", None) is None:  # a saved one: weights
        try:
            student = _make_student(spec, None)
        except KdError as exc:  # what the run would raise building it, in its own words
            problems += getattr(exc, "problems", None) or [str(exc)]
        except Exception:  # noqa: BLE001 - needs the run (its tokenizer...): the run reports it
            student = None
    if student is not None:
        problems += student_problems(spec, student)
    return problems + check_parameter_groups(spec, student)


def initializer_problems(spec: RunSpec) -> list[str]:
    """The student initializer copies a teacher's weights (``kdcore.ReadsTeacherModel``)
    from a teacher the spec does not have, or from a top-k cache, which holds no weights."""
    init = spec.student.init
    config = init.config
    if not isinstance(config, ReadsTeacherModel):
        return []
    loaded = getattr(spec.student.model.config, "path", None) is not None
    index = config.teacher_model(loaded)
    if index is None:
        return []
    where = "$.student.init.params.teacher"
    if not 0 <= index < len(spec.teachers):
        return blame_overrides(
            [
                f"initializer {init.name!r} copies the weights of teachers[{index}], and the "
                f"spec has {len(spec.teachers)} teacher(s) @ {where}"
            ],
            spec.overrides,
        )
    ref = spec.teachers[index]
    if ref.source_name not in ("cache", "server"):
        return []
    fix = "give a model teacher (path = ...)"
    if "teacher_path" in attrs.fields_dict(type(config)):
        fix = "name the model folder to copy with params.teacher_path"
        made_from = _cache_teacher_path(spec, ref) if ref.source_name == "cache" else None
        if made_from:
            fix += f' (the cache was made from teacher_path = "{made_from}")'
    what = "a top-k cache, which holds none"
    if ref.source_name == "server":
        what = "a served teacher, which sends none"
    return blame_overrides(
        [
            f"initializer {init.name!r} copies the weights of teachers[{index}], {what}: "
            f"{fix} @ {where}"
        ],
        spec.overrides,
    )


def _cache_teacher_path(spec: RunSpec, ref: Any) -> str | None:
    """The model folder a cache says it was made from, when it says so and it still exists."""
    try:
        found = cache_manifests(spec, ref)
    except (KdError, OSError):
        return None  # the cache teacher source reports a bad cache
    paths = [((m.get("teacher") or {}).get("path")) for _folder, m in found]
    path = paths[0] if len(paths) == 1 else None
    return path if isinstance(path, str) and Path(path).is_dir() else None


def student_problems(spec: RunSpec, student: nn.Module) -> list[str]:
    """What the built student cannot do that the spec asks of it."""
    if spec.train.checkpoint_layers and not hasattr(student, "checkpoint_layers"):
        line = (
            f"model {spec.student.model.name!r} does not support gradient checkpointing "
            "@ $.train.checkpoint_layers"
        )
        return blame_overrides([line], spec.overrides)
    return []


def _student_config(spec: RunSpec, vocab_size: int | None) -> Any:
    """The student's model config; the tokenizer's size where the spec leaves it unset
    (``vocab_size`` None: not known yet, a stand-in where the model cannot do without)."""
    model_ref = spec.student.model
    config = model_ref.config
    if "vocab_size" not in model_ref.params and hasattr(config, "vocab_size"):
        if vocab_size is not None:
            config = attrs.evolve(config, vocab_size=vocab_size)
        elif config.vocab_size is None:
            config = attrs.evolve(config, vocab_size=256)  # names and checks only
    return config


def _make_student(spec: RunSpec, vocab_size: int | None) -> nn.Module:
    base = Setup(base_dir=Path(spec.base_dir), seed=spec.run.seed, spec=spec)
    model_ref = spec.student.model
    component = get_registry().get("model", model_ref.name)
    return component.factory(_student_config(spec, vocab_size), base)


def build_parts(spec: RunSpec) -> Parts:
    # The checks kd validate runs too, before anything is loaded (or memory spent).
    problems = check_composition(spec) + initializer_problems(spec) + _sizes(spec)
    problems += route_problems(spec, read_records=False)  # read once, by bind_route
    if problems:
        raise SpecError(problems)
    registry = get_registry()
    use_row_kernels(registry.row_kernels())  # the run's native kernels, read by the kernels

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
    model_config = _student_config(spec, tokenizer.vocab_size)
    if getattr(model_config, "vocab_size", 1 << 30) < tokenizer.vocab_size:
        raise SpecError(
            f"student vocab_size {model_config.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} @ $.student.model.params.vocab_size"
        )
    mx.random.seed(spec.run.seed)
    student = component("model", model_ref).factory(model_config, base)
    mx.eval(student.parameters())
    problems = student_problems(spec, student)
    if problems:
        raise SpecError(problems)
    if spec.train.checkpoint_layers:
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
    if teachers and isinstance(aggregator, Route):  # an aligner per teacher, in the route
        aligner = bind_route(
            aggregator,
            spec,
            dataset,
            teachers,
            tokenizer,
            lambda: component("vocab_aligner", spec.aligner).factory(spec.aligner.config, setup),
        )
    elif teachers:
        _check_vocabularies(teachers, aligner, teacher_tok, tokenizer)

    losses = build_losses(spec, setup, learnable_teacher(aggregator))
    requires = set().union(*(b.component.requires for b in losses))
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
        losses=losses,
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


def _sizes(spec: RunSpec) -> list[str]:
    return blame_overrides(size_problems(spec), spec.overrides)
