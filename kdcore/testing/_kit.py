"""The conformance checks of ``kdcore.testing``: hypothesis strategies for logits and the
contracts of losses, schedulers and teacher aggregators (see the package docstring)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
import mlx.core as mx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kdcore.losses.inputs import LossInputs
from kdcore.losses.tokens import IGNORE_INDEX
from kdcore.models.output import ModelOutput
from kdcore.registry.manager import get_registry
from kdcore.registry.setup import Setup
from kdcore.signal.teacher import TeacherSignal
from kdcore.spec.build import make_config
from kdcore.spec.schedules import value_at
from kdcore.testing._loss import LossUnderTest

settings.register_profile(
    "fast",
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = os.environ.get("KD_HYPOTHESIS_PROFILE", "fast")


# ---------------------------------------------------------------- strategies


def floats(bound: float) -> st.SearchStrategy[float]:
    return st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def shapes(draw, max_batch: int = 3, max_len: int = 6, min_vocab: int = 2, max_vocab: int = 24):
    return (
        draw(st.integers(1, max_batch)),
        draw(st.integers(1, max_len)),
        draw(st.integers(min_vocab, max_vocab)),
    )


@st.composite
def logit_pairs(draw, bound: float = 30.0, **shape_kwargs):
    """(student logits, teacher logits, mask) as float32 NumPy arrays; mask has a 1."""
    B, L, V = draw(shapes(**shape_kwargs))
    student = draw(hnp.arrays(np.float32, (B, L, V), elements=floats(bound)))
    teacher = draw(hnp.arrays(np.float32, (B, L, V), elements=floats(bound)))
    mask = draw(hnp.arrays(np.float32, (B, L), elements=st.sampled_from([0.0, 1.0])))
    mask[0, 0] = 1.0
    return _untie(student), _untie(teacher), mask


def _untie(logits: np.ndarray) -> np.ndarray:
    """Spread each row's logits at least 0.01 apart. Losses over a top-k (BiLD, top-k
    hinton) are discontinuous at exact ties, and adding a constant in float32 can turn a
    near-tie into one; the shift check is about invariance, not about that rounding."""
    rank = np.argsort(np.argsort(logits, axis=-1, kind="stable"), axis=-1).astype(np.float32)
    return (logits + 0.01 * rank).astype(np.float32)


# ---------------------------------------------------------------- building inputs


def default_batch(B: int, L: int, V: int, mask: np.ndarray, rng: np.random.Generator) -> dict:
    ids = rng.integers(0, V, size=(B, L)).astype(np.int32)
    labels = rng.integers(0, V, size=(B, L)).astype(np.int32)
    labels = np.where(mask > 0, labels, IGNORE_INDEX).astype(np.int32)
    return {"input_ids": ids, "labels": labels, "mask": mask.astype(np.float32)}


def _features(logits: mx.array, layers: int = 3, width: int = 8, seed: int = 0):
    """Deterministic hidden states and attention maps derived from logits, so that equal
    logits give equal features (for zero-at-identity) and they respond to the mask test."""
    B, L, V = logits.shape
    rng = np.random.default_rng(seed)
    proj = mx.array(rng.standard_normal((V, width)).astype(np.float32) / np.sqrt(V))
    offset = mx.array(rng.standard_normal((layers + 1, width)).astype(np.float32))
    centred = logits - logits.mean(-1, keepdims=True)  # shift-invariant like the logits
    # The fixed offset keeps features non-zero when all logits are equal.
    hidden = tuple(mx.tanh(centred @ proj * (i + 1) + offset[i]) for i in range(layers + 1))
    scores = mx.tanh(centred @ proj) @ mx.tanh(centred @ proj).transpose(0, 2, 1)
    causal = mx.triu(mx.full((L, L), -1e9), k=1)
    attn = mx.softmax(scores + causal, axis=-1)[:, None]  # [B, 1, L, L]
    return hidden, tuple(attn for _ in range(layers))


@attrs.define
class LossCase:
    student: np.ndarray
    teacher: np.ndarray
    mask: np.ndarray
    batch: dict


def _inputs(component, config, case: LossCase, student_logits: mx.array) -> LossInputs:
    needs = component.requires
    s_hidden = s_attn = t_hidden = t_attn = None
    if {"hidden_states", "attentions"} & needs:
        s_hidden, s_attn = _features(student_logits)
        t_hidden, t_attn = _features(mx.array(case.teacher))
    student = ModelOutput(
        logits=student_logits,
        hidden_states=s_hidden if "hidden_states" in needs else None,
        attentions=s_attn if "attentions" in needs else None,
    )
    teacher = TeacherSignal(
        vocab_size=case.teacher.shape[-1],
        logits=mx.array(case.teacher),
        hidden_states=t_hidden if "hidden_states" in needs else None,
        attentions=t_attn if "attentions" in needs else None,
    )
    batch = {k: mx.array(v) for k, v in case.batch.items()}
    return LossInputs(
        student=student, teacher=teacher, batch=batch, params=config, step=0, total_steps=10
    )


def _resolved(config):
    from kdcore.spec.schedules import scheduled_fields

    fields = scheduled_fields(config)
    return attrs.evolve(config, **{k: mx.array(value_at(v, 0, 10)) for k, v in fields.items()})


_READ_PARAMS = (
    "in a run, a scheduled float is a app.Schedule in the config the factory receives; "
    "read its value at each step from inputs.params, where it is a 0-d array"
)


def _every_float_scheduled(kind: str, name: str, config: Any, params: dict[str, Any]):
    """``config`` with each float field that accepts a schedule given as a constant schedule
    of its value (what a spec with ``{schedule = "constant", value = ...}`` gives), and the
    names of those fields; (None, []) when there are none."""
    from kdcore.errors import SpecError
    from kdcore.spec.schedules import Schedule

    fields = []
    for field in attrs.fields(type(config)) if attrs.has(type(config)) else ():
        value = getattr(config, field.name)
        if not isinstance(value, float):
            continue  # a float field is structured to a float; None, ints, schedules stay
        trial = {**params, field.name: {"schedule": "constant", "value": float(value)}}
        try:
            scheduled = make_config(kind, name, **trial)
        except SpecError:
            continue  # the field does not take a schedule
        if isinstance(getattr(scheduled, field.name), Schedule):
            fields.append(field.name)
    if not fields:
        return None, []
    schedules = {f: {"schedule": "constant", "value": float(getattr(config, f))} for f in fields}
    return make_config(kind, name, **{**params, **schedules}), fields


# ---------------------------------------------------------------- loss contracts


def check_loss(
    name: str,
    *,
    bound: float = 1e4,
    extra_batch: Callable[[int, int, int, np.ndarray, np.random.Generator], dict] | None = None,
    setup: Setup | None = None,
    atol: float = 1e-4,
    max_examples: int | None = None,
    **params: Any,
) -> None:
    """Check a registered loss against the loss contracts (see module doc).

    ``extra_batch(B, L, V, mask, rng)`` returns extra batch arrays a loss needs (pairs,
    reasoning masks...); it replaces the default batch when given.

    A second instance is built as a run builds it when the spec schedules every float
    field (a constant schedule of the same value): it must build, run and give the same
    value, so a loss that reads a scheduled float from its factory's config (a
    ``Schedule`` there) instead of ``inputs.params`` fails here with the field named.
    """
    component = get_registry().get("loss", name)
    config = _resolved(make_config("loss", name, **params))
    setup = setup or Setup(num_teachers=1)
    mx.random.seed(0)  # the same initial parameters for the scheduled twin below
    loss = component.factory(make_config("loss", name, **params), setup)
    make_batch = extra_batch or default_batch
    # The same loss built as a run builds it when the spec schedules every float it can:
    # a loss that reads such a float from its factory's config (a Schedule there) fails
    # here, not in the middle of someone's run.
    sched_config, sched_fields = _every_float_scheduled(
        "loss", name, make_config("loss", name, **params), params
    )
    scheduled_loss = None
    if sched_config is not None:
        what = f"with {', '.join(sched_fields)} scheduled"
        mx.random.seed(0)
        try:
            scheduled_loss = component.factory(sched_config, setup)
        except Exception as exc:
            raise AssertionError(
                f"{name}: building it {what} raised {type(exc).__name__}: {exc}; {_READ_PARAMS}"
            ) from exc
        sched_params = _resolved(sched_config)

    def run(case: LossCase, student: np.ndarray | None = None, teacher: np.ndarray | None = None):
        if teacher is not None:
            case = attrs.evolve(case, teacher=teacher)
        logits = mx.array(case.student if student is None else student)
        value, _metrics = loss(_inputs(component, config, case, logits))
        return value

    def grad(case: LossCase):
        def f(logits):
            value, _ = loss(_inputs(component, config, case, logits))
            return value

        return mx.grad(f)(mx.array(case.student))

    def check_scheduled(case: LossCase, plain: float) -> None:
        logits = mx.array(case.student)
        try:
            value, _metrics = scheduled_loss(_inputs(component, sched_params, case, logits))
            got = value.item()
        except Exception as exc:
            raise AssertionError(
                f"{name}: {what} (constant schedules of the same values) it raised "
                f"{type(exc).__name__}: {exc}; {_READ_PARAMS}"
            ) from exc
        assert abs(got - plain) <= atol * max(1.0, abs(plain)) * 10, (
            f"{name}: {what} (constant schedules of the same values) the loss is {got}, "
            f"with plain numbers {plain}; {_READ_PARAMS}"
        )

    under_test = LossUnderTest(name, config, loss)

    def check_both_paths(case: LossCase, plain: float) -> None:
        """A row loss: the fused path (an identity head over the logits) equals the full-
        logit path, value and gradient."""
        if not under_test.declares_rows:
            return
        logits = mx.array(case.student)
        if loss.rows(_inputs(component, config, case, logits)) is None:
            return

        def fused(x):
            return under_test.fused(_inputs(component, config, case, x))[0]

        got, g_fused = mx.value_and_grad(fused)(logits)
        assert abs(got.item() - plain) <= atol * max(1.0, abs(plain)) * 10, (
            f"{name}: its rows give {got.item()} fused with the head and {plain} on full "
            "logits; the two paths must compute one loss"
        )
        g_full = np.array(grad(case))
        scale = max(1.0, float(np.abs(g_full).max()))
        assert np.allclose(np.array(g_fused), g_full, atol=atol * 10 * scale), (
            f"{name}: its gradient differs between the fused and the full-logit path "
            f"(max difference {float(np.abs(np.array(g_fused) - g_full).max()):.3g})"
        )

    profile = settings.get_profile(PROFILE)
    limit = max_examples or profile.max_examples

    @settings(profile, max_examples=limit)
    @given(logit_pairs(bound=30.0), st.integers(0, 2**31 - 1))
    def ordinary(arrays, seed):
        student, teacher, mask = arrays
        rng = np.random.default_rng(seed)
        B, L, V = student.shape
        case = LossCase(student, teacher, mask, make_batch(B, L, V, mask, rng))
        value = run(case)
        assert value.size == 1, f"{name}: loss must be a scalar, got shape {value.shape}"
        v = value.item()
        assert np.isfinite(v), f"{name}: loss is {v} on ordinary logits"
        if scheduled_loss is not None:
            check_scheduled(case, v)
        # constant shift of every logit at each position
        shift_s = rng.uniform(-50, 50, size=(B, L, 1)).astype(np.float32)
        shift_t = rng.uniform(-50, 50, size=(B, L, 1)).astype(np.float32)
        shifted = run(case, student + shift_s, teacher + shift_t).item()
        assert abs(shifted - v) <= atol * max(1.0, abs(v)) * 10, (
            f"{name}: not invariant to a constant shift of the logits ({v} vs {shifted})"
        )
        # masked positions ignored
        noise = rng.standard_normal((B, L, V)).astype(np.float32) * 10
        where = (mask == 0)[..., None]
        changed = run(
            case,
            np.where(where, student + noise, student),
            np.where(where, teacher - noise, teacher),
        ).item()
        assert abs(changed - v) <= atol * max(1.0, abs(v)), (
            f"{name}: masked positions changed the loss ({v} vs {changed})"
        )
        if "zero_at_identity" in component.properties:
            same = run(case, teacher=student).item()
            assert abs(same) <= atol * 10, f"{name}: loss is {same} at identical inputs, not 0"
        check_both_paths(case, v)

    @settings(profile, max_examples=max(3, limit // 3))
    @given(logit_pairs(bound=bound), st.integers(0, 2**31 - 1))
    def extreme(arrays, seed):
        student, teacher, mask = arrays
        B, L, V = student.shape
        rng = np.random.default_rng(seed)
        student = np.where(rng.random(student.shape) < 0.5, bound, -bound).astype(np.float32)
        case = LossCase(student, teacher, mask, make_batch(B, L, V, mask, rng))
        v = run(case).item()
        assert np.isfinite(v), f"{name}: loss is {v} for logits at +/-{bound}"
        g = np.array(grad(case))
        assert np.all(np.isfinite(g)), f"{name}: non-finite gradient for logits at +/-{bound}"

    ordinary()
    extreme()


# ---------------------------------------------------------------- scheduler contracts


def check_scheduler(name: str, *, total: int = 100, **params: Any) -> None:
    """Values are finite; with no warmup, step 0 gives ``start`` (or ``value``) and the last
    step gives ``end`` where the config has one; the schedule moves monotonically from
    start to end when it declares monotone or has a start and an end."""
    component = get_registry().get("scheduler", name)
    config = make_config("scheduler", name, **params)
    fn = component.factory(config, None)
    steps = getattr(config, "steps", None) or total
    values = [float(fn(s, steps)) for s in range(steps + 1)]
    assert all(np.isfinite(values)), f"{name}: non-finite values {values}"
    warm = getattr(config, "warmup", 0) or 0
    start = getattr(config, "start", getattr(config, "value", None))
    if warm == 0 and start is not None:
        assert abs(values[0] - start) < 1e-6 * max(1, abs(start)), (
            f"{name}: step 0 gives {values[0]}, expected start {start}"
        )
    if warm:
        ws = getattr(config, "warmup_start", 0.0)
        assert abs(values[0] - ws) < 1e-6 * max(1, abs(ws)), f"{name}: warmup must start at {ws}"
    end = getattr(config, "end", None)
    if end is not None:
        assert abs(values[-1] - end) < 1e-6 * max(1, abs(end)), (
            f"{name}: the last step gives {values[-1]}, expected end {end}"
        )
    after = values[warm:]
    diffs = np.diff(after)
    up = "monotone_increasing" in component.properties or (end is not None and end >= start)
    down = "monotone_decreasing" in component.properties or (end is not None and end <= start)
    if up and not down:
        assert np.all(diffs >= -1e-9), f"{name}: not monotone increasing"
    if down and not up:
        assert np.all(diffs <= 1e-9), f"{name}: not monotone decreasing"


# ---------------------------------------------------------------- aggregator contracts


def check_aggregator(
    name: str,
    *,
    teachers: int = 3,
    setup: Setup | None = None,
    max_examples: int | None = None,
    **params: Any,
) -> None:
    """The aggregated signal is a distribution at several temperatures, and any weights it
    reports are non-negative rows summing to 1."""
    component = get_registry().get("teacher_aggregator", name)
    setup = setup or Setup(num_teachers=teachers)
    aggregate = component.factory(make_config("teacher_aggregator", name, **params), setup)
    profile = settings.get_profile(PROFILE)

    @settings(profile, max_examples=max_examples or profile.max_examples)
    @given(shapes(max_vocab=16), st.integers(0, 2**31 - 1))
    def prop(shape, seed):
        B, L, V = shape
        rng = np.random.default_rng(seed)
        signals = [
            TeacherSignal(
                vocab_size=V,
                logits=mx.array(rng.standard_normal((B, L, V)).astype(np.float32) * 5),
                hidden_states=tuple(
                    mx.array(rng.standard_normal((B, L, 8)).astype(np.float32)) for _ in range(3)
                ),
            )
            for _ in range(teachers)
        ]
        student = ModelOutput(
            logits=mx.array(rng.standard_normal((B, L, V)).astype(np.float32)),
            hidden_states=tuple(
                mx.array(rng.standard_normal((B, L, 8)).astype(np.float32)) for _ in range(3)
            ),
        )
        mask = np.ones((B, L), np.float32)
        batch = {k: mx.array(v) for k, v in default_batch(B, L, V, mask, rng).items()}
        inputs = LossInputs(student=student, teacher=None, batch=batch)
        out = aggregate(signals, inputs)
        for T in (0.5, 1.0, 4.0):
            total = np.array(mx.exp(out.log_probs(T)).sum(-1))
            assert np.allclose(total, 1.0, atol=1e-4), f"{name}: not a distribution at T={T}"
        if out.weights is not None:
            w = np.array(out.weights)
            assert np.all(w >= -1e-7), f"{name}: negative teacher weights"
            assert np.allclose(w.sum(-1), 1.0, atol=1e-5), f"{name}: weights do not sum to 1"

    prop()
