"""BiLD (Li et al. 2024) and a weighted forward + reverse KL ("bidirectional KL").

BiLD, following the official code (fpcsong/BiLD, ``distil_losses/BILD.py`` and its trainer):
per token, take the top-k logits of one model (the *leader*) and the other model's logits at
the same ids, all ``k (k - 1) / 2`` pairwise differences ``(z_i - z_j) / T`` for ``i < j`` in
the leader's descending order, and ``KL(softmax(teacher differences) || softmax(student
differences))``. The teacher leads in t-LD and the student in s-LD; the loss is
``t-LD + s-LD``, each a masked mean over tokens, with no ``T^2`` factor. Defaults ``k = 8``,
``T = 3``.

The official trainer (``CustomTrainerForDistillation.compute_loss``) also adds, to every loss
it trains with, BiLD included, an "instruction loss": ``KL(p || q)`` at ``T = 1`` over the
full vocabulary on the prompt tokens (label < 0 inside the attention mask), a masked mean
over them, weight 1. The paper does not mention it. ``prompt_kl`` is its weight here: 0 (the
paper's loss) by default, 1 for the official code's total.

``bidirectional_kl`` is a different loss: ``T^2 (w_f KL(p || q) + w_r KL(q || p))`` over the
full vocabulary, the sense in which tutorials say "bidirectional KD".
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import mlx.core as mx
import numpy as np

import kdcore
from kdcore import validators

# ---------------------------------------------------------------- BiLD mathematics


def pair_matrix(k: int) -> mx.array:
    """``D`` [k, P] with ``(x @ D)[p] = x_i - x_j`` for the p-th pair ``i < j`` (row-major,
    the order of ``torch.triu_indices(k, k, offset=1)``)."""
    i, j = np.triu_indices(k, 1)
    d = np.zeros((k, len(i)), np.float32)
    d[i, np.arange(len(i))] = 1.0
    d[j, np.arange(len(i))] = -1.0
    return mx.array(d)


def _ld_kl(teacher: mx.array, student: mx.array, d: mx.array, inv_t: float):
    """KL between the softmaxes of pairwise differences, and its gradient wrt ``student``."""
    lt = kdcore.log_softmax((teacher @ d) * inv_t)
    ls = kdcore.log_softmax((student @ d) * inv_t)
    pt = mx.exp(lt)
    value = mx.where(pt > 0, pt * (lt - ls), 0.0).sum(-1)
    grad = ((mx.exp(ls) - pt) @ d.T) * inv_t
    return value, grad


def _topk_sorted(z: mx.array, k: int) -> mx.array:
    """Ids of the ``k`` largest entries per row, largest first (no gradient)."""
    z = mx.stop_gradient(z)
    ids = mx.argpartition(-z, kth=k - 1, axis=-1)[..., :k]
    order = mx.argsort(-mx.take_along_axis(z, ids, axis=-1), axis=-1)
    return mx.take_along_axis(ids, order, axis=-1)


def bild_rows(k: int, temperature: float, sparse: bool):
    """Row function for ``testing.chunked_token_mean``.

    Dense teacher arrays: ``(t [C, V],)``. Sparse: ``(ids [C, K'], z [C, K'], z_rest [C])``
    with ``z`` teacher logits up to a per-row constant and ``z_rest`` the value assumed for
    tokens outside the cache.
    """
    d = pair_matrix(k)
    inv_t = 1.0 / temperature

    def rows(scale: mx.array, s: mx.array, *teacher: mx.array):
        zs = s.astype(mx.float32)
        n = zs.shape[0]
        if sparse:
            cache_ids, cache_z, rest = teacher
            order = mx.argsort(-mx.stop_gradient(cache_z), axis=-1)[:, :k]
            ids_t = mx.take_along_axis(cache_ids, order, axis=-1)
            t_lead = mx.take_along_axis(cache_z, order, axis=-1)
        else:
            zt = teacher[0].astype(mx.float32)
            ids_t = _topk_sorted(zt, k)
            t_lead = mx.take_along_axis(zt, ids_t, axis=-1)
        s_follow = mx.take_along_axis(zs, ids_t, axis=-1)
        ids_s = _topk_sorted(zs, k)
        s_lead = mx.take_along_axis(zs, ids_s, axis=-1)
        if sparse:
            match = ids_s[:, :, None] == cache_ids[:, None, :]
            found = mx.where(match, cache_z[:, None, :], 0.0).sum(-1)
            t_follow = mx.where(match.any(-1), found, rest[:, None])
        else:
            t_follow = mx.take_along_axis(zt, ids_s, axis=-1)
        v_t, g_t = _ld_kl(t_lead, s_follow, d, inv_t)
        v_s, g_s = _ld_kl(t_follow, s_lead, d, inv_t)
        r = mx.arange(n)[:, None]
        grad = mx.zeros(zs.shape, mx.float32).at[r, ids_t].add(g_t * scale)
        grad = grad.at[r, ids_s].add(g_s * scale)
        return v_t + v_s, grad

    return rows


def plain_bild_rows(
    student_logits: mx.array, teacher_logits: mx.array, k: int = 8, temperature: float = 3.0
) -> mx.array:
    """Per-token ``t-LD + s-LD`` from whole arrays: a transcription of the official
    ``bild_loss`` (sorted top-k over the full vocabulary, pair indices, autodiff)."""
    zs = student_logits.astype(mx.float32)
    zt = teacher_logits.astype(mx.float32)
    k = min(k, zs.shape[-1])
    i, j = (mx.array(x) for x in np.triu_indices(k, 1))

    def ld(t_sel, s_sel):
        lt = kdcore.log_softmax((t_sel[..., i] - t_sel[..., j]) / temperature)
        ls = kdcore.log_softmax((s_sel[..., i] - s_sel[..., j]) / temperature)
        return (mx.exp(lt) * (lt - ls)).sum(-1)

    take = mx.take_along_axis
    ids_t = mx.stop_gradient(mx.argsort(-zt, axis=-1)[..., :k])
    ids_s = mx.stop_gradient(mx.argsort(-zs, axis=-1)[..., :k])
    t_ld = ld(take(zt, ids_t, -1), take(zs, ids_t, -1))
    s_ld = ld(take(zt, ids_s, -1), take(zs, ids_s, -1))
    return t_ld + s_ld


def plain_bild(
    student_logits: mx.array,
    teacher_logits: mx.array,
    mask: mx.array,
    k: int = 8,
    temperature: float = 3.0,
) -> mx.array:
    """The straightforward formulation of :func:`bild_divergence` for a dense teacher."""
    rows = plain_bild_rows(student_logits, teacher_logits, k, float(temperature))
    return kdcore.masked_mean(rows, mask)


def _sparse_teacher(teacher: kdcore.TeacherSignal, k: int):
    cached = teacher.topk_ids.shape[-1]
    if cached < k:
        raise ValueError(
            f"bild with top_k = {k} needs a teacher cache with k >= {k}; this one has {cached} "
            "(lower bild's top_k or re-cache with a larger --top-k)"
        )
    lp = teacher.topk_logprobs.astype(mx.float32)
    tc = teacher.capture_temperature
    outside = teacher.vocab_size - cached
    # Tokens outside the cache: the tail mass spread evenly, capped by the smallest cached
    # probability (an outside token cannot beat a cached one).
    if outside > 0:
        spread = teacher.tail_logmass.astype(mx.float32) - math.log(outside)
        rest = mx.minimum(spread, lp.min(-1))
    else:
        rest = lp.min(-1)
    return [teacher.topk_ids.astype(mx.int32), lp * tc, rest * tc]


def _no_pairs(scale: mx.array, s: mx.array, *teacher: mx.array):
    return mx.zeros(s.shape[:1], mx.float32), mx.zeros(s.shape, mx.float32)


def ld_rows(teacher: kdcore.TeacherSignal, k: int = 8, temperature: float = 3.0) -> kdcore.Rows:
    """The :class:`kdcore.Rows` of BiLD's ``t-LD + s-LD`` against any teacher signal.

    A dense teacher is read per chunk; a mixture through its ``log_probs`` (pairwise
    differences do not see a row's constant); from a top-k cache (k <= cached k) t-LD is
    exact (logit differences are log-probability differences times the capture
    temperature), and in s-LD a student top-k token missing from the cache gets the teacher
    value ``min(log(tail / (V - K')), min cached log p)``. ``k < 2``: no pairs, 0.
    """
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = min(int(k), teacher.vocab_size)
    if k < 2:
        return kdcore.Rows(_no_pairs, (), name="ld")
    if teacher.topk_ids is not None:
        names = ("ids", "z", "rest")
        arrays = dict(zip(names, _sparse_teacher(teacher, k)))
        return kdcore.Rows(bild_rows(k, temperature, True), names, extras=arrays, name="ld")
    if teacher.is_dense:
        return kdcore.Rows(bild_rows(k, temperature, False), name="ld")
    log_probs = {"log_probs": teacher.log_probs(1.0)}
    return kdcore.Rows(
        bild_rows(k, temperature, False), ("log_probs",), extras=log_probs, name="ld"
    )


def bild_divergence(
    student_logits: mx.array,
    teacher: kdcore.TeacherSignal | mx.array,
    mask: mx.array,
    k: int = 8,
    temperature: float = 3.0,
) -> mx.array:
    """BiLD ``t-LD + s-LD``, masked mean over tokens (:func:`ld_rows` on full logits)."""
    if isinstance(teacher, mx.array):
        teacher = kdcore.TeacherSignal(vocab_size=teacher.shape[-1], logits=teacher)
    inputs = kdcore.LossInputs(
        student=kdcore.ModelOutput(logits=student_logits), teacher=teacher, batch={"mask": mask}
    )
    return kdcore.RowLoss(lambda _: ld_rows(teacher, k, temperature))(inputs)[0]


# ---------------------------------------------------------------- components


@attrs.define
class BildConfig:
    """``top_k`` logits per leader (k(k-1)/2 pairs) at ``temperature`` (schedulable);
    ``prompt_kl``: weight of the official code's prompt-token KL (schedulable, 0 = off)."""

    top_k: int = attrs.field(default=8, validator=validators.at_least(1))
    temperature: float = attrs.field(default=3.0, validator=validators.positive)
    prompt_kl: float = attrs.field(default=0.0, validator=validators.non_negative)


def prompt_positions(mask: mx.array) -> mx.array:
    """1.0 on the positions before each row's first loss position: the prompt tokens of a
    prompt/response row (the batch has no attention mask; padding follows the response)."""
    return (mx.cumsum(mask.astype(mx.float32), axis=-1) == 0).astype(mx.float32)


def bild(config: BildConfig, setup=None):
    """BiLD loss: t-LD + s-LD over top-k logit differences.

    With ``prompt_kl = w > 0``, plus ``w * KL(p || q)`` at T = 1 on the prompt tokens (the
    positions before a row's first loss position), masked mean over them: the instruction
    loss that the official trainer (fpcsong/BiLD, ``CustomTrainerForDistillation``) adds to
    every distillation loss with w = 1, not in the paper. It reads positions outside the
    loss mask by design; the metrics then log ``ld`` and ``prompt_kl``."""

    def rows(inputs: kdcore.LossInputs):
        params = inputs.params
        ld = ld_rows(inputs.teacher, params.top_k, float(params.temperature))
        weight = params.prompt_kl
        if not isinstance(weight, mx.array) and not weight:
            return attrs.evolve(ld, name=None)
        prompt = kdcore.teacher_rows(
            inputs.teacher,
            "forward_kl",
            weight=weight,
            mask=prompt_positions(inputs.batch["mask"]),
            name="prompt_kl",
        )
        return [ld, prompt]

    return kdcore.RowLoss(rows)


@attrs.define
class BidirectionalConfig:
    """``T^2 (forward_weight KL(p||q) + reverse_weight KL(q||p))``; weights schedulable."""

    temperature: float = attrs.field(default=2.0, validator=validators.positive)
    forward_weight: float = attrs.field(default=0.5, validator=validators.non_negative)
    reverse_weight: float = attrs.field(default=0.5, validator=validators.non_negative)
    tail: Literal["renormalize", "tail-bucket"] = "renormalize"


def bidirectional_kl(config: BidirectionalConfig, setup=None):
    """Weighted forward plus reverse KL times T^2; logs both KLs."""

    def rows(inputs: kdcore.LossInputs):
        params = inputs.params
        temperature = float(params.temperature)
        return [
            kdcore.teacher_rows(
                inputs.teacher,
                kind,
                temperature=temperature,
                tail=params.tail,
                weight=weight * temperature * temperature,
                name=kind,
            )
            for kind, weight in (
                ("forward_kl", params.forward_weight),
                ("reverse_kl", params.reverse_weight),
            )
        ]

    return kdcore.RowLoss(rows)
