"""The one evaluation: student (and teacher) on held-out batches, the same figures for the
run's own eval records and for ``kd eval``.

Every figure is a mean over the same loss tokens (``tokens``): the student's and teacher's
cross-entropy (``val_loss``, ``teacher_val_loss``, nats per token) and perplexity,
KL(teacher || student), Jensen-Shannon divergence, top-1 agreement and top-5 overlap, and
the perplexity retention teacher / student (1.0: the student matches the teacher).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from kdcore.kernels.chunked import default_chunk_rows
from kdcore.losses.tokens import IGNORE_INDEX

SUMS = ("student_nll", "teacher_nll", "kl", "js", "top1", "top5")


def _rows(out) -> tuple[mx.array, object]:
    """``(rows [N, D], head)`` of a model output, or ``(logits [N, V], None)``."""
    if not out.has_logits and out.final_hidden is not None:
        hidden = out.final_hidden
        return hidden.reshape(-1, hidden.shape[-1]), out.head
    logits = out.logits
    return logits.reshape(-1, logits.shape[-1]), None


def _logits(rows: mx.array, head, part: slice) -> mx.array:
    chunk = rows[part]
    return (chunk if head is None else head(chunk)).astype(mx.float32)


def evaluate(
    student: nn.Module, teacher: nn.Module | None, batches: Iterable[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Token-averaged figures of ``student`` (and ``teacher``, when given) over ``batches``.

    Only the loss positions go through the heads, a chunk of tokens at a time from each
    model's hidden states (when the model gives them), so evaluation holds ``[chunk, V]``,
    not ``[tokens, V]``, at a 150k vocabulary too; positions outside the mask cost
    nothing (a chat record's prompt, padding)."""
    sums = dict.fromkeys(SUMS, 0.0)
    tokens = 0.0
    for batch in batches:
        weights = np.asarray(batch["mask"], np.float32).reshape(-1)
        keep = mx.array(np.flatnonzero(weights))
        tokens += float(weights.sum())
        if keep.size == 0:
            continue
        ids = mx.array(batch["input_ids"])
        labels = mx.array(np.asarray(batch["labels"]).reshape(-1))[keep]
        mask = mx.array(weights)[keep]
        s_rows, s_head = _rows(student(ids))
        t_rows, t_head = _rows(teacher(ids)) if teacher is not None else (None, None)
        s_rows = s_rows[keep]
        t_rows = t_rows[keep] if t_rows is not None else None
        vocab = s_rows.shape[-1] if s_head is None else s_head(s_rows[:1]).shape[-1]
        size = default_chunk_rows(vocab)
        for start in range(0, s_rows.shape[0], size):
            part = slice(start, start + size)
            _add_chunk(sums, s_rows, s_head, t_rows, t_head, labels[part], mask[part], part)
    count = max(tokens, 1.0)
    result = {"tokens": int(tokens), "val_loss": sums["student_nll"] / count}
    result["val_ppl"] = math.exp(min(result["val_loss"], 50))
    if teacher is not None:
        result["teacher_val_loss"] = sums["teacher_nll"] / count
        result["teacher_val_ppl"] = math.exp(min(result["teacher_val_loss"], 50))
        result["kl_teacher_student"] = sums["kl"] / count
        result["js"] = sums["js"] / count
        result["top1_agreement"] = sums["top1"] / count
        result["top5_overlap"] = sums["top5"] / count
        result["quality_retention"] = result["teacher_val_ppl"] / result["val_ppl"]
    return result


def _log_softmax(logits: mx.array) -> mx.array:
    # relative to the row maximum, as token_cross_entropy does (logits near 1e4 stay exact)
    z = logits - logits.max(-1, keepdims=True)
    return z - mx.logsumexp(z, axis=-1, keepdims=True)


def _nll(log_probs: mx.array, labels: mx.array) -> mx.array:
    safe = mx.where(labels == IGNORE_INDEX, 0, labels)
    picked = mx.take_along_axis(log_probs, safe[:, None], axis=-1)[:, 0]
    return mx.where(labels == IGNORE_INDEX, 0.0, -picked)


def _add_chunk(sums, s_rows, s_head, t_rows, t_head, labels, mask, part) -> None:
    # each exp/log pass over [chunk, V] is scalar, single-threaded work on a CPU: the
    # cross-entropies reuse the log-softmax rather than taking their own logsumexp
    s_logits = _logits(s_rows, s_head, part)
    s_all = _log_softmax(s_logits)
    figures = {"student_nll": (_nll(s_all, labels) * mask).sum()}
    if t_rows is not None:
        t_logits = _logits(t_rows, t_head, part)
        t_all = _log_softmax(t_logits)
        figures["teacher_nll"] = (_nll(t_all, labels) * mask).sum()
        V = min(t_logits.shape[-1], s_logits.shape[-1])
        t_lp = t_all if t_all.shape[-1] == V else _log_softmax(t_logits[..., :V])
        s_lp = s_all if s_all.shape[-1] == V else _log_softmax(s_logits[..., :V])
        t_p, s_p = mx.exp(t_lp), mx.exp(s_lp)
        figures["kl"] = (((t_p * (t_lp - s_lp)).sum(-1)) * mask).sum()
        log_m = mx.log(0.5 * (t_p + s_p) + 1e-30)
        js = 0.5 * (t_p * (t_lp - log_m)).sum(-1) + 0.5 * (s_p * (s_lp - log_m)).sum(-1)
        figures["js"] = (js * mask).sum()
        agree = (t_lp.argmax(-1) == s_lp.argmax(-1)).astype(mx.float32)
        figures["top1"] = (agree * mask).sum()
        k = min(5, V)
        top_s = mx.argpartition(-s_lp, k - 1, axis=-1)[..., :k]
        top_t = mx.argpartition(-t_lp, k - 1, axis=-1)[..., :k]
        overlap = (top_s[..., :, None] == top_t[..., None, :]).sum((-1, -2)) / k
        figures["top5"] = (overlap * mask).sum()
    mx.eval(figures)
    for key, value in figures.items():
        sums[key] += value.item()


def eval_teacher(teachers: list) -> nn.Module | None:
    """The teacher model an evaluation compares with: the first teacher, if it has one."""
    return teachers[0].model if teachers and getattr(teachers[0], "model", None) else None
