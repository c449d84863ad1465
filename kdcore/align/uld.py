"""Universal Logit Distillation (Boizard et al. 2024): sorted probabilities compared in rank
space, for teachers and students with any vocabularies (the ``uld`` aligner and loss)."""

from __future__ import annotations

import attrs
import mlx.core as mx

from kdcore.errors import SpecError
from kdcore.losses.inputs import LossInputs
from kdcore.losses.tokens import masked_mean
from kdcore.signal.aligned import AlignedSignal, position_mask
from kdcore.signal.teacher import TeacherSignal


@attrs.define
class UldAlignerConfig:
    top_k: int | None = None  # keep the k largest teacher probabilities (default: all)


class UldAligner:
    """ULD's vocabulary side: the teacher's probabilities sorted, largest first.

    No token identity survives, so any two vocabularies fit. The output is a dense
    rank-space signal (``rank_space = True``) whose logits are the teacher's logits sorted
    in decreasing order (softmax commutes with sorting, and losses may still apply a
    temperature). Pair it with the ``uld`` loss; a loss that indexes tokens (KL) would
    compare ranks with token ids.
    """

    def __init__(self, config: UldAlignerConfig | None = None, setup=None):
        self.config = config or UldAlignerConfig()

    def prepare(self, teacher_tokenizer, student_tokenizer) -> None:
        if self.config.top_k is not None and self.config.top_k < 1:
            raise SpecError("top_k must be >= 1 @ $.aligner.params.top_k")

    def __call__(self, signal: TeacherSignal) -> TeacherSignal:
        if signal.logits is not None:
            z = signal.logits.astype(mx.float32)
        elif signal.members is not None:
            z = signal.log_probs(1.0)
        else:
            # log p at Tc times Tc = z - const: tempering by T later gives softmax(z / T)
            # over the top-k (the unknown tail is left out).
            z = signal.topk_logprobs.astype(mx.float32) * signal.capture_temperature
        z = -mx.sort(-z, axis=-1)
        if self.config.top_k is not None:
            z = z[..., : self.config.top_k]
        return AlignedSignal(
            vocab_size=z.shape[-1],
            logits=mx.stop_gradient(z),
            hidden_states=signal.hidden_states,
            attentions=signal.attentions,
            position_mask=position_mask(signal),
            rank_space=True,
        )


@attrs.define
class UldLossConfig:
    temperature: float = 1.0
    top_k: int | None = None  # compare only the k largest probabilities of each side


def sorted_probs(logits_or_logp: mx.array, temperature, already_sorted: bool = False) -> mx.array:
    """softmax(z / T) sorted in decreasing order; differentiable through the gather."""
    z = logits_or_logp.astype(mx.float32) / temperature
    p = mx.softmax(z, axis=-1)
    if already_sorted:
        return p
    order = mx.argsort(mx.stop_gradient(-p), axis=-1)
    return mx.take_along_axis(p, order, axis=-1)


def _pad_last(x: mx.array, size: int) -> mx.array:
    if x.shape[-1] >= size:
        return x
    pad = mx.zeros((*x.shape[:-1], size - x.shape[-1]), x.dtype)
    return mx.concatenate([x, pad], axis=-1)


def uld_loss(config: UldLossConfig, setup=None):
    """Universal Logit Distillation (Boizard et al. 2024), per token position:

    ``d = sum_r |sort(p_s)_r - sort(p_t)_r|`` with ``p = softmax(z / T)`` sorted in
    decreasing order and the shorter vector padded with zeros (the L1 / Wasserstein-1
    distance between the sorted distributions); masked mean over tokens. No T^2 factor (the
    paper's loss is on probabilities). The teacher may have any vocabulary; a top-k cache
    contributes its k probabilities (exact at the capture temperature) and zeros.
    """

    def loss(inputs: LossInputs):
        T = inputs.params.temperature
        ps = sorted_probs(inputs.student.logits, T)
        teacher = inputs.teacher
        if teacher.topk_ids is not None:
            _, logp = teacher.sparse_log_probs(T, "tail-bucket")
            pt = mx.exp(logp[..., :-1])
            pt = mx.take_along_axis(pt, mx.argsort(-pt, axis=-1), axis=-1)
        elif getattr(teacher, "rank_space", False):
            pt = sorted_probs(teacher.logits, T, already_sorted=True)
        else:
            pt = mx.exp(teacher.log_probs(T))
            pt = mx.take_along_axis(pt, mx.argsort(-pt, axis=-1), axis=-1)
        size = max(ps.shape[-1], pt.shape[-1])
        ps, pt = _pad_last(ps, size), _pad_last(mx.stop_gradient(pt), size)
        top_k = config.top_k
        if top_k is not None:
            ps, pt = ps[..., :top_k], pt[..., :top_k]
        distance = mx.abs(ps - pt).sum(-1)
        return masked_mean(distance, inputs.batch["mask"]), {}

    return loss
