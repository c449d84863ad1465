"""One training step: batch -> teachers (frozen) -> aggregator -> aligner -> weighted loss
terms -> gradients of everything that learns. Plain functions over the built parts."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from kdcore.engine import onpolicy
from kdcore.engine.build import Parts, Trainable
from kdcore.engine.fused import FusedTerm, fused_pass, head_trains, student_reason
from kdcore.engine.routed import is_routed, routed_loss_terms
from kdcore.losses.inputs import LossInputs, StepContext
from kdcore.losses.rows import as_list, rows_on_logits
from kdcore.models.output import ModelOutput
from kdcore.protocols import DeclaresRows, PreparesBatch
from kdcore.signal.aligned import position_mask
from kdcore.signal.teacher import TeacherSignal


def combined_signal(
    parts: Parts, signals: list[TeacherSignal], inputs: LossInputs, trainable: Trainable | None
) -> TeacherSignal | None:
    """The teachers' signals aggregated and aligned into the student's vocabulary."""
    if not signals:
        return None
    aggregator = getattr(trainable, "aggregator", parts.aggregator)
    return parts.aligner(aggregator(signals, inputs))


def step_context(parts: Parts, step: int) -> StepContext:
    def teacher_signal(batch: dict, student_output: ModelOutput | None = None):
        if not parts.teachers:
            return None
        signals = [t.signal(batch, frozenset(), parts.student) for t in parts.teachers]
        if student_output is None:
            student_output = parts.student(batch["input_ids"])
        inputs = LossInputs(student=student_output, teacher=None, batch=batch)
        return combined_signal(parts, signals, inputs, None)

    def sample(prompts, max_new_tokens, temperature=1.0, top_p=1.0, stop_token=None, **kw):
        mixing = kw.get("teacher_mix_alpha", 0.0) > 0.0
        return onpolicy.sample_continuations(
            parts.student,
            prompts,
            max_new_tokens,
            temperature,
            top_p,
            stop_token,
            teacher_signal=teacher_signal if mixing else None,
            **kw,
        )

    return StepContext(
        step=step,
        total_steps=parts.total,
        seed=parts.spec.run.seed,
        student=parts.student,
        num_teachers=len(parts.teachers),
        teacher_signal=teacher_signal,
        sample_continuations=sample,
    )


def prepare_batch(
    parts: Parts,
    rows: dict[str, np.ndarray],
    step: int,
    index: int | None = None,
    info: dict | None = None,
) -> dict[str, mx.array]:
    """The batch as MLX arrays, after every loss's ``prepare_batch`` (outside autodiff),
    then, when ``train.on_policy`` draws it, the student's continuations of its prompts
    (``kdcore.engine.onpolicy``; ``index``: the batch's number, by default the step's first
    micro-batch; ``info`` receives the on-policy metrics)."""
    batch = {k: mx.array(v) for k, v in rows.items()}
    preparers = [b.loss for b in parts.losses if isinstance(b.loss, PreparesBatch)]
    context = step_context(parts, step)
    for loss in preparers:
        batch = loss.prepare_batch(batch, context)
    if index is None:
        index = step * parts.spec.train.grad_accum
    return onpolicy.sample_batch(parts, rows, batch, context, index, info)


def loss_terms(parts: Parts, trainable: Trainable, batch, signals, step: int):
    """(total, {label: term}, {metric: value}) for one micro-batch.

    Losses that can run fused with the output heads (``kdcore.engine.fused``) share one
    pass over token chunks; the others are called on the student's full logits. With the
    ``route`` aggregator each teacher's terms run on its own rows (``kdcore.engine.routed``)."""
    out = trainable.student(batch["input_ids"], capture=parts.capture)
    inputs = LossInputs(student=out, teacher=None, batch=batch, step=step, total_steps=parts.total)
    if is_routed(parts):
        return routed_loss_terms(parts, trainable, out, inputs, signals, step, run_terms)
    teacher = combined_signal(parts, signals, inputs, trainable)
    total, terms, metrics = run_terms(parts, trainable, parts.losses, out, inputs, teacher, step)
    if teacher is not None and teacher.weights is not None:
        mean_w = teacher.weights.reshape(-1, teacher.weights.shape[-1]).mean(0)
        for k in range(mean_w.shape[0]):
            metrics[f"teacher_weight/{k}"] = mean_w[k]
    return total, terms, metrics


def run_terms(
    parts: Parts,
    trainable: Trainable,
    losses: list,
    out: ModelOutput,
    inputs: LossInputs,
    teacher: TeacherSignal | None,
    step: int,
    watch: list = (),
):
    """(total, {label: term}, {metric: value}) of ``losses`` (built losses of the run) on the
    student's output ``out`` against ``teacher``; ``inputs`` are the step's, without a
    teacher. ``watch``: (metric, :class:`kdcore.Rows`) pairs computed in the same pass at
    weight 0, logged only (a routed step's per-teacher agreement)."""
    batch = inputs.batch
    teacher_batch = batch
    if teacher is not None:
        # A teacher with another tokenizer covers only the positions it could align.
        aligned = position_mask(teacher)
        if aligned is not None:
            teacher_batch = {**batch, "mask": batch["mask"] * aligned}
    fusing = student_reason(out) is None  # each loss's own reason was decided at build
    total = mx.array(0.0)
    terms, metrics, fused = {}, {}, []
    for built in losses:
        loss = trainable.losses.get(built.key, built.loss)
        label = built.label
        loss_batch = teacher_batch if built.reads_teacher else batch
        params = built.params_at(step, parts.total)
        loss_inputs = attrs.evolve(inputs, teacher=teacher, params=params, batch=loss_batch)
        weight = built.weight_at(step, parts.total)
        declared = as_list(loss.rows(loss_inputs)) if isinstance(loss, DeclaresRows) else None
        if declared is not None and fusing and built.reason is None:
            for rows in declared:
                mask = loss_batch["mask"] if rows.mask is None else rows.mask
                fused.append(FusedTerm(label, rows, float(weight), mask))
                for key, metric in rows.metrics.items():
                    metrics[f"{label}/{key}"] = metric
            continue
        if declared is not None:  # the same rows, on the student's full logits
            value, extra = rows_on_logits(declared, out.logits, teacher, loss_batch)
        else:
            value, extra = loss(loss_inputs)
        terms[label] = value
        for key, metric in (extra or {}).items():
            metrics[f"{label}/{key}"] = metric
        if weight != 0.0:
            total = total + weight * value
    watched = {name for name, _ in watch}
    for name, rows in watch:
        mask = teacher_batch["mask"] if rows.mask is None else rows.mask
        if fusing:
            fused.append(FusedTerm(name, rows, 0.0, mask))
        else:
            metrics[name], _ = rows_on_logits(rows, out.logits, teacher, teacher_batch)
    if fused:
        head_grad = head_trains(trainable.student, out.head_weight)
        fused_total, values = fused_pass(fused, out, teacher, batch, head_grad)
        total = total + fused_total
        for term, value in zip(fused, values):
            if term.label in watched:
                metrics[term.label] = value
                continue
            terms[term.label] = terms.get(term.label, 0.0) + value * float(term.rows.weight)
            if term.rows.name:
                metrics[f"{term.label}/{term.rows.name}"] = value
        terms = {b.label: terms[b.label] for b in losses}
    return total, terms, metrics


class TokenCounts(NamedTuple):
    """What a step ran on: ``tokens``, every position of every row the student read
    (padding included: the work done), and ``loss_tokens``, the positions that carry loss."""

    tokens: int
    loss_tokens: int


def gradients(parts: Parts, step: int):
    """(total, terms, metrics, grads, :class:`TokenCounts`) of step ``step``, over its
    micro-batches."""
    accum = parts.spec.train.grad_accum

    def objective(trainable, batch, signals, step):
        total, terms, metrics = loss_terms(parts, trainable, batch, signals, step)
        return total, (terms, metrics)

    loss_and_grad = nn.value_and_grad(parts.trainable, objective)
    grads_sum, total_sum, terms_sum, metrics_sum = None, 0.0, {}, {}
    ntok = TokenCounts(0, 0)
    for micro in range(accum):
        index = step * accum + micro
        rows = parts.dp.shard(parts.dataset.batch(index, parts.spec.train.batch_size))
        sampling: dict = {}
        batch = prepare_batch(parts, rows, step, index, sampling)
        signals = parts.teacher_signals(batch)
        evaluate_signals(signals)
        (total, (terms, metrics)), grads = loss_and_grad(parts.trainable, batch, signals, step)
        metrics = {**metrics, **sampling}
        # the batch as the student read it (on-policy samples included)
        ntok = TokenCounts(
            ntok.tokens + int(batch["input_ids"].size),
            ntok.loss_tokens + int(batch["mask"].sum().item()),
        )
        if accum == 1:
            return total, terms, metrics, grads, ntok
        mx.eval(total, terms, grads)
        grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
        total_sum = total_sum + total
        terms_sum = {k: terms_sum.get(k, 0.0) + v for k, v in terms.items()}
        metrics_sum = {k: metrics_sum.get(k, 0.0) + v for k, v in metrics.items()}
    scale = 1.0 / accum
    return (
        total_sum * scale,
        {k: v * scale for k, v in terms_sum.items()},
        {k: v * scale for k, v in metrics_sum.items()},
        tree_map(lambda g: g * scale, grads_sum),
        ntok,
    )


def evaluate_signals(signals: list[TeacherSignal]) -> None:
    """Run the teachers now, before the student's graph: their activations are freed
    before the student's forward and backward need memory (the teacher is a constant to
    the step). Lazy logits stay lazy: only what a signal already holds is evaluated."""
    arrays = []
    for signal in signals:
        if signal is None:  # a routed teacher with no rows in this batch: not run
            continue
        for member in signal.members or (signal,):
            if member.members is not None:
                continue  # a nested mixture: left to the step
            held = [member.final_hidden, member.topk_ids, member.topk_logprobs]
            held += [member.tail_logmass, member.weights]
            if member.has_logits:
                held.append(member.logits)
            arrays += [a for a in held if a is not None]
            arrays += list(member.hidden_states or ()) + list(member.attentions or ())
        if signal.weights is not None:
            arrays.append(signal.weights)
    if arrays:
        mx.eval(arrays)


def all_finite(tree: Any) -> mx.array:
    """A 0-d boolean: every floating-point array in ``tree`` (or ``tree`` itself, one
    array) is free of NaN and inf."""
    leaves = [v for _, v in tree_flatten(tree)] if not isinstance(tree, mx.array) else [tree]
    checks = [
        mx.all(mx.isfinite(v))
        for v in leaves
        if isinstance(v, mx.array) and mx.issubdtype(v.dtype, mx.floating)
    ]
    return mx.all(mx.stack(checks)) if checks else mx.array(True)


def first_non_finite(
    total: mx.array, terms: dict[str, mx.array], grads: Any = None
) -> tuple[str, float] | None:
    """(term, value) of the first non-finite loss term, ``("gradients", nan)`` when the
    loss is finite but ``grads`` (a tree, or the gradient norm) is not, or None.

    The gradients are checked before the optimizer applies them: a finite loss with a NaN
    gradient would otherwise turn every parameter NaN, and the state "before" the next,
    NaN-loss step would be saved as the one to resume from."""
    grads_ok = all_finite(grads) if grads is not None else mx.array(True)
    mx.eval(total, terms, grads_ok)
    if math.isfinite(total.item()):
        return None if grads_ok.item() else ("gradients", float("nan"))
    bad = next((k for k, v in terms.items() if not math.isfinite(v.item())), "total")
    return bad, (terms[bad].item() if bad in terms else total.item())
