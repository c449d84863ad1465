"""Memory-bounded token divergences between student logits and a teacher signal.

Every public function returns the masked mean over tokens of a per-token divergence summed
over the vocabulary: ``sum_i w_i d_i / max(sum_i w_i, 1)`` with ``w`` the mask, float32,
0 for an empty mask. With ``q = softmax(s / T)`` (student) and ``p = softmax(t / T)``
(teacher) at one temperature ``T``:

=================  ==========================================================================
``forward_kl``     ``KL(p || q) = sum_v p_v (log p_v - log q_v)``
``reverse_kl``     ``KL(q || p)``
``gjsd``           ``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``
                   (Agarwal et al. 2024, GKD eq. 1; TRL ``GKDTrainer.generalized_jsd_loss``).
                   As in TRL the endpoints are special-cased: ``beta = 0`` is ``forward_kl`` and
                   ``beta = 1`` is ``reverse_kl`` (the mixture formula itself vanishes there).
``skew_kl``        ``KL(p || alpha p + (1 - alpha) q)`` (DistiLLM SKL, Ko et al. 2024;
                   ``distillm/losses.py::skewed_forward_kl`` with ``lam = alpha``, which drops
                   the constant ``sum p log p``; we keep it so the value is a divergence).
``skew_reverse_kl`` ``KL(q || alpha q + (1 - alpha) p)`` (DistiLLM SRKL,
                   ``skewed_reverse_kl`` with ``lam = alpha``). ``alpha = 0`` gives the plain KL.
``tvd``            total variation ``1/2 sum_v |p_v - q_v|`` (DistiLLM's and Liger-Kernel's
                   TVD; bounded by 1, a metric, not a KL).
=================  ==========================================================================

No temperature-squared factor is applied here; losses multiply by ``T**2`` explicitly.

How memory stays bounded: the public entry points run through
:func:`kdcore.kernels.chunked.chunked_token_mean`, which takes the masked tokens a chunk of
rows at a time with a row function here (:func:`dense_rows`, :func:`sparse_rows`: per-row
values and their gradient with respect to the student's logits, in closed form), so forward
and backward hold one chunk of ``[chunk_rows, V]`` temporaries; a native kernel
(:mod:`kdcore.kernels.native`) replaces a row function on the CPU.

Gradients, with ``lq = log q`` and ``g = d d / d lq`` (``q`` taken as ``exp(lq)``):
``forward_kl``: ``g = -p``; ``reverse_kl``: ``g = q (lq - lp) + q``;
``gjsd``: ``g = (1 - beta) q (lq - lm)``; ``skew_kl``: ``g = -(1 - alpha) p q / m``;
``skew_reverse_kl``: ``g = q (lq - lm) + (1 - alpha) q p / m``; ``tvd``: ``g = sign(q - p) q / 2``
(the subgradient 0 where ``q = p``); then through the log-softmax
``d d / d s = (g - q sum(g)) / T``.

Sparse (top-k) teachers: the teacher is known on its top-k ids ``S`` (plus the log of the
mass outside them). Both distributions are reduced to the same support and the divergence is
taken there:

- ``renormalize``: ``p`` and ``q`` renormalised over ``S`` (``k`` classes);
- ``tail-bucket``: ``k + 1`` classes, the ``k`` top tokens and one class for everything else;
  the student's own tail mass is ``1 - sum_{v in S} q_v`` (computed as the sum over the
  complement, so small tails keep their precision).

For ``forward_kl`` with ``k = V`` both are exact. For every divergence here ``tail-bucket``
is a coarse-graining of the full distributions, so by the data-processing inequality it is a
lower bound of the full-vocabulary value, equal to it when the student's and teacher's tails
are proportional; that is the documented approximation for ``reverse_kl`` and ``gjsd`` from a
top-k cache. ``renormalize`` is exact when both put all their mass on ``S``.
"""

from __future__ import annotations

import math

import mlx.core as mx

from kdcore.kernels.chunked import _masked_mean, chunked_token_mean
from kdcore.kernels.kinds import _temperature, canonical
from kdcore.kernels.native import RowFn, with_row_kernel
from kdcore.kernels.support import LOG_TINY, TINY, _complement, check_tail
from kdcore.signal.teacher import stable_log_softmax

# ---------------------------------------------------------------- per-row mathematics


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _xlogy(a: mx.array, b: mx.array) -> mx.array:
    """``a * b`` with 0 where ``a`` is 0 (so ``0 log 0 = 0`` and ``0 * inf = 0``)."""
    return mx.where(a > 0, a * b, 0.0)


def row_terms(
    kind: str, coef: float, lq: mx.array, lp: mx.array, grad: bool = True
) -> tuple[mx.array, mx.array | None]:
    """Per-row divergence and its gradient with respect to ``lq``.

    ``lq`` (student) and ``lp`` (teacher) are normalised log-probabilities over the last
    axis; ``kind``/``coef`` come from :func:`canonical`. The gradient treats ``q = exp(lq)``
    elementwise; callers apply the chain rule of their own normalisation.
    """
    if kind == "forward_kl":
        p = mx.exp(lp)
        value = _xlogy(p, lp - lq).sum(-1)
        return value, (-p if grad else None)
    if kind == "reverse_kl":
        q = mx.exp(lq)
        term = _xlogy(q, lq - lp)
        return term.sum(-1), (term + q if grad else None)
    if kind == "gjsd":
        b = coef
        lm = mx.logaddexp(lp + math.log(b), lq + math.log1p(-b))
        p, q = mx.exp(lp), mx.exp(lq)
        tq = _xlogy(q, lq - lm)
        value = b * _xlogy(p, lp - lm).sum(-1) + (1.0 - b) * tq.sum(-1)
        return value, ((1.0 - b) * tq if grad else None)
    if kind == "skew_kl":
        a = coef
        lm = mx.logaddexp(lp + _log(a), lq + _log(1.0 - a))
        p = mx.exp(lp)
        value = _xlogy(p, lp - lm).sum(-1)
        return value, (-(1.0 - a) * _xlogy(p, mx.exp(lq - lm)) if grad else None)
    if kind == "skew_reverse_kl":
        a = coef
        lm = mx.logaddexp(lq + _log(a), lp + _log(1.0 - a))
        q = mx.exp(lq)
        term = _xlogy(q, lq - lm)
        if not grad:
            return term.sum(-1), None
        return term.sum(-1), term + (1.0 - a) * _xlogy(q, mx.exp(lp - lm))
    if kind == "tvd":
        q = mx.exp(lq)
        diff = q - mx.exp(lp)
        value = 0.5 * mx.abs(diff).sum(-1)
        return value, (0.5 * mx.sign(diff) * q if grad else None)
    raise ValueError(f"unknown divergence {kind!r}")


def _log_softmax(z: mx.array) -> mx.array:
    # One implementation for every log-softmax here: the row maximum subtracted first.
    return stable_log_softmax(z)


def dense_rows(kind: str, coef: float, temperature: float, teacher_temperature: float) -> RowFn:
    """Row function of the dense kernel: ``(scale [C, 1], s [C, V], t [C, V])`` to
    ``(d [C], scale * dd/ds [C, V])``; a native kernel registered for ``kind`` replaces it
    on the CPU (:func:`with_row_kernel`)."""
    inv_t, inv_tt = 1.0 / temperature, 1.0 / teacher_temperature

    def scaled(z: mx.array, inv: float) -> mx.array:
        z = z.astype(mx.float32)
        return z if inv == 1.0 else z * inv

    def rows(scale: mx.array, s: mx.array, t: mx.array):
        lq = _log_softmax(scaled(s, inv_t))
        lp = _log_softmax(scaled(t, inv_tt))
        q = mx.exp(lq)
        factor = scale * inv_t
        # The two plain KLs have short closed forms; the rest go through row_terms.
        if kind == "forward_kl":
            p = mx.exp(lp)
            value = _xlogy(p, lp - lq).sum(-1)
            return value, (q - p) * factor
        if kind == "reverse_kl":
            term = _xlogy(q, lq - lp)
            value = term.sum(-1)
            return value, (term - q * value[:, None]) * factor
        value, g = row_terms(kind, coef, lq, lp)
        return value, (g - q * g.sum(-1, keepdims=True)) * factor

    return with_row_kernel(kind, rows, coef, temperature, teacher_temperature)


def _student_tail(q: mx.array, outside: mx.array) -> tuple[mx.array, mx.array]:
    """(clamped tail mass [C, 1], q restricted to the complement [C, V])."""
    rest = q * outside
    return mx.maximum(rest.sum(-1, keepdims=True), TINY), rest


def sparse_rows(kind: str, coef: float, temperature: float, tail: str) -> RowFn:
    """Row function of the sparse kernel: ``(scale [C, 1], s [C, V], ids [C, K], lp [C, K or
    K+1])`` to ``(d [C], scale * dd/ds [C, V])``.

    ``lp`` are the teacher's log-probabilities on the support (``ids`` and, for
    ``tail-bucket``, a last tail class), already at ``temperature``. A native kernel
    registered for ``"sparse:KIND"`` replaces it on the CPU (:func:`with_row_kernel`).
    """
    check_tail(tail)
    inv_t = 1.0 / temperature

    def rows(scale: mx.array, s: mx.array, ids: mx.array, lp: mx.array):
        z = s.astype(mx.float32) * inv_t
        factor = scale * inv_t
        z_top = mx.take_along_axis(z, ids, axis=-1)
        lp = lp.astype(mx.float32)
        if tail == "renormalize":
            lq = _log_softmax(z_top)
            value, g = row_terms(kind, coef, lq, lp)
            g_top = g - mx.exp(lq) * g.sum(-1, keepdims=True)
            grad = mx.put_along_axis(mx.zeros(z.shape, mx.float32), ids, g_top * factor, -1)
            return value, grad
        k = ids.shape[-1]
        # Relative to the row maximum, so z - lse is not a difference of two numbers near 1e4
        # (no autodiff here: the gradient is the closed form below, unchanged by a shift).
        z = z - z.max(-1, keepdims=True)
        z_top = mx.take_along_axis(z, ids, axis=-1)
        lse = mx.logsumexp(z, axis=-1, keepdims=True)
        q = mx.exp(z - lse)
        mass, rest = _student_tail(q, _complement(ids, z.shape))
        lq_top = z_top - lse
        lq = mx.concatenate([lq_top, mx.log(mass)], axis=-1)
        lp = mx.concatenate([lp[..., :k], mx.maximum(lp[..., k:], LOG_TINY)], axis=-1)
        value, g = row_terms(kind, coef, lq, lp)
        total = g.sum(-1, keepdims=True)
        # d lq_top / dz = onehot - q ; d log(tail) / dz = [outside] q / tail - q
        grad = rest * (g[..., k:] / mass) - q * total
        top = g[..., :k] - mx.exp(lq_top) * total
        return value, mx.put_along_axis(grad * factor, ids, top * factor, -1)

    return with_row_kernel(f"sparse:{kind}", rows, coef, temperature, tail)


# ---------------------------------------------------------------- plain formulations


def plain_dense_rows(
    kind: str,
    coef: float,
    student: mx.array,
    teacher: mx.array,
    temperature: float,
    teacher_temperature: float | None = None,
) -> mx.array:
    """Straightforward per-token divergence over whole ``[..., V]`` arrays (autodiff-able)."""
    tt = temperature if teacher_temperature is None else teacher_temperature
    lq = _log_softmax(student.astype(mx.float32) / temperature)
    lp = _log_softmax(teacher.astype(mx.float32) / tt)
    return row_terms(kind, coef, lq, lp, grad=False)[0]


def plain_sparse_rows(
    kind: str,
    coef: float,
    student: mx.array,
    ids: mx.array,
    lp: mx.array,
    temperature: float,
    tail: str,
) -> mx.array:
    """Straightforward per-token divergence against a top-k teacher support."""
    lq_full = _log_softmax(student.astype(mx.float32) / temperature)
    lq_top = mx.take_along_axis(lq_full, ids, axis=-1)
    lp = lp.astype(mx.float32)
    if tail == "renormalize":
        return row_terms(kind, coef, _log_softmax(lq_top), lp, grad=False)[0]
    k = ids.shape[-1]
    outside = _complement(ids.reshape(-1, k), (ids.size // k, student.shape[-1]))
    rest = (mx.exp(lq_full).reshape(outside.shape) * outside).sum(-1)
    mass = mx.maximum(rest.reshape(ids.shape[:-1]), TINY)
    lq = mx.concatenate([lq_top, mx.log(mass)[..., None]], axis=-1)
    lp = mx.concatenate([lp[..., :k], mx.maximum(lp[..., k:], LOG_TINY)], axis=-1)
    return row_terms(kind, coef, lq, lp, grad=False)[0]


def plain_divergence(
    student_logits: mx.array,
    teacher_logits: mx.array,
    mask: mx.array,
    kind: str = "forward_kl",
    *,
    temperature: float | mx.array = 1.0,
    beta: float | mx.array = 0.5,
    alpha: float | mx.array = 0.1,
) -> mx.array:
    """The straightforward MLX formulation of :func:`dense_divergence` (whole-array ops)."""
    kind, coef = canonical(kind, beta, alpha)
    rows = plain_dense_rows(kind, coef, student_logits, teacher_logits, _temperature(temperature))
    return _masked_mean(rows, mask)


# ---------------------------------------------------------------- public entry points


def dense_divergence(
    student_logits: mx.array,
    teacher_logits: mx.array,
    mask: mx.array,
    kind: str = "forward_kl",
    *,
    temperature: float | mx.array = 1.0,
    teacher_temperature: float | mx.array | None = None,
    beta: float | mx.array = 0.5,
    alpha: float | mx.array = 0.1,
    chunk_rows: int | None = None,
) -> mx.array:
    """Chunked divergence between ``softmax(s / T)`` and ``softmax(t / T_t)``.

    ``teacher_temperature`` defaults to ``temperature``; pass 1.0 when ``teacher_logits``
    are already log-probabilities at ``T`` (a mixture's ``log_probs(T)``).
    """
    kind, coef = canonical(kind, beta, alpha)
    t = _temperature(temperature)
    tt = t if teacher_temperature is None else _temperature(teacher_temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} "
            "differ; align the vocabularies first"
        )
    return chunked_token_mean(
        dense_rows(kind, coef, t, tt),
        lambda s, x: plain_dense_rows(kind, coef, s, x, t, tt),
        student_logits,
        [teacher_logits],
        mask,
        chunk_rows,
    )


def sparse_divergence(
    student_logits: mx.array,
    ids: mx.array,
    teacher_logprobs: mx.array,
    mask: mx.array,
    kind: str = "forward_kl",
    *,
    tail: str = "renormalize",
    temperature: float | mx.array = 1.0,
    beta: float | mx.array = 0.5,
    alpha: float | mx.array = 0.1,
    chunk_rows: int | None = None,
) -> mx.array:
    """Chunked divergence against a top-k teacher (see the module doc for the tail policies).

    ``ids`` [..., K] are the teacher's top-k token ids; ``teacher_logprobs`` are its
    log-probabilities at ``temperature`` on that support: [..., K] normalised over the
    top-k for ``renormalize``, [..., K + 1] with the tail class last for ``tail-bucket``
    (:func:`teacher_support` builds both).
    """
    kind, coef = canonical(kind, beta, alpha)
    t = _temperature(temperature)
    check_tail(tail)
    want = ids.shape[-1] + (1 if tail == "tail-bucket" else 0)
    if teacher_logprobs.shape[-1] != want:
        raise ValueError(
            f"tail {tail!r} needs {want} teacher log-probs per token, got "
            f"{teacher_logprobs.shape[-1]}"
        )
    ids = ids.astype(mx.int32)
    return chunked_token_mean(
        sparse_rows(kind, coef, t, tail),
        lambda s, i, lp: plain_sparse_rows(kind, coef, s, i, lp, t, tail),
        student_logits,
        [ids, teacher_logprobs],
        mask,
        chunk_rows,
    )


def plain_sparse_divergence(
    student_logits: mx.array,
    ids: mx.array,
    teacher_logprobs: mx.array,
    mask: mx.array,
    kind: str = "forward_kl",
    *,
    tail: str = "renormalize",
    temperature: float | mx.array = 1.0,
    beta: float | mx.array = 0.5,
    alpha: float | mx.array = 0.1,
) -> mx.array:
    """The straightforward formulation of :func:`sparse_divergence`."""
    kind, coef = canonical(kind, beta, alpha)
    rows = plain_sparse_rows(
        kind, coef, student_logits, ids, teacher_logprobs, _temperature(temperature), tail
    )
    return _masked_mean(rows, mask)
