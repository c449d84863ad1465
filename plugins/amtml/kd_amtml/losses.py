"""Multi-level losses of AMTML-KD: the integrated soft target, hints, attention, CKA.

Layer indices follow :class:`kdcore.ModelOutput`: ``hidden_states[0]`` is the
embedding output and ``hidden_states[i]`` the output of block ``i``; ``attentions[i]`` is
block ``i + 1``'s attention map. Negative indices count from the end. With no explicit
layer map, student block ``s`` (1..S) is paired with teacher block ``round(s * T / S)``
(``uniform``).

When the teacher signal is a mixture (several teachers through an aggregator), the
per-teacher features are on ``teacher.members[j]`` and the aggregator's instance weights
on ``teacher.weights``.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import mlx.core as mx
import mlx.nn as nn

from kd_amtml.aggregator import REGULARIZER_KEY
from kdcore import IGNORE_INDEX, LossInputs, TeacherSignal, log_softmax, masked_mean

# ---------------------------------------------------------------- helpers


def soft_target_kl(student_logits: mx.array, teacher: TeacherSignal, temperature) -> mx.array:
    """Per-token ``KL(p_T || q_T)`` [B, L] summed over the vocabulary, where ``p_T`` is the
    teacher's (or the mixture's) distribution at ``T`` and ``q_T = softmax(s / T)``."""
    t_logp = teacher.log_probs(temperature)
    s_logp = log_softmax(student_logits, temperature)  # the row maximum subtracted first
    p = mx.exp(t_logp)
    return mx.where(p > 0, p * (t_logp - s_logp), 0.0).sum(-1)


def _members(teacher: TeacherSignal) -> tuple[TeacherSignal, ...]:
    return teacher.members if teacher.members is not None else (teacher,)


def _pick(teacher: TeacherSignal, index: int) -> TeacherSignal:
    members = _members(teacher)
    if not -len(members) <= index < len(members):
        raise ValueError(f"teacher {index} asked for, the signal has {len(members)}")
    return members[index]


def _instance_weights(teacher: TeacherSignal, shape: tuple[int, int]) -> mx.array | None:
    """The aggregator's weights as [B, L, K] (no gradient: a hint must not steer routing
    towards the teacher whose features are easiest to imitate)."""
    if teacher.weights is None:
        return None
    w = mx.stop_gradient(teacher.weights.astype(mx.float32))
    if w.ndim == 2:
        w = mx.broadcast_to(w[:, None, :], (*shape, w.shape[-1]))
    return w


def uniform_pairs(student_blocks: int, teacher_blocks: int) -> list[tuple[int, int]]:
    """Student block ``s`` -> teacher block ``round(s * T / S)``, for s = 1..S."""
    return [
        (s, max(1, min(teacher_blocks, round(s * teacher_blocks / student_blocks))))
        for s in range(1, student_blocks + 1)
    ]


def _explicit_pairs(student: list[int], teacher: list[int]) -> list[tuple[int, int]]:
    if len(teacher) == 1 and len(student) > 1:
        teacher = teacher * len(student)
    if len(student) != len(teacher):
        raise ValueError(
            f"student_layers {student} and teacher_layers {teacher} must have equal lengths"
        )
    return list(zip(student, teacher))


def _student_dim(config: Any, setup: Any) -> int:
    if config.student_dim is not None:
        return config.student_dim
    student = getattr(setup, "student_config", None)
    if student is None or not hasattr(student, "dim"):
        raise ValueError("cannot tell the student's width; set params.student_dim")
    return student.dim


def _teacher_dims(config: Any, setup: Any) -> list[int]:
    if config.teacher_dims:
        return list(config.teacher_dims)
    configs = list(getattr(setup, "teacher_configs", None) or [])
    if configs and all(hasattr(c, "dim") for c in configs):
        return [c.dim for c in configs]
    raise ValueError("cannot tell the teachers' widths; set params.teacher_dims")


def _student_blocks(config: Any, setup: Any) -> int | None:
    student = getattr(setup, "student_config", None)
    return getattr(student, "layers", None) if student is not None else None


def _l2_normalize(x: mx.array, eps: float = 1e-12) -> mx.array:
    return x * mx.rsqrt(mx.square(x).sum(-1, keepdims=True) + eps)


def _need(features, what: str, who: str):
    if features is None:
        raise ValueError(f"{who} gave no {what}: the loss must declare requires={{'{what}'}}")
    return features


# ---------------------------------------------------------------- amtml soft targets


@attrs.define
class AmtmlLossConfig:
    temperature: float = 1.0
    l2: float = 1e-3  # weight of the amtml aggregator's L2 regulariser
    # Not in the paper: weight of the integrated target's own cross-entropy on the labels,
    # -log sum_k mu_k p_k(y) at T = 1. Only the aggregator gets its gradient (the teachers
    # are frozen): it routes each instance to the teachers that predict it best.
    gate_ce: float = 0.0


def amtml_loss(config: AmtmlLossConfig, setup: Any = None):
    """T^2 * KL(sum_k mu_k softmax(z_k/T) || softmax(s/T)), masked mean over tokens, plus
    l2 * (||W||^2 + sum_k ||theta_k||^2) when the aggregator is ``amtml``, plus (optional,
    not in the paper) gate_ce * mean(-log sum_k mu_k p_k(y)) for the aggregator only. Blend
    with ``ce`` through the spec's loss weights (the paper: 0.7 and 0.3)."""

    def loss(inputs: LossInputs):
        params = inputs.params
        T = params.temperature
        teacher = inputs.teacher
        kl = soft_target_kl(inputs.student.logits, teacher, T)
        value = (T * T) * masked_mean(kl, inputs.batch["mask"])
        metrics = {"kl": value}
        reg = inputs.extras.get(REGULARIZER_KEY)
        if reg is not None:
            metrics["regularizer"] = reg
            value = value + params.l2 * reg
        gate = params.gate_ce
        if teacher.weights is not None and (isinstance(gate, mx.array) or gate):
            labels = inputs.batch["labels"]
            safe = mx.where(labels == IGNORE_INDEX, 0, labels)
            picked = mx.take_along_axis(teacher.log_probs(1.0), safe[..., None], axis=-1)[..., 0]
            gate_nll = masked_mean(-picked, inputs.batch["mask"])
            metrics["gate_nll"] = gate_nll
            value = value + gate * gate_nll
        if teacher.weights is not None:
            w = teacher.weights.reshape(-1, teacher.weights.shape[-1])
            entropy = -(w * mx.log(mx.maximum(w, 1e-30))).sum(-1).mean()
            metrics["weight_entropy"] = entropy
        return value, metrics

    return loss


# ---------------------------------------------------------------- hints (FitNets)


@attrs.define
class HintConfig:
    strategy: Literal["single", "groups", "all"] = "single"
    student_layers: list[int] = attrs.field(factory=list)  # explicit map; empty = uniform
    teacher_layers: list[int] = attrs.field(factory=list)
    teacher: int = 0  # "single": which teacher of a mixture gives the hints
    teacher_layer: int = -1  # "groups": the hint layer of each teacher (default: last)
    normalize: bool = True  # L2-normalise student and teacher features per token
    instance_weighted: bool = False  # scale teacher j's term by the instance weight mu_j
    student_dim: int | None = None  # default: from the run's student config
    teacher_dims: list[int] = attrs.field(factory=list)  # default: from the teachers' configs


class Hint(nn.Module):
    """FitNets hints with a learned projection ``r`` (student width -> teacher width).

    Per token and hinted pair: ``||r(s^) - t^||^2`` summed over the teacher's features, with
    ``^`` the per-token L2 normalisation when ``normalize`` (the official code normalises
    both before the regressor). Masked mean over tokens, mean over pairs.

    Strategies: ``single`` (one teacher, the layer map); ``all`` (every teacher, the layer
    map, averaged over teachers); ``groups`` (AMTML's multi-group hint: the student's
    blocks are split into K contiguous groups and teacher j's ``teacher_layer`` supervises
    the last block of group j). With ``instance_weighted``, teacher j's per-token term is
    multiplied by the aggregator's weight ``mu_j(x)`` instead of ``1/K`` (weights are not
    differentiated). The projections live in this module: they train with the student and
    are not part of the saved student.
    """

    def __init__(self, config: HintConfig, setup: Any = None):
        super().__init__()
        self.config = config
        s_dim = _student_dim(config, setup)
        t_dims = _teacher_dims(config, setup)
        count = len(t_dims)
        if config.strategy == "groups":
            blocks = _student_blocks(config, setup)
            if config.student_layers:
                layers = list(config.student_layers)
            elif blocks is None:
                raise ValueError("hint 'groups' needs student_layers or the run's student config")
            else:
                if blocks < count:
                    raise ValueError(f"{blocks} student blocks cannot make {count} groups")
                layers = [round((j + 1) * blocks / count) for j in range(count)]
            if len(layers) != count:
                raise ValueError(f"'groups' needs one student layer per teacher ({count})")
            self.group_layers = tuple(layers)
            self.proj = [nn.Linear(s_dim, t_dims[j], bias=False) for j in range(count)]
            return
        if config.student_layers or config.teacher_layers:
            slots = len(_explicit_pairs(list(config.student_layers), list(config.teacher_layers)))
        else:
            slots = _student_blocks(config, setup)
            if slots is None:
                raise ValueError("hint: give student_layers/teacher_layers or run with a student")
        teachers = range(count) if config.strategy == "all" else [config.teacher]
        if config.strategy == "single" and not -count <= config.teacher < count:
            raise ValueError(f"hint: teacher {config.teacher} of {count}")
        # proj[slot * count + j]: pair `slot`, teacher j (None-free flat list for MLX trees)
        self.proj = [
            nn.Linear(s_dim, t_dims[j], bias=False) for _ in range(slots) for j in teachers
        ]
        self.teachers = tuple(teachers)

    def _pairs(self, student_count: int, teacher_count: int) -> list[tuple[int, int]]:
        c = self.config
        if c.student_layers or c.teacher_layers:
            return _explicit_pairs(list(c.student_layers), list(c.teacher_layers))
        return uniform_pairs(student_count - 1, teacher_count - 1)

    def _term(self, proj: nn.Linear, s: mx.array, t: mx.array) -> mx.array:
        s = s.astype(mx.float32)
        t = t.astype(mx.float32)
        if self.config.normalize:
            s, t = _l2_normalize(s), _l2_normalize(t)
        return mx.square(proj(s) - t).sum(-1)  # [B, L]

    def __call__(self, inputs: LossInputs):
        c = self.config
        student = _need(inputs.student.hidden_states, "hidden_states", "the student")
        mask = inputs.batch["mask"]
        members = _members(inputs.teacher)
        B, L = mask.shape
        weights = _instance_weights(inputs.teacher, (B, L)) if c.instance_weighted else None
        per_teacher: dict[int, mx.array] = {}
        if c.strategy == "groups":
            if len(members) != len(self.proj):
                raise ValueError(
                    f"'groups' built for {len(self.proj)} teachers, got {len(members)}"
                )
            for j, (layer, member) in enumerate(zip(self.group_layers, members)):
                hidden = _need(member.hidden_states, "hidden_states", f"teacher {j}")
                per_teacher[j] = self._term(self.proj[j], student[layer], hidden[c.teacher_layer])
        else:
            for slot_j, j in enumerate(self.teachers):
                member = _pick(inputs.teacher, j) if len(members) > 1 else members[0]
                hidden = _need(member.hidden_states, "hidden_states", f"teacher {j}")
                pairs = self._pairs(len(student), len(hidden))
                terms = [
                    self._term(self.proj[slot * len(self.teachers) + slot_j], student[s], hidden[t])
                    for slot, (s, t) in enumerate(pairs)
                ]
                per_teacher[j if len(members) > 1 else 0] = sum(terms) / len(terms)
        if weights is not None and len(members) > 1:
            token = sum(weights[..., j] * term for j, term in per_teacher.items())
        else:
            token = sum(per_teacher.values()) / len(per_teacher)
        value = masked_mean(token, mask)
        metrics = {f"teacher{j}": masked_mean(t, mask) for j, t in per_teacher.items()}
        return value, metrics if len(per_teacher) > 1 else {}


def hint_loss(config: HintConfig, setup: Any = None) -> Hint:
    """FitNets hints: ||r(s^) - t^||^2 per token with a learned projection r; single teacher,
    all teachers, or AMTML's multi-group strategy, optionally weighted by the instance
    weights."""
    return Hint(config, setup)


# ---------------------------------------------------------------- attention transfer


@attrs.define
class AttentionTransferConfig:
    student_layers: list[int] = attrs.field(factory=list)  # indices into attentions
    teacher_layers: list[int] = attrs.field(factory=list)
    teacher: int = 0  # which teacher of a mixture
    mode: Literal["kl", "mse"] = "kl"


def align_heads(teacher: mx.array, student_heads: int) -> mx.array:
    """Teacher maps [B, Ht, L, L] -> [B, Hs, L, L]: groups of Ht/Hs heads averaged when the
    teacher has more heads, each head repeated Hs/Ht times when it has fewer, and the
    head average broadcast when neither divides the other."""
    B, Ht, L, _ = teacher.shape
    Hs = student_heads
    if Ht == Hs:
        return teacher
    if Ht % Hs == 0:
        return teacher.reshape(B, Hs, Ht // Hs, L, L).mean(axis=2)
    if Hs % Ht == 0:
        return mx.repeat(teacher, Hs // Ht, axis=1)
    return mx.broadcast_to(teacher.mean(axis=1, keepdims=True), (B, Hs, L, L))


def _attention_pairs(config, s_count: int, t_count: int) -> list[tuple[int, int]]:
    if config.student_layers or config.teacher_layers:
        return _explicit_pairs(list(config.student_layers), list(config.teacher_layers))
    # attentions[i] is block i+1: pair blocks uniformly, then shift back to indices.
    return [(s - 1, t - 1) for s, t in uniform_pairs(s_count, t_count)]


def attention_transfer_loss(config: AttentionTransferConfig, setup: Any = None):
    """Attention-map transfer: a divergence between the models' self-attention maps, the
    attention probabilities softmax(QK^T / sqrt(d)) of each head [B, H, L, L]. Per query
    row, KL(a_t || a_s) over the keys (``kl``, as in MiniLM's self-attention distillation,
    Wang et al. 2020) or the summed squared difference (``mse``); mean over heads, masked
    mean over query tokens, mean over layer pairs. Rows are restricted to keys whose mask is
    1 and renormalised, so positions outside the loss mask do not count.

    This is not Zagoruyko and Komodakis' "attention transfer" (2017), whose attention maps
    are built from activations (sum over channels of |A|^p of a layer's features,
    L2-normalised, then an L2 distance); to match hidden states use ``hint`` or ``cka``."""

    def loss(inputs: LossInputs):
        s_maps = _need(inputs.student.attentions, "attentions", "the student")
        teacher = _pick(inputs.teacher, config.teacher)
        t_maps = _need(teacher.attentions, "attentions", "the teacher")
        mask = inputs.batch["mask"].astype(mx.float32)
        keys = mask[:, None, None, :]
        values = []
        for s_i, t_i in _attention_pairs(config, len(s_maps), len(t_maps)):
            s = s_maps[s_i].astype(mx.float32)
            t = align_heads(t_maps[t_i].astype(mx.float32), s.shape[1])
            s = s * keys / mx.maximum((s * keys).sum(-1, keepdims=True), 1e-12)
            t = t * keys / mx.maximum((t * keys).sum(-1, keepdims=True), 1e-12)
            if config.mode == "kl":
                log_t = mx.log(mx.maximum(t, 1e-30))
                log_s = mx.log(mx.maximum(s, 1e-30))
                row = mx.where(t > 0, t * (log_t - log_s), 0.0).sum(-1)
            else:
                row = mx.square(s - t).sum(-1)
            values.append(masked_mean(row.mean(axis=1), mask))
        return sum(values) / len(values), {}

    return loss


# ---------------------------------------------------------------- CKA


@attrs.define
class CkaConfig:
    student_layers: list[int] = attrs.field(factory=list)
    teacher_layers: list[int] = attrs.field(factory=list)
    teacher: int = 0  # which teacher of a mixture
    over: Literal["tokens", "sequences"] = "tokens"


def linear_cka(x: mx.array, y: mx.array, weights: mx.array) -> mx.array:
    """Linear CKA (Kornblith et al., 2019) of representations x [N, Dx] and y [N, Dy] over the
    N rows with weight 1:

        CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)

    with ``Xc`` centred by the weighted mean and zero on rows of weight 0. The value is the
    same at every feature scale: no epsilon enters the ratio (an additive one biased small
    features towards 1). Each side is brought to unit size before the fourth powers (float32
    would underflow at 1e-3 and overflow at 1e4); the factors carry no gradient, which is
    exact because CKA ignores scale. A side whose centred features are below 2e-4 of their
    own (uncentred) size is constant up to rounding, of the features or of what they were
    computed from (equal rows from logits shifted by +/-50 differ by ~3e-5 of their size):
    its "similarity" would be that rounding noise, so CKA is 0 against a varying side and 1
    between two constant sides (the loss stays zero at identity, with a finite, zero
    gradient). The threshold is relative, so it holds alike at every scale."""
    w = weights.astype(mx.float32)[:, None]
    count = mx.maximum(w.sum(), 1.0)
    tiny = 1e-30

    def centre(a: mx.array) -> tuple[mx.array, mx.array]:
        a = a.astype(mx.float32) * w
        a = a / mx.maximum(mx.stop_gradient(mx.abs(a).max()), tiny)
        # Two passes: the second removes what float32 rounding left of the mean.
        c = (a - a.sum(0, keepdims=True) / count) * w
        c = (c - c.sum(0, keepdims=True) / count) * w
        size = mx.stop_gradient(mx.sqrt(mx.square(a).sum()))
        norm = mx.stop_gradient(mx.sqrt(mx.square(c).sum()))
        constant = norm <= 2e-4 * size
        return c / mx.maximum(norm, tiny), constant

    (xc, x_constant), (yc, y_constant) = centre(x), centre(y)
    cross = mx.square(yc.T @ xc).sum()
    xx = mx.square(xc.T @ xc).sum()
    yy = mx.square(yc.T @ yc).sum()
    degenerate = x_constant | y_constant
    # The denominator is replaced, not only the result, so no 0/0 reaches the gradient.
    ratio = cross / mx.sqrt(mx.where(degenerate, 1.0, xx * yy))
    ratio = mx.where(degenerate, mx.where(x_constant & y_constant, 1.0, 0.0), ratio)
    return mx.minimum(ratio, 1.0)


def cka_loss(config: CkaConfig, setup: Any = None):
    """1 - linear CKA between student and teacher hidden states of any widths, over the
    masked tokens of the batch (``tokens``) or the per-sequence mean states
    (``sequences``); mean over layer pairs."""

    def loss(inputs: LossInputs):
        s_hidden = _need(inputs.student.hidden_states, "hidden_states", "the student")
        teacher = _pick(inputs.teacher, config.teacher)
        t_hidden = _need(teacher.hidden_states, "hidden_states", "the teacher")
        mask = inputs.batch["mask"].astype(mx.float32)
        if config.student_layers or config.teacher_layers:
            pairs = _explicit_pairs(list(config.student_layers), list(config.teacher_layers))
        else:
            pairs = uniform_pairs(len(s_hidden) - 1, len(t_hidden) - 1)
        values = []
        for s_i, t_i in pairs:
            s, t = s_hidden[s_i], t_hidden[t_i]
            if config.over == "sequences":
                m = mask[..., None]
                denom = mx.maximum(m.sum(1), 1.0)
                xs, xt = (s * m).sum(1) / denom, (t * m).sum(1) / denom
                rows = (mask.sum(1) > 0).astype(mx.float32)
            else:
                xs = s.reshape(-1, s.shape[-1])
                xt = t.reshape(-1, t.shape[-1])
                rows = mask.reshape(-1)
            values.append(1.0 - linear_cka(xs, xt, rows))
        return sum(values) / len(values), {}

    return loss
