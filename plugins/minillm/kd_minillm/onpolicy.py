"""On-policy distillation as in MiniLLM (Gu et al., 2024; official code microsoft/LMOps, minillm/).

The student q minimises the sequence-level reverse KL to the teacher p on its own samples,

    L(q) = KL(q || p) = E_{y ~ q} [ sum_t log q(y_t | y_<t, x) - log p(y_t | y_<t, x) ].

Per sampled token the reward is ``r_t = log p(y_t | .) - log q_T(y_t | .)`` (no gradient;
p at temperature 1, q at the sampling temperature T, as in the official code), divided by
``reward_scaling`` and clipped to ``+/- reward_clip``. The policy gradient splits into

    single-step  (exact over the vocabulary)  reg = sum_v q_T(v) [log q_T(v) - log p_T(v)]
    long-term    (sampled)                    pg  = -A_t * rho_t

where the advantage ``A_t`` is the return normalised by the remaining length,

    returns_from = "next"    (the paper, Eq. 5):  A_t = sum_{t'>t}  g^(t'-t-1) r_t' / #{t' > t}
    returns_from = "current" (official code):     A_t = sum_{t'>=t} g^(t'-t)   r_t' / #{t' >= t}

optionally whitened over the batch's sampled tokens, and ``rho_t = w_t q/stop_grad(q)`` with
the importance weight ``w_t = q_T(y_t) / b(y_t)`` of the behaviour distribution b the token
was drawn from: ``b = (1 - alpha) q~ + alpha p~`` (teacher-mixed sampling; ``q~, p~`` are the
top-p filtered student and teacher at T). As in the official PPO-style loss, the per-token
term is ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))``, so a token whose weight lies
outside ``[1 - eps, 1 + eps]`` on the side that would grow the update gives no gradient.
With ``returns_from = "next"``, no whitening, g = 1 and no length normalisation, the
expected gradient of ``pg + reg`` is exactly the gradient of the sequence reverse KL divided
by the mean sample length (tokens are averaged); ``tests/test_onpolicy.py`` checks this.

Batches. ``prepare_batch`` draws ``u ~ U[0, 1)`` from the run's random state; when
``u < lmbda`` (schedulable, as in TRL's GKD) the batch is on-policy: the first
``prompt_length`` tokens of each row are continued by the student (``max_new_tokens``,
``temperature``, ``top_p``, teacher mixing ``teacher_mix_alpha``; ``kdcore.sample_continuations``,
the core's on-policy sampler: eval mode, the run's MLX random state), and the sampled rows are
appended below the data rows, as the official trainer concatenates its PPO and LM batches
into one forward. Data rows keep ``labels``/``mask`` (so ``ce`` and other losses see only the
data); sample rows carry ``sample_targets``, ``sample_mask`` and ``sample_weights`` and have
``mask`` 0. The loss is then ``pg_weight * pg + reg_weight * reg + lm_weight * CE(data)``.

Otherwise the batch is off-policy (the dataset's tokens, teacher-forced) and the loss is
``reg_weight * KL(q_T || p_T) + lm_weight * CE``, both masked means over the data tokens:
GKD's supervised branch with MiniLLM's divergence.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs
import mlx.core as mx

from kdcore import (
    IGNORE_INDEX,
    Component,
    LossInputs,
    RowLoss,
    Rows,
    StepContext,
    cross_entropy_rows,
    log_softmax,
    masked_mean,
    teacher_rows,
    token_cross_entropy,
    value_at,
)

SAMPLE_TARGETS = "sample_targets"
SAMPLE_MASK = "sample_mask"
SAMPLE_WEIGHTS = "sample_weights"


def _in_range(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """Validator for a float that may also be a schedule (checked only when a number)."""

    def check(_instance, attribute, value):
        if not isinstance(value, (int, float)):
            return
        bad_low = value <= low if low_open else value < low
        bad_high = value >= high if high_open else value > high
        if bad_low or bad_high:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise ValueError(f"{attribute.name} must be in {lo}{low}, {high}{hi}, got {value}")

    return check


def _at_least_one(_instance, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.define
class MiniLLMConfig:
    """Defaults follow the official MiniLLM scripts (gamma 0.95, clip 0.2, reward scaling
    0.5 and clip 100, T = 1, top-p 1, whitened advantages), except where noted."""

    lmbda: float = attrs.field(default=1.0, validator=_in_range(0.0, 1.0))
    # The first prompt_length tokens of each data row are the prompt (fixed length: the
    # built-in models have no padding mask, so prompts cannot be left-padded).
    prompt_length: int = attrs.field(default=16, validator=_at_least_one)
    max_new_tokens: int = attrs.field(default=32, validator=_at_least_one)
    temperature: float = attrs.field(default=1.0, validator=_in_range(0.0, math.inf, low_open=True))
    top_p: float = attrs.field(default=1.0, validator=_in_range(0.0, 1.0, low_open=True))
    stop_token: int | None = None
    # Official scripts use 0.2; 0 here so that a run without it is plain on-policy sampling.
    teacher_mix_alpha: float = attrs.field(
        default=0.0, validator=_in_range(0.0, 1.0, high_open=True)
    )
    cliprange: float = attrs.field(default=0.2, validator=_in_range(0.0, 1.0))
    gamma: float = attrs.field(default=0.95, validator=_in_range(0.0, 1.0))
    length_norm: bool = True
    # "next" is the paper's decomposition (unbiased with the single-step term); the official
    # code's returns include r_t ("current") and it still adds the single-step term.
    returns_from: Literal["next", "current"] = "next"
    # Over the batch's sampled tokens (the official code whitens over padding too).
    whiten: bool = True
    reward_scaling: float = attrs.field(
        default=0.5, validator=_in_range(0.0, math.inf, low_open=True)
    )
    reward_clip: float = attrs.field(
        default=100.0, validator=_in_range(0.0, math.inf, low_open=True)
    )
    pg_weight: float = 1.0
    reg_weight: float = 1.0
    # Official scripts add the LM loss with weight 1; here add `ce` to the spec, or set this.
    lm_weight: float = 0.0


# ---------------------------------------------------------------- pieces of the maths


def token_log_probs(log_probs: mx.array, targets: mx.array) -> mx.array:
    """``log_probs[b, t, targets[b, t]]`` [B, L]; 0 where the target is ``IGNORE_INDEX``."""
    safe = mx.where(targets == IGNORE_INDEX, 0, targets)
    picked = mx.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return mx.where(targets == IGNORE_INDEX, 0.0, picked)


def reverse_kl(log_q: mx.array, log_p: mx.array) -> mx.array:
    """Per-token ``KL(q || p) = sum_v q(v) (log q(v) - log p(v))`` [B, L]."""
    return (mx.exp(log_q) * (log_q - log_p)).sum(-1)


def normalised_returns(
    rewards: mx.array,
    mask: mx.array,
    gamma: float | mx.array = 1.0,
    length_norm: bool = True,
    returns_from: str = "next",
) -> mx.array:
    """Discounted reward-to-go per token [B, L], divided by the number of sampled tokens it sums.

    ``"current"``: ``R_t = sum_{t' >= t} g^(t'-t) r_t' m_t'``, count ``#{t' >= t: m_t'}``;
    ``"next"``: ``R_t = sum_{t' > t} g^(t'-t-1) r_t' m_t'``, count ``#{t' > t: m_t'}``.
    A zero count divides by 1 (its sum is 0). Zero where ``mask`` is 0.
    """
    length = rewards.shape[1]
    pos = mx.arange(length)
    gap = pos[None, :] - pos[:, None]  # [t, t'] = t' - t
    if returns_from not in ("current", "next"):
        raise ValueError(f"returns_from must be 'current' or 'next', got {returns_from!r}")
    offset = 0 if returns_from == "current" else 1
    ahead = gap >= offset
    discount = mx.where(ahead, mx.power(gamma, mx.maximum(gap - offset, 0).astype(mx.float32)), 0.0)
    mask = mask.astype(mx.float32)
    returns = (rewards.astype(mx.float32) * mask) @ discount.T
    if length_norm:
        counts = mask @ ahead.astype(mx.float32).T
        returns = returns / mx.maximum(counts, 1.0)
    return returns * mask


def whiten(values: mx.array, mask: mx.array, eps: float = 1e-8) -> mx.array:
    """``(x - mean) / sqrt(var + eps)`` with mean and (population) variance over mask == 1."""
    mask = mask.astype(mx.float32)
    n = mx.maximum(mask.sum(), 1.0)
    mean = (values * mask).sum() / n
    var = (((values - mean) * mask) ** 2).sum() / n
    return (values - mean) * mx.rsqrt(var + eps) * mask


def clipped_surrogate(
    log_q: mx.array, advantages: mx.array, weights: mx.array, cliprange: float | mx.array
) -> mx.array:
    """Per-token ``max(-A rho, -A clip(rho, 1-eps, 1+eps))``, ``rho = w exp(log q - sg(log q))``.

    Its value is ``-A w`` (or the clipped one); its gradient ``-A w grad log q`` where the
    unclipped branch is the larger, else 0.
    """
    ratio = mx.exp(log_q - mx.stop_gradient(log_q)) * weights
    plain = -advantages * ratio
    clipped = -advantages * mx.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return mx.maximum(plain, clipped)


# ---------------------------------------------------------------- the sampled rows


def _pad(array: mx.array, length: int, value: float | int) -> mx.array:
    extra = length - array.shape[1]
    if extra <= 0:
        return array
    widths = [(0, 0), (0, extra)] + [(0, 0)] * (array.ndim - 2)
    return mx.pad(array, widths, constant_values=value)


def append_samples(
    batch: dict[str, mx.array], tokens: mx.array, gen_mask: mx.array, weights: mx.array
) -> dict[str, mx.array]:
    """The data rows, then one sampled row per data row, padded to a common length.

    Sample row: ``input_ids = tokens[:, :-1]``, ``sample_targets = tokens[:, 1:]`` where
    generated (else ``IGNORE_INDEX``), ``sample_mask``/``sample_weights`` shifted alike,
    ``labels`` ignored and ``mask`` 0. Data rows get ``sample_mask`` 0. Other arrays with a
    leading batch axis get zero rows for the samples (zero masks leave other losses alone).
    """
    data_rows, data_len = batch["input_ids"].shape
    sample_len = tokens.shape[1] - 1
    length = max(data_len, sample_len)
    target_mask = gen_mask[:, 1:]
    sample = {
        "input_ids": tokens[:, :-1].astype(batch["input_ids"].dtype),
        "labels": mx.full((data_rows, sample_len), IGNORE_INDEX, dtype=mx.int32),
        "mask": mx.zeros((data_rows, sample_len), dtype=mx.float32),
        SAMPLE_TARGETS: mx.where(target_mask > 0, tokens[:, 1:], IGNORE_INDEX).astype(mx.int32),
        SAMPLE_MASK: target_mask,
        SAMPLE_WEIGHTS: weights[:, 1:],
    }
    data = {
        "input_ids": batch["input_ids"],
        "labels": batch["labels"].astype(mx.int32),
        "mask": batch["mask"].astype(mx.float32),
        SAMPLE_TARGETS: mx.full((data_rows, data_len), IGNORE_INDEX, dtype=mx.int32),
        SAMPLE_MASK: mx.zeros((data_rows, data_len), dtype=mx.float32),
        SAMPLE_WEIGHTS: mx.ones((data_rows, data_len), dtype=mx.float32),
    }
    fill = {"input_ids": 0, "labels": IGNORE_INDEX, SAMPLE_TARGETS: IGNORE_INDEX, SAMPLE_WEIGHTS: 1}
    out = {
        key: mx.concatenate(
            [_pad(data[key], length, fill.get(key, 0)), _pad(sample[key], length, fill.get(key, 0))]
        )
        for key in data
    }
    for key, value in batch.items():
        if key in out or value.ndim == 0 or value.shape[0] != data_rows:
            continue
        if value.ndim >= 2 and value.shape[1] == data_len:
            value = _pad(value, length, 0)
        out[key] = mx.concatenate([value, mx.zeros_like(value)])
    return out


# ---------------------------------------------------------------- the loss


class MiniLLM:
    """On-policy batch (probability ``lmbda``): ``pg_weight * pg + reg_weight * reg +
    lm_weight * CE(data)`` with ``r_t = log p(y_t) - log q_T(y_t)`` on student samples,
    ``pg = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps))`` (``A_t``: reward-to-go
    normalised by remaining length, whitened; ``rho_t``: importance weight x q/sg(q)) and
    ``reg = mean_t KL(q_T || p_T)``. Off-policy batch: ``reg_weight * KL(q_T || p_T) +
    lm_weight * CE`` on the data tokens. Details in the module docstring."""

    def __init__(self, config: MiniLLMConfig, setup: Any = None):
        self.config = config

    # Called by the engine outside autodiff, before the teachers and the student run.
    def prepare_batch(
        self, batch: dict[str, mx.array], context: StepContext
    ) -> dict[str, mx.array]:
        if SAMPLE_MASK in batch:  # another loss already sampled this batch
            return batch
        config, step, total = self.config, context.step, context.total_steps
        lmbda = value_at(config.lmbda, step, total)
        draw = mx.random.uniform().item()  # always drawn, so the random stream is lmbda-free
        if draw >= lmbda:
            return batch
        temperature = value_at(config.temperature, step, total)
        top_p = value_at(config.top_p, step, total)
        alpha = value_at(config.teacher_mix_alpha, step, total)
        prompts = batch["input_ids"][:, : config.prompt_length]
        # the core's on-policy sampler (train.on_policy's), with the importance weights
        tokens, gen_mask, weights = context.sample_continuations(
            prompts,
            config.max_new_tokens,
            temperature,
            top_p,
            config.stop_token,
            teacher_mix_alpha=alpha,
        )
        return append_samples(batch, tokens, gen_mask, weights)

    def rows(self, inputs: LossInputs) -> list[Rows] | None:
        """Off-policy batches are rows: ``reg_weight * KL(q_T || p_T) + lm_weight * CE``;
        on-policy ones (the policy gradient over sampled tokens) are not (None)."""
        if SAMPLE_MASK in inputs.batch:
            return None
        p = inputs.params
        reg = teacher_rows(inputs.teacher, "reverse_kl", temperature=float(p.temperature))
        return [
            attrs.evolve(
                reg, weight=p.reg_weight, name="reg", metrics={"on_policy": mx.array(0.0)}
            ),
            attrs.evolve(cross_entropy_rows(), weight=p.lm_weight, name="lm"),
        ]

    def __call__(self, inputs: LossInputs) -> tuple[mx.array, dict[str, mx.array]]:
        """The on-policy loss (the engine calls it where :meth:`rows` gives None)."""
        if SAMPLE_MASK not in inputs.batch:
            return RowLoss(self.rows)(inputs)
        p = inputs.params
        batch = inputs.batch
        logits = inputs.student.logits
        log_q = log_softmax(logits, p.temperature)
        log_p = inputs.teacher.log_probs(p.temperature)
        lm = masked_mean(token_cross_entropy(logits, batch["labels"]), batch["mask"])
        mask = batch[SAMPLE_MASK].astype(mx.float32)
        targets = batch[SAMPLE_TARGETS]
        picked_q = token_log_probs(log_q, targets)
        picked_p = token_log_probs(inputs.teacher.log_probs(1.0), targets)
        raw = mx.stop_gradient(picked_p - picked_q) * mask
        rewards = mx.clip(raw / p.reward_scaling, -p.reward_clip, p.reward_clip) * mask
        returns = normalised_returns(rewards, mask, p.gamma, p.length_norm, p.returns_from)
        advantages = whiten(returns, mask) if p.whiten else returns
        weights = batch[SAMPLE_WEIGHTS].astype(mx.float32)
        surrogate = clipped_surrogate(picked_q, mx.stop_gradient(advantages), weights, p.cliprange)
        pg = masked_mean(surrogate, mask)
        reg = masked_mean(reverse_kl(log_q, log_p), mask)
        rows = (mask.sum(axis=1) > 0).sum()
        metrics = {
            "on_policy": mx.array(1.0),
            "pg": pg,
            "reg": reg,
            "lm": lm,
            "reward": masked_mean(raw, mask),
            "return": masked_mean(returns, mask),
            "sample_length": mask.sum() / mx.maximum(rows, 1),
            "importance_weight": masked_mean(weights, mask),
        }
        return p.pg_weight * pg + p.reg_weight * reg + p.lm_weight * lm, metrics


def components() -> list[Component]:
    return [
        Component(
            "minillm",
            MiniLLM,
            MiniLLMConfig,
            requires={"dense_teacher", "student_samples"},
            properties={"shift_invariant"},
            doc="MiniLLM on-policy reverse-KL distillation: policy gradient on student samples "
            "+ single-step reverse KL (+ LM term); lmbda = share of on-policy batches",
        )
    ]
