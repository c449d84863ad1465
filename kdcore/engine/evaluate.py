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

from kdcore.losses.tokens import token_cross_entropy

SUMS = ("student_nll", "teacher_nll", "kl", "js", "top1", "top5")


def evaluate(
    student: nn.Module, teacher: nn.Module | None, batches: Iterable[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Token-averaged figures of ``student`` (and ``teacher``, when given) over ``batches``."""
    sums = dict.fromkeys(SUMS, 0.0)
    tokens = 0.0
    for rows in batches:
        ids, labels, mask = (mx.array(rows[k]) for k in ("input_ids", "labels", "mask"))
        s_logits = student(ids).logits.astype(mx.float32)
        sums["student_nll"] += (token_cross_entropy(s_logits, labels) * mask).sum().item()
        tokens += mask.sum().item()
        if teacher is None:
            continue
        t_logits = teacher(ids).logits.astype(mx.float32)
        V = min(t_logits.shape[-1], s_logits.shape[-1])
        sums["teacher_nll"] += (token_cross_entropy(t_logits, labels) * mask).sum().item()
        t_lp = nn.log_softmax(t_logits[..., :V], -1)
        s_lp = nn.log_softmax(s_logits[..., :V], -1)
        t_p, s_p = mx.exp(t_lp), mx.exp(s_lp)
        sums["kl"] += (((t_p * (t_lp - s_lp)).sum(-1)) * mask).sum().item()
        log_m = mx.log(0.5 * (t_p + s_p) + 1e-30)
        js = 0.5 * (t_p * (t_lp - log_m)).sum(-1) + 0.5 * (s_p * (s_lp - log_m)).sum(-1)
        sums["js"] += (js * mask).sum().item()
        agree = (t_lp.argmax(-1) == s_lp.argmax(-1)).astype(mx.float32)
        sums["top1"] += (agree * mask).sum().item()
        k = min(5, V)
        top_s = mx.argpartition(-s_lp, k - 1, axis=-1)[..., :k]
        top_t = mx.argpartition(-t_lp, k - 1, axis=-1)[..., :k]
        overlap = (top_s[..., :, None] == top_t[..., None, :]).sum((-1, -2)) / k
        sums["top5"] += (overlap * mask).sum().item()
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


def eval_teacher(teachers: list) -> nn.Module | None:
    """The teacher model an evaluation compares with: the first teacher, if it has one."""
    return teachers[0].model if teachers and getattr(teachers[0], "model", None) else None
