"""The ``amtml`` teacher aggregator: learned per-instance teacher importance weights.

AMTML-KD (Liu, Zhang, Wang, Neurocomputing 2020) gives every teacher ``k`` a learnable
latent vector ``theta_k`` and scores an instance ``x`` against it. The official code
(FLHonker/AMTML-KD-code, ``Adapter.forward``) max-pools the student's last feature map
into ``beta`` and scores ``alpha_k = (beta * theta_k) . W``; the weights are
``mu = softmax_k(alpha)`` and the integrated soft target is

    p_T(v | x) = sum_k mu_k(x) softmax(z_k / T)_v

which is exactly the mixture signal of :func:`kdcore.mixture`.

Here the instance representation is a pooled summary of one of (``source``):

- ``student_hidden``: the student's hidden state ``layer`` (default: the last);
- ``student_logits``: the student's log-probabilities;
- ``teacher_hidden``: every teacher's hidden state ``layer``, concatenated;

pooled over the tokens whose mask is 1 (``pooling = "mean"`` or ``"max"``), scaled to
unit RMS, standardised per feature with running moments (``standardize``) and mapped by a
linear *instance encoder* to ``e(x)`` in the latent space (``latent_dim``). Two scorers:

- ``latent`` (the official one): ``score_k = sum_d e_d * theta_kd * w_d``;
- ``attention``: query ``q = W_q e``, keys ``k_k = W_k theta_k`` (``keys = "latent"``) or
  ``W_k enc_k(pool(teacher k hidden))`` (``keys = "teacher_features"``), split into
  ``heads``; ``mu = mean_h softmax_k(q_h . k_kh / sqrt(d_h))``.

The paper's L2 regulariser ``||W||^2 + sum_k ||theta_k||^2`` (over the scorer's parameters,
not the encoder's) is :meth:`Amtml.regularizer`; the aggregator also leaves its value in
``inputs.extras["amtml_regularizer"]`` where the ``amtml`` loss adds ``l2`` times it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs
import mlx.core as mx
import mlx.nn as nn

from kdcore import TeacherSignal, log_softmax, mixture

REGULARIZER_KEY = "amtml_regularizer"


@attrs.define
class AmtmlConfig:
    scorer: Literal["latent", "attention"] = "latent"
    source: Literal["student_hidden", "student_logits", "teacher_hidden"] = "student_hidden"
    layer: int = -1  # index into hidden_states (0 = embeddings); negative counts from the end
    pooling: Literal["mean", "max"] = "mean"
    latent_dim: int = 32
    heads: int = 1  # attention scorer only
    keys: Literal["latent", "teacher_features"] = "latent"  # attention scorer only
    detach: bool = True  # no gradient from the weights into the student's features
    init_scale: float = 1.0  # std of theta at initialisation
    standardize: bool = True  # per-feature running standardisation of the pooled input
    momentum: float = 0.05  # of the running mean / variance
    input_dim: int | None = None  # width of the pooled source (default: from the run)
    teacher_dims: list[int] = attrs.field(factory=list)  # teacher widths (default: from the run)
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.heads < 1 or self.latent_dim % self.heads:
            raise ValueError(
                f"latent_dim {self.latent_dim} must be divisible by heads {self.heads}"
            )


def pool(values: mx.array, mask: mx.array | None, how: str = "mean") -> mx.array:
    """[B, L, D] -> [B, D] over the positions where ``mask`` [B, L] is 1 (all if None)."""
    values = values.astype(mx.float32)
    if mask is None:
        mask = mx.ones(values.shape[:2], dtype=mx.float32)
    mask = mask.astype(mx.float32)[..., None]
    if how == "max":
        pooled = mx.where(mask > 0, values, -1e30).max(axis=1)
        # An all-masked row pools to 0, not -1e30.
        return mx.where(mask.sum(1) > 0, pooled, 0.0)
    return (values * mask).sum(1) / mx.maximum(mask.sum(1), 1.0)


def rms_normalize(x: mx.array, eps: float = 1e-6) -> mx.array:
    """``x / sqrt(mean(x^2) + eps)`` along the last axis: hidden-state scale grows with
    depth and differs between models, and the scores should not depend on it."""
    return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps)


def _dims(config: AmtmlConfig, setup: Any) -> tuple[int, list[int]]:
    teacher_dims = list(config.teacher_dims)
    configs = list(getattr(setup, "teacher_configs", None) or [])
    if not teacher_dims and configs and all(hasattr(c, "dim") for c in configs):
        teacher_dims = [c.dim for c in configs]
    student = getattr(setup, "student_config", None)
    if config.input_dim is not None:
        return config.input_dim, teacher_dims
    if config.source == "student_hidden" and student is not None:
        return student.dim, teacher_dims
    if config.source == "student_logits" and student is not None:
        return student.vocab_size, teacher_dims
    if config.source == "teacher_hidden" and teacher_dims:
        return sum(teacher_dims), teacher_dims
    raise ValueError(
        f"aggregator 'amtml': cannot tell the width of source {config.source!r}; "
        "set params.input_dim (and teacher_dims for teacher features)"
    )


class Amtml(nn.Module):
    """Per-instance teacher weights ``mu = softmax_k(score_k(e(x)))`` (see module doc)."""

    def __init__(self, config: AmtmlConfig, setup: Any = None):
        super().__init__()
        self.config = config
        count = max(1, getattr(setup, "num_teachers", 1) or 1)
        input_dim, teacher_dims = _dims(config, setup)
        needs_teacher_dims = config.source == "teacher_hidden" or (
            config.scorer == "attention" and config.keys == "teacher_features"
        )
        if needs_teacher_dims and len(teacher_dims) != count:
            raise ValueError(
                f"aggregator 'amtml': {count} teachers but teacher_dims {teacher_dims}"
            )
        self.num_teachers = count
        self.teacher_dims = tuple(teacher_dims)
        d = config.latent_dim
        key = mx.random.key(config.seed)
        k_theta, k_w, k_q, k_k = mx.random.split(key, 4)
        self.encoder = nn.Linear(input_dim, d)
        self.theta = config.init_scale * mx.random.normal((count, d), key=k_theta)
        if config.scorer == "latent":
            # Scores start O(1) so the first weights are close to uniform.
            self.w = mx.random.normal((d,), key=k_w) / math.sqrt(d)
        else:
            self.query = nn.Linear(d, d, bias=False)
            self.key = nn.Linear(d, d, bias=False)
            if config.keys == "teacher_features":
                self.teacher_encoders = [nn.Linear(width, d) for width in teacher_dims]
        # Running per-feature statistics of the pooled input. Pooled hidden states of
        # different inputs share a large common direction; standardising removes it, so
        # the linear encoder sees the differences between instances, not the shared part.
        # They are arrays of this module so they are checkpointed with it; gradients never
        # reach them (stop_gradient); they are updated in training mode only (call .eval()
        # to score without updating) and not while the aggregator is frozen.
        if config.standardize:
            self.feature_mean = mx.zeros((input_dim,))
            self.feature_sq = mx.zeros((input_dim,))
            self.feature_steps = mx.zeros(())
        # What the engine must capture for us (kdcore.HasRequirements).
        wants_hidden = config.source != "student_logits" or config.keys == "teacher_features"
        self.requires = frozenset({"hidden_states"}) if wants_hidden else frozenset()

    # ------------------------------------------------------------ pieces

    def _teacher_pooled(self, signals: list[TeacherSignal], mask) -> list[mx.array]:
        pooled = []
        for k, signal in enumerate(signals):
            if signal.hidden_states is None:
                raise ValueError(
                    f"aggregator 'amtml': teacher {k} gave no hidden states (a top-k cache "
                    "has none); use source = 'student_hidden'"
                )
            pooled.append(
                rms_normalize(
                    pool(signal.hidden_states[self.config.layer], mask, self.config.pooling)
                )
            )
        return pooled

    def instance(self, signals: list[TeacherSignal], inputs: Any) -> mx.array:
        """The pooled, normalised instance representation [B, input_dim]."""
        config = self.config
        mask = inputs.batch.get("mask") if inputs is not None else None
        if config.source == "teacher_hidden":
            x = mx.concatenate(self._teacher_pooled(signals, mask), axis=-1)
        else:
            student = getattr(inputs, "student", None)
            if student is None:
                raise ValueError("aggregator 'amtml' needs the student's outputs (inputs.student)")
            if config.source == "student_logits":
                x = pool(log_softmax(student.logits), mask, config.pooling)
            else:
                if student.hidden_states is None:
                    raise ValueError(
                        "aggregator 'amtml' needs the student's hidden states; the run "
                        "captures them when the aggregator declares requires"
                    )
                x = pool(student.hidden_states[config.layer], mask, config.pooling)
            x = rms_normalize(x)
        if config.standardize:
            x = self._standardize(x, mask)
        return mx.stop_gradient(x) if config.detach else x

    def _standardize(self, x: mx.array, mask) -> mx.array:
        """``(x - m) / sqrt(v + 1e-5)`` with per-feature running moments: exponential
        moving averages (rate ``momentum``, bias-corrected as in Adam) of ``x`` and ``x^2``
        over training batches, ``v = E[x^2] - m^2``. Before the first update ``m = 0`` and
        ``v = 1``. Moments across batches, not within one, so batches of one work. Updated
        in training mode while the aggregator is not frozen."""
        a = self.config.momentum
        # A frozen aggregator (lr_mult = 0 on its parameter group) is fixed entirely.
        if self.training and "theta" in self.trainable_parameters():
            valid = mx.ones((x.shape[0],)) if mask is None else (mask.sum(-1) > 0)
            valid = valid.astype(mx.float32)[:, None]
            count = mx.maximum(valid.sum(), 1.0)
            sg = mx.stop_gradient(x)
            self.feature_mean = (1 - a) * self.feature_mean + a * (sg * valid).sum(0) / count
            self.feature_sq = (1 - a) * self.feature_sq + a * (mx.square(sg) * valid).sum(0) / count
            self.feature_steps = self.feature_steps + 1
        steps = mx.stop_gradient(self.feature_steps)
        correction = mx.maximum(1 - (1 - a) ** steps, 1e-12)
        m = mx.stop_gradient(self.feature_mean) / correction
        v = mx.maximum(mx.stop_gradient(self.feature_sq) / correction - mx.square(m), 0.0)
        m = mx.where(steps > 0, m, 0.0)
        v = mx.where(steps > 0, v, 1.0)
        return (x - m) * mx.rsqrt(v + 1e-5)

    def scores(self, signals: list[TeacherSignal], inputs: Any) -> mx.array:
        """Unnormalised scores [B, K] (latent) or per-head scores [B, H, K] (attention)."""
        e = self.encoder(self.instance(signals, inputs))  # [B, d]
        if self.config.scorer == "latent":
            return (e[:, None, :] * self.theta[None, :, :]) @ self.w  # [B, K]
        H = self.config.heads
        B, d = e.shape
        dh = d // H
        q = self.query(e).reshape(B, H, 1, dh)
        if self.config.keys == "teacher_features":
            mask = inputs.batch.get("mask") if inputs is not None else None
            feats = self._teacher_pooled(signals, mask)
            if self.config.detach:
                feats = [mx.stop_gradient(f) for f in feats]
            keys = mx.stack([enc(f) for enc, f in zip(self.teacher_encoders, feats)], axis=1)
            keys = self.key(keys).reshape(B, -1, H, dh).transpose(0, 2, 3, 1)  # [B, H, dh, K]
        else:
            keys = self.key(self.theta).reshape(-1, H, dh).transpose(1, 2, 0)[None]  # [1,H,dh,K]
        return (q @ keys)[:, :, 0, :] / math.sqrt(dh)  # [B, H, K]

    def weights(self, signals: list[TeacherSignal], inputs: Any) -> mx.array:
        """``mu`` [B, K]: rows are non-negative and sum to 1."""
        s = self.scores(signals, inputs)
        if s.ndim == 3:
            return mx.softmax(s, axis=-1).mean(axis=1)
        return mx.softmax(s, axis=-1)

    def regularizer(self) -> mx.array:
        """The paper's ``||W||^2 + sum_k ||theta_k||^2`` over the scorer's parameters."""
        total = mx.square(self.theta).sum()
        if self.config.scorer == "latent":
            return total + mx.square(self.w).sum()
        return total + mx.square(self.query.weight).sum() + mx.square(self.key.weight).sum()

    # ------------------------------------------------------------ the aggregator contract

    def __call__(self, signals: list[TeacherSignal], inputs: Any = None) -> TeacherSignal:
        if len(signals) != self.num_teachers:
            raise ValueError(
                f"aggregator 'amtml' was built for {self.num_teachers} teachers, got {len(signals)}"
            )
        if inputs is not None and isinstance(getattr(inputs, "extras", None), dict):
            inputs.extras[REGULARIZER_KEY] = self.regularizer()
        if len(signals) == 1:
            return signals[0]
        return mixture(signals, self.weights(signals, inputs))


def amtml_aggregator(config: AmtmlConfig, setup: Any = None) -> Amtml:
    """AMTML-KD adaptive teacher weights: mu = softmax_k(score(e(x), theta_k)); the target is
    sum_k mu_k softmax(z_k / T). Learnable, trained with the student; freeze it in a stage
    with a parameter group ``{pattern = "^aggregator\\\\.", lr_mult = 0}``."""
    return Amtml(config, setup)
