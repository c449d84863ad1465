"""Rationale losses: ``cot`` and ``step_by_step``.

``cot`` distils a teacher's token distributions on rationale text, weighting reasoning and
answer positions separately (the answer is a few tokens among many; averaged together with
the rationale its signal would be diluted)::

    KL_r = mean over reasoning positions of  sum_v p_T(v) (log p_T(v) - log q_T(v))
    KL_a = the same mean over answer positions
    L    = T^2 (w_r KL_r + w_a KL_a) + w_ce CE

with ``p_T``, ``q_T`` the teacher's and student's softmax at temperature ``T`` and ``CE`` the
hard-label cross-entropy over every loss position (``mask``). From a top-k teacher cache the
KL runs over the teacher's top-k, renormalised, against the student's full softmax.

``step_by_step`` is distilling step-by-step (Hsieh et al. 2023): one student learns a label
task ("predict: question -> answer") and a rationale task ("explain: question -> rationale")
from the same records, following the official code's weighting::

    L = alpha CE_predict + (1 - alpha) CE_explain

where ``CE_predict`` is the token-averaged cross-entropy over the rows whose ``task`` is
``predict_task`` and ``CE_explain`` over the rows of ``explain_task`` (the ``rationale``
dataset with ``templates = ["predict", "explain"]`` provides both rows of every record in
each batch).
"""

from __future__ import annotations

import attrs
import mlx.core as mx

from kdcore import (
    LossInputs,
    log_softmax,
    masked_mean,
    teacher_support,
    token_cross_entropy,
    validators,
)

# ---------------------------------------------------------------- cot


@attrs.define
class CotConfig:
    temperature: float = 1.0
    reasoning_weight: float = 1.0
    answer_weight: float = 1.0
    ce_weight: float = 1.0
    tail: str = attrs.field(default="renormalize")  # top-k caches: renormalize | tail-bucket

    @tail.validator
    def _tail(self, _attribute, value):
        if value not in ("renormalize", "tail-bucket"):
            raise ValueError(f"tail must be 'renormalize' or 'tail-bucket', got {value!r}")


def _masks(batch: dict) -> tuple[mx.array, mx.array, mx.array]:
    try:
        mask = batch["mask"]
        reasoning = batch["reasoning_mask"] * mask
        answer = batch["answer_mask"] * mask
    except KeyError as exc:
        raise KeyError(
            f"the batch has no {exc.args[0]!r}: use the 'rationale' (or 'gsm8k') dataset, "
            "which provides reasoning_mask and answer_mask"
        ) from None
    return mask, reasoning, answer


def token_kl(student_logits: mx.array, teacher, temperature, tail: str) -> mx.array:
    """KL(p_T || q_T) per position [B, L], summed over the vocabulary, float32."""
    log_q = log_softmax(student_logits, temperature)
    if teacher.is_sparse:
        ids, log_p = teacher_support(teacher, temperature, tail)
        if tail == "tail-bucket":
            picked = mx.take_along_axis(log_q, ids, axis=-1)
            # The student's mass outside the teacher's top-k, as the (k+1)-th class.
            rest = mx.log(mx.maximum(1.0 - mx.exp(picked).sum(-1, keepdims=True), 1e-30))
            log_q_sel = mx.concatenate([picked, rest], axis=-1)
        else:
            log_q_sel = mx.take_along_axis(log_q, ids, axis=-1)
        p = mx.exp(log_p)
        return (p * (log_p - log_q_sel)).sum(-1)
    log_p = teacher.log_probs(temperature)
    V = min(log_p.shape[-1], log_q.shape[-1])
    log_p, log_q = log_p[..., :V], log_q[..., :V]
    p = mx.exp(log_p)
    # p log p is 0 where p underflows to 0; where() keeps 0 * -inf from making NaN.
    return mx.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def cot_loss(config: CotConfig, setup=None):
    """T^2 (w_r KL_reasoning + w_a KL_answer) + w_ce CE; KL(teacher || student) per token,
    each term a masked mean over its own positions."""

    def loss(inputs: LossInputs):
        params = inputs.params
        T = params.temperature
        mask, reasoning, answer = _masks(inputs.batch)
        logits = inputs.student.logits
        kl = token_kl(logits, inputs.teacher, T, params.tail)
        kl_r = masked_mean(kl, reasoning)
        kl_a = masked_mean(kl, answer)
        ce = masked_mean(token_cross_entropy(logits, inputs.batch["labels"]), mask)
        total = (T * T) * (params.reasoning_weight * kl_r + params.answer_weight * kl_a)
        total = total + params.ce_weight * ce
        return total, {"kl_reasoning": kl_r, "kl_answer": kl_a, "ce": ce}

    return loss


# ---------------------------------------------------------------- step_by_step


@attrs.define
class StepByStepConfig:
    alpha: float = attrs.field(default=0.5, validator=validators.unit_interval)
    predict_task: int = 0
    explain_task: int = 1


def step_by_step_loss(config: StepByStepConfig, setup=None):
    """alpha CE(predict rows) + (1 - alpha) CE(explain rows); rows told apart by ``task``."""
    if config.predict_task == config.explain_task:
        raise ValueError("predict_task and explain_task must differ")

    def loss(inputs: LossInputs):
        params = inputs.params
        batch = inputs.batch
        if "task" not in batch:
            raise KeyError(
                "step_by_step needs a 'task' array in the batch: use the 'rationale' dataset "
                'with templates = ["predict", "explain"]'
            )
        mask = batch["mask"]
        task = batch["task"].reshape(-1, 1)
        ce = token_cross_entropy(inputs.student.logits, batch["labels"])
        ce_predict = masked_mean(ce, mask * (task == config.predict_task))
        ce_explain = masked_mean(ce, mask * (task == config.explain_task))
        alpha = params.alpha
        total = alpha * ce_predict + (1.0 - alpha) * ce_explain
        return total, {"ce_predict": ce_predict, "ce_explain": ce_explain}

    return loss
