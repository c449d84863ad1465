"""Token losses declared as row functions: what the engine's fused head + loss path runs.

A token loss that is a function of each token's student and teacher logit rows declares
``rows(inputs) -> Rows | None`` (the :class:`kdcore.protocols.DeclaresRows` capability). The
engine then computes it from the student's final hidden states and output head, in chunks
of tokens (``kdcore.kernels.fused``): the teacher's logits are made per chunk from its own
hidden states and head, several such losses share one head matmul per chunk, and neither
model's ``[tokens, vocab]`` logits nor their gradient ever exist. When ``rows`` returns
None, or the student's head is not a plain matrix, the engine calls the loss itself on full
logits instead (the fallback; ``kd explain`` / ``kd validate`` say which path a spec takes).

A :class:`Rows` names what its row function reads after the student's logit rows:

- ``"teacher"``: the (aggregated, aligned) teacher's logits at temperature 1;
- ``"teacher:0"``, ``"teacher:1"``, ...: the logits of a mixture's members;
- ``"labels"``: the batch's next-token labels;
- any other name: a per-token array the loss passes in ``extras`` (leading shape [B, L]).

:func:`teacher_rows` builds the row function of a divergence for any teacher signal
(dense, a top-k cache, a mixture), so most losses are two lines; :class:`RowLoss` turns a
``rows`` function into a loss that also runs on full logits, so a plugin writes one function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from kdcore.kernels.chunked import chunked_token_mean
from kdcore.kernels.divergence import dense_rows, sparse_rows
from kdcore.kernels.fused import cross_entropy_rows as ce_row_fn
from kdcore.kernels.kinds import _temperature, canonical
from kdcore.kernels.native import RowFn
from kdcore.kernels.support import support_rows, teacher_support
from kdcore.signal.teacher import TeacherSignal, stable_log_softmax

TEACHER = "teacher"
LABELS = "labels"


def member(index: int) -> str:
    """The read name of a mixture's ``index``-th member."""
    return f"{TEACHER}:{index}"


@attrs.frozen(eq=False)
class Rows:
    """A token loss as a row function (read the module doc).

    ``fn(scale [C, 1], s [C, V], *reads) -> (values [C], scale * d values / d s [C, V])``
    with ``s`` the student's logit rows (float32) and one array per name in ``reads``.
    The loss's value is ``weight`` times the mean of ``values`` over the tokens, weighted by
    ``mask`` (default: the batch's mask). ``weight`` must be known in the forward (a float
    or a 0-d array, e.g. ``T ** 2``). ``metrics`` are logged beside the value.

    A loss made of several terms returns a list of Rows: its value is the sum of their
    weighted means, and each term with a ``name`` is also logged as the metric
    ``LABEL/NAME`` (its mean before ``weight``).
    """

    fn: RowFn
    reads: tuple[str, ...] = (TEACHER,)
    weight: float | mx.array = 1.0
    mask: mx.array | None = None
    extras: Mapping[str, mx.array] = attrs.field(factory=dict)
    metrics: Mapping[str, mx.array] = attrs.field(factory=dict)
    name: str | None = None


def as_list(declared: Rows | Sequence[Rows] | None) -> list[Rows] | None:
    """A loss's declaration as a list of terms (None stays None)."""
    if declared is None:
        return None
    return [declared] if isinstance(declared, Rows) else list(declared)


def teacher_rows(
    teacher: TeacherSignal,
    kind: str = "forward_kl",
    *,
    temperature: float | mx.array = 1.0,
    beta: float | mx.array = 0.5,
    alpha: float | mx.array = 0.1,
    tail: str = "renormalize",
    top_k: int = 0,
    weight: float | mx.array = 1.0,
    mask: mx.array | None = None,
    name: str | None = None,
) -> Rows:
    """The :class:`Rows` of the divergence ``kind`` (``kdcore.DIVERGENCES``) between the
    student and ``teacher`` at ``temperature``: the one definition behind
    :func:`token_divergence` and every divergence loss, fused or on full logits.

    A dense teacher gives dense rows (``0 < top_k < V``: its top-k support is taken per
    chunk, with the ``tail`` policy); a top-k cache, or a mixture with a top-k member, gives
    sparse rows over its (small) support; a mixture of dense teachers reads every member's
    logits per chunk and mixes their probabilities there. A mixture of mixtures, or the
    top-k of a dense mixture, reads the mixture's whole ``log_probs`` (``[B, L, V]``, made
    once). ``weight``, ``mask`` and ``name`` are the :class:`Rows` fields.

    Example::

        def rows(inputs):
            return kdcore.teacher_rows(inputs.teacher, "reverse_kl", temperature=2.0)
    """
    kind, coef = canonical(kind, beta, alpha)
    t = _temperature(temperature)
    common = dict(weight=weight, mask=mask, name=name)
    if teacher.is_sparse:
        ids, lp = teacher_support(teacher, t, tail, top_k)
        return Rows(
            sparse_rows(kind, coef, t, tail),
            ("topk_ids", "topk_logprobs"),
            extras={"topk_ids": ids, "topk_logprobs": lp},
            **common,
        )
    top = 0 < top_k < teacher.vocab_size
    if teacher.members is not None:
        nested = any(m.members is not None or not m.is_dense for m in teacher.members)
        if not nested and not top:
            return _mixture_rows(teacher, kind, coef, t, common)
        # The mixture's log-probabilities at T, whole: its rows are then a dense teacher's
        # at temperature 1 (the gradient reaches a learnable aggregator through them).
        log_probs = {LOG_PROBS: teacher.log_probs(t)}
        if top:
            return Rows(
                _topk_rows(kind, coef, t, top_k, tail, 1.0),
                (LOG_PROBS,),
                extras=log_probs,
                **common,
            )
        return Rows(dense_rows(kind, coef, t, 1.0), (LOG_PROBS,), extras=log_probs, **common)
    if top:
        return Rows(_topk_rows(kind, coef, t, top_k, tail, t), (TEACHER,), **common)
    return Rows(dense_rows(kind, coef, t, t), (TEACHER,), **common)


LOG_PROBS = "mixture_log_probs"


def _topk_rows(kind: str, coef: float, t: float, k: int, tail: str, teacher_t: float) -> RowFn:
    """Rows against the top-``k`` support of dense teacher rows, taken per chunk (as
    constants: no gradient reaches a learnable teacher through a top-k)."""
    support = support_rows(k, tail, teacher_t)
    sparse = sparse_rows(kind, coef, t, tail)

    def topk(scale: mx.array, s: mx.array, z: mx.array):
        ids, lp = support(z)
        return sparse(scale, s, ids, lp)

    return topk


def _mixture_rows(teacher: TeacherSignal, kind: str, coef: float, t: float, common) -> Rows:
    count = len(teacher.members)
    weights = teacher.weights.astype(mx.float32)
    if weights.ndim == 2:  # per instance -> per token
        lead = teacher.shape
        weights = mx.broadcast_to(weights[:, None, :], (*lead, count))
    dense = dense_rows(kind, coef, t, 1.0)
    inv = 1.0 / t

    def mixer(rows: RowFn) -> RowFn:
        def mixed(scale: mx.array, s: mx.array, *args: mx.array):
            *logits, w = args
            # As TeacherSignal.log_probs: log sum_m w_m softmax(z_m / T), per chunk.
            stacked = mx.stack([stable_log_softmax(z.astype(mx.float32) * inv) for z in logits], -1)
            log_w = mx.log(mx.maximum(w.astype(mx.float32), 1e-30))[:, None, :]
            return rows(scale, s, mx.logsumexp(stacked + log_w, axis=-1))

        return mixed

    mixed = mixer(dense)
    # The differentiable form (a native kernel is not): what carries a learnable
    # aggregator's gradient to the weights on the full-logit path.
    mixed.pure = mixer(getattr(dense, "pure", dense))
    reads = tuple(member(i) for i in range(count)) + ("mixture_weights",)
    return Rows(mixed, reads, extras={"mixture_weights": weights}, **common)


def cross_entropy_rows(label_smoothing: float | mx.array = 0.0) -> Rows:
    """The :class:`Rows` of the hard-label cross-entropy (the ``ce`` loss)."""
    return Rows(ce_row_fn(float(label_smoothing)), (LABELS,))


# ---------------------------------------------------------------- the unfused path


def read_arrays(rows: Rows, teacher: TeacherSignal | None, batch: Mapping[str, mx.array]):
    """The whole ``[B, L, ...]`` array behind each name of ``rows.reads`` (full logits)."""
    out = []
    for name in rows.reads:
        if name == TEACHER:
            out.append(_need(teacher, name).logits)
        elif name.startswith(f"{TEACHER}:"):
            out.append(_need(teacher, name).members[int(name.split(":", 1)[1])].logits)
        elif name in rows.extras:
            out.append(rows.extras[name])
        elif name == LABELS:
            out.append(batch["labels"])
        else:
            raise ValueError(f"rows read {name!r}, which is neither a teacher nor an extra")
    return out


def _need(teacher: TeacherSignal | None, name: str) -> TeacherSignal:
    if teacher is None:
        raise ValueError(f"rows read {name!r}, but the step has no teacher")
    return teacher


def rows_on_logits(
    rows: Rows | Sequence[Rows],
    student_logits: mx.array,
    teacher: TeacherSignal | None,
    batch: Mapping[str, mx.array],
) -> tuple[mx.array, dict[str, mx.array]]:
    """``(value, metrics)`` of ``rows`` computed from full student logits (what the fused
    path equals): ``chunked_token_mean`` over each term's row function, weighted."""
    total, metrics = mx.array(0.0), {}
    for term in as_list(rows):
        value = _term_on_logits(term, student_logits, teacher, batch)
        total = total + value * term.weight
        metrics.update(term.metrics)
        if term.name:
            metrics[term.name] = value
    return total, metrics


def _term_on_logits(rows: Rows, student_logits, teacher, batch) -> mx.array:
    mask = batch["mask"] if rows.mask is None else rows.mask
    arrays = read_arrays(rows, teacher, batch)
    lead = tuple(mask.shape)
    n = int(np.prod(lead))

    # The plain form is differentiated (the teacher's cotangent for a learnable
    # aggregator): a native row function names its pure-MLX twin as ``fn.pure``.
    differentiable = getattr(rows.fn, "pure", rows.fn)

    def plain(s, *xs):
        flat = [x.reshape(n, *x.shape[len(lead) :]) for x in xs]
        ones = mx.ones((n, 1), mx.float32)
        values, _ = differentiable(ones, s.reshape(n, s.shape[-1]), *flat)
        return values.reshape(lead)

    return chunked_token_mean(rows.fn, plain, student_logits, arrays, mask)


class RowLoss:
    """A token loss written once, as its :class:`Rows`: the engine runs them fused with the
    output heads when it can, and on full logits otherwise; called directly (tests, other
    losses), it evaluates them on ``inputs.student.logits``.

    ``rows(inputs) -> Rows | [Rows]`` declares the loss for one step's inputs.

    Example::

        def my_loss(config, setup=None):
            return kdcore.RowLoss(
                lambda inputs: kdcore.teacher_rows(inputs.teacher, "tvd")
            )
    """

    def __init__(self, rows: Callable[[Any], Rows | Sequence[Rows] | None]):
        self._rows = rows

    def rows(self, inputs: Any) -> Rows | Sequence[Rows] | None:
        return self._rows(inputs)

    def __call__(self, inputs: Any) -> tuple[mx.array, dict]:
        rows = self._rows(inputs)
        if rows is None:
            raise ValueError("this loss declared no rows for these inputs")
        return rows_on_logits(rows, inputs.student.logits, inputs.teacher, inputs.batch)


def token_divergence(
    student_logits: mx.array,
    teacher: TeacherSignal | mx.array,
    mask: mx.array,
    kind: str = "forward_kl",
    *,
    temperature: float | mx.array = 1.0,
    beta: float | mx.array = 0.5,
    alpha: float | mx.array = 0.1,
    tail: str = "renormalize",
    top_k: int = 0,
) -> mx.array:
    """The masked mean over tokens of the divergence ``kind`` between student logits and
    any teacher signal (or teacher logits): :func:`teacher_rows` evaluated on the whole
    logits, chunked so at most one chunk of ``[rows, V]`` temporaries is alive.

    Example::

        value = kdcore.token_divergence(logits, inputs.teacher, mask, "tvd")
    """
    if isinstance(teacher, mx.array):
        teacher = TeacherSignal(vocab_size=teacher.shape[-1], logits=teacher)
    rows = teacher_rows(
        teacher, kind, temperature=temperature, beta=beta, alpha=alpha, tail=tail, top_k=top_k
    )
    value, _ = rows_on_logits(
        attrs.evolve(rows, mask=mask), student_logits, teacher, {"mask": mask}
    )
    return value
