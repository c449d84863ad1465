"""Top-k support rows: a teacher read as its top-k token ids, their log-probabilities and,
for the ``tail-bucket`` policy, one class for the mass outside them (see
:mod:`kdcore.kernels.divergence` for the tail policies and what each approximates).

:func:`teacher_support` reads any :class:`~kdcore.signal.teacher.TeacherSignal` that way: a
top-k cache re-tempered, a dense teacher through :func:`support_rows` in chunks, a mixture
with top-k members through :func:`mixture_support`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from kdcore.kernels.chunked import map_rows
from kdcore.kernels.kinds import _temperature
from kdcore.signal.teacher import TeacherSignal, stable_log_softmax

TAILS = ("renormalize", "tail-bucket")

# Smallest tail mass we take a log of; keeps k = V and underflowing tails finite.
TINY = 1e-30
LOG_TINY = math.log(TINY)


def check_tail(tail: str) -> None:
    if tail not in TAILS:
        raise ValueError(f"unknown tail policy {tail!r}; use one of {', '.join(TAILS)}")


def _complement(ids: mx.array, shape: tuple[int, int]) -> mx.array:
    """1.0 outside ``ids`` (per row), 0.0 on them."""
    ones = mx.ones(shape, mx.float32)
    return mx.put_along_axis(ones, ids, mx.zeros(ids.shape, mx.float32), axis=-1)


def topk_sorted(z: mx.array, k: int) -> mx.array:
    """Ids of the ``k`` largest entries per row, largest first (no gradient)."""
    z = mx.stop_gradient(z)
    ids = mx.argpartition(-z, kth=k - 1, axis=-1)[..., :k]
    order = mx.argsort(-mx.take_along_axis(z, ids, axis=-1), axis=-1)
    return mx.take_along_axis(ids, order, axis=-1)


def teacher_support(
    teacher: TeacherSignal,
    temperature: float | mx.array,
    tail: str = "renormalize",
    top_k: int = 0,
    chunk_rows: int | None = None,
) -> tuple[mx.array, mx.array]:
    """``(ids [..., K], log-probs [..., K or K+1])`` of a teacher at ``temperature``.

    From a sparse signal: its stored top-k re-tempered from the capture temperature ``Tc``
    (``z = log p * Tc / T``, renormalised; the tail class is re-tempered as one token, exact
    at ``T = Tc``), keeping the ``top_k`` largest when ``0 < top_k < K`` (the dropped ones
    join the tail). From a dense or mixture signal: its ``top_k`` ids (``top_k > 0``
    required) with exact log-probabilities and tail at ``temperature``; computed in chunks and
    treated as constant (no gradient reaches a learnable teacher through the top-k path).
    From a mixture with a top-k member: :func:`mixture_support`.
    """
    t = _temperature(temperature)
    check_tail(tail)
    if teacher.topk_ids is not None:
        ids = teacher.topk_ids.astype(mx.int32)
        lp = teacher.topk_logprobs.astype(mx.float32)
        tl = teacher.tail_logmass.astype(mx.float32)
        if 0 < top_k < ids.shape[-1]:
            order = mx.argsort(-lp, axis=-1)
            keep, drop = order[..., :top_k], order[..., top_k:]
            dropped = mx.logsumexp(mx.take_along_axis(lp, drop, axis=-1), axis=-1)
            tl = mx.logaddexp(tl, dropped)
            ids = mx.take_along_axis(ids, keep, axis=-1)
            lp = mx.take_along_axis(lp, keep, axis=-1)
        if tail == "tail-bucket":
            lp = mx.concatenate([lp, tl[..., None]], axis=-1)
        z = lp * (teacher.capture_temperature / t)
        return ids, mx.stop_gradient(stable_log_softmax(z))
    if teacher.members is not None and teacher.is_sparse:
        return mixture_support(teacher, t, tail, top_k, chunk_rows)
    if top_k <= 0:
        raise ValueError("teacher_support from a dense teacher needs top_k > 0")
    logits, tt = (teacher.logits, t) if teacher.logits is not None else (teacher.log_probs(t), 1.0)
    support = support_rows(min(top_k, logits.shape[-1]), tail, tt)
    ids, lp = map_rows(support, [logits], tuple(logits.shape[:-1]), chunk_rows)
    return mx.array(ids.astype(np.int32)), mx.array(lp)


def support_rows(k: int, tail: str, temperature: float) -> Callable[[mx.array], tuple]:
    """``rows [C, V] -> (ids [C, k], log-probs [C, k or k+1])``: the top-k support of dense
    teacher rows at ``temperature``, as :func:`teacher_support` reads it (no gradient)."""
    inv = 1.0 / temperature

    def support(x: mx.array):
        lp_full = stable_log_softmax(mx.stop_gradient(x).astype(mx.float32) * inv)
        ids = topk_sorted(lp_full, k)
        lp = mx.take_along_axis(lp_full, ids, axis=-1)
        if tail == "renormalize":
            return ids, stable_log_softmax(lp)
        rest = (mx.exp(lp_full) * _complement(ids, lp_full.shape)).sum(-1, keepdims=True)
        return ids, mx.concatenate([lp, mx.log(mx.maximum(rest, TINY))], axis=-1)

    return support


def _distinct_support(ids: np.ndarray, vocab: int) -> np.ndarray:
    """``ids`` [rows, S] with every repeat of an id in its row replaced by the smallest ids
    that the row does not hold (so a row's S ids are distinct; needs S < vocab)."""
    rows, size = ids.shape
    order = np.argsort(ids, axis=1, kind="stable")
    ranked = np.take_along_axis(ids, order, axis=1)
    repeat_ranked = np.zeros(ids.shape, bool)
    repeat_ranked[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    repeat = np.empty_like(repeat_ranked)
    np.put_along_axis(repeat, order, repeat_ranked, axis=1)
    if not repeat.any():
        return ids
    # 2S candidates always hold at least S free ids (and V - S >= repeats when 2S > V)
    candidates = min(vocab, 2 * size)
    present = np.zeros((rows, candidates), bool)
    r, c = np.nonzero(ids < candidates)
    present[r, ids[r, c]] = True
    free = np.argsort(present, axis=1, kind="stable")  # free ids first, ascending
    nth = np.cumsum(repeat, axis=1) - 1
    out = ids.copy()
    r, c = np.nonzero(repeat)
    out[r, c] = free[r, nth[r, c]]
    return out


def mixture_support(
    teacher: TeacherSignal,
    temperature: float | mx.array,
    tail: str = "renormalize",
    top_k: int = 0,
    chunk_rows: int | None = None,
) -> tuple[mx.array, mx.array]:
    """``(ids [..., S], log-probs [..., S or S+1])`` of a mixture with top-k members.

    Each member ``m`` is read at ``temperature`` as its top-k ids plus a tail class
    (:func:`teacher_support` with ``tail-bucket``; a dense member contributes its ``top_k``,
    or the largest cached k). A member says nothing about single tokens outside its top-k, so
    its tail mass is spread evenly over them: ``p_m(v) = tail_m / (V - k_m)``. The support is
    the union of the members' ids, padded to ``S = sum k_m`` distinct ids with the smallest
    ids outside it (which get exactly that spread probability, so padding only refines the
    tail), or all ``V`` ids when ``S >= V``. Then ``p(v) = sum_m w_m p_m(v)`` on the support
    and ``sum_m w_m (1 - sum_support p_m)`` for the tail. When every member holds the whole
    vocabulary this is the exact dense mixture. Gradients reach the weights (a learnable
    aggregator), not the members.
    """
    vocab = teacher.vocab_size
    cached = [m.topk_ids.shape[-1] for m in teacher.members if m.topk_ids is not None]
    member_k = top_k if top_k > 0 else max(cached, default=0)
    parts = [
        teacher_support(m, temperature, "tail-bucket", member_k, chunk_rows)
        for m in teacher.members
    ]
    lead = tuple(parts[0][0].shape[:-1])
    member_ids = [np.asarray(i, dtype=np.int64).reshape(-1, i.shape[-1]) for i, _ in parts]
    member_p = [
        np.exp(np.asarray(lp, dtype=np.float64)).reshape(-1, lp.shape[-1]) for _, lp in parts
    ]
    rows = member_ids[0].shape[0]
    size = sum(i.shape[-1] for i in member_ids)
    if size >= vocab:
        ids = np.broadcast_to(np.arange(vocab), (rows, vocab))
    else:
        ids = _distinct_support(np.concatenate(member_ids, axis=-1), vocab)
    step = max(1, (1 << 22) // max(ids.shape[1] * max(i.shape[1] for i in member_ids), 1))
    columns = []
    for m_ids, p in zip(member_ids, member_p):
        k = m_ids.shape[-1]
        spread = p[:, k] / max(vocab - k, 1)
        at = np.repeat(spread[:, None], ids.shape[1], axis=1)
        for start in range(0, rows, step):  # bounded [step, S, k] comparisons
            part = slice(start, start + step)
            hit = ids[part, :, None] == m_ids[part, None, :]
            found = hit.any(-1)
            at[part] = np.where(found, (hit * p[part, None, :k]).sum(-1), at[part])
        columns.append(at)
    member_at = np.stack(columns, axis=-1)  # [rows, S, M]
    outside = np.clip(1.0 - member_at.sum(axis=1), 0.0, 1.0)  # [rows, M]
    count = len(columns)
    weights = teacher.weights.astype(mx.float32)
    if weights.ndim == 2:  # per instance -> per token
        weights = mx.broadcast_to(weights[:, None, :], lead + (count,))
    at_mx = mx.array(member_at.reshape(lead + member_at.shape[1:]).astype(np.float32))
    mixed = (at_mx * weights[..., None, :]).sum(-1)
    log_mixed = mx.log(mx.maximum(mixed, TINY))
    ids_mx = mx.array(ids.reshape(lead + (ids.shape[1],)).astype(np.int32))
    if tail == "renormalize":
        return ids_mx, stable_log_softmax(log_mixed)
    rest = (mx.array(outside.reshape(lead + (count,)).astype(np.float32)) * weights).sum(-1)
    return ids_mx, mx.concatenate([log_mixed, mx.log(mx.maximum(rest, TINY))[..., None]], -1)
