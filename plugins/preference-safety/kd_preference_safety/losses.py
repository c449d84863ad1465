"""Preference and safety distillation losses, and DPO for training preference teachers.

Notation: ``ll`` is a row's response log-likelihood (``margins.py``), length-normalised unless
``normalize = false``; for a pair, ``m_s`` and ``m_t`` are the student's and the teacher's
margins ``ll(chosen) - ll(rejected)``. Pair losses average over the valid pairs of the batch
(0 when there are none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx

from kd_preference_safety.margins import (
    logits_response_ll,
    pair_flag,
    pair_matrix,
    pair_mean,
    require_pairs,
    signal_response_ll,
    teacher_margins,
)
from kdcore import LossInputs, SpecError, StepContext, TeacherSignal, log_softmax
from kdcore.app import fingerprint, load_model, load_tokenizer


def _margins(inputs: LossInputs, normalize: bool, name: str):
    batch = inputs.batch
    require_pairs(batch, name)
    if inputs.teacher is None:
        raise ValueError(f"loss {name!r} needs a teacher")
    S, valid = pair_matrix(batch)
    student = S @ logits_response_ll(
        inputs.student.logits, batch["labels"], batch["mask"], normalize
    )
    teacher = mx.stop_gradient(teacher_margins(inputs.teacher, batch, S, normalize))
    return S, valid, student, teacher


def _margin_metrics(student: mx.array, teacher: mx.array, valid: mx.array) -> dict[str, mx.array]:
    agree = (mx.sign(student) == mx.sign(teacher)).astype(mx.float32)
    return {
        "student_margin": pair_mean(student, valid),
        "teacher_margin": pair_mean(teacher, valid),
        "agreement": pair_mean(agree, valid),
    }


# ---------------------------------------------------------------- preference_kd


@attrs.define
class PreferenceKDConfig:
    temperature: float = 1.0
    rejected_weight: float = 1.0


def preference_kd(config: PreferenceKDConfig, setup: Any = None):
    """Token KL(teacher || student) on the chosen and the rejected responses.

    ``T^2 * sum_t w_r m_t KL(softmax(z_t/T) || softmax(s_t/T)) / sum_t w_r m_t`` with
    ``w_r = 1`` on chosen rows and ``rejected_weight`` on rejected rows; ``m`` is the
    response mask, so prompts carry no loss.
    """

    def loss(inputs: LossInputs):
        batch, params = inputs.batch, inputs.params
        require_pairs(batch, "preference_kd")
        T = params.temperature
        lt = inputs.teacher.log_probs(T)
        ls = log_softmax(inputs.student.logits, T)
        kl = (mx.exp(lt) * (lt - ls)).sum(-1) * (T * T)
        chosen = batch["pair_chosen"].astype(mx.float32)[:, None]
        mask = batch["mask"].astype(mx.float32)
        w = mask * (chosen + params.rejected_weight * (1.0 - chosen))
        value = (kl * w).sum() / mx.maximum(w.sum(), 1e-8)

        def part(m):
            return (kl * m).sum() / mx.maximum(m.sum(), 1.0)

        return value, {"kl_chosen": part(mask * chosen), "kl_rejected": part(mask * (1 - chosen))}

    return loss


# ---------------------------------------------------------------- ranking_preservation


@attrs.define
class MarginConfig:
    normalize: bool = True  # length-normalised log-likelihoods


def ranking_preservation(config: MarginConfig, setup: Any = None):
    """Match the student's preference margin to the teacher's: mean over pairs of
    ``(m_s - m_t)^2``."""

    def loss(inputs: LossInputs):
        _, valid, student, teacher = _margins(inputs, config.normalize, "ranking_preservation")
        value = pair_mean((student - teacher) ** 2, valid)
        return value, _margin_metrics(student, teacher, valid)

    return loss


# ---------------------------------------------------------------- dpkd


@attrs.define
class DPKDConfig:
    beta: float = 1.0
    normalize: bool = True


def dpkd(config: DPKDConfig, setup: Any = None):
    """Direct preference KD: mean over pairs of ``-log sigmoid(beta * (m_s - m_t))``, the
    DPO loss with the teacher as the reference (log 2 when the margins are equal)."""

    def loss(inputs: LossInputs):
        _, valid, student, teacher = _margins(inputs, config.normalize, "dpkd")
        z = inputs.params.beta * (student - teacher)
        value = pair_mean(mx.logaddexp(mx.zeros_like(z), -z), valid)
        return value, _margin_metrics(student, teacher, valid)

    return loss


# ---------------------------------------------------------------- safety_alignment


@attrs.define
class SafetyConfig:
    margin: float = 0.0
    normalize: bool = True


def safety_alignment(config: SafetyConfig, setup: Any = None):
    """On safety pairs (batch ``safety`` = 1), the hinge ``max(0, m_t + margin - m_s)``: the
    student's gap between the chosen (safe) and rejected response must be at least the
    teacher's. Mean over the safety pairs of the batch; 0 when there are none."""

    def loss(inputs: LossInputs):
        S, valid, student, teacher = _margins(inputs, config.normalize, "safety_alignment")
        if "safety" not in inputs.batch:
            raise ValueError("loss 'safety_alignment' needs the batch array 'safety'")
        on = valid * pair_flag(inputs.batch, "safety", S)
        hinge = mx.maximum(teacher + inputs.params.margin - student, 0.0)
        value = pair_mean(hinge, on)
        kept = (student >= teacher).astype(mx.float32)
        return value, {"safety_pairs": on.sum(), "gap_kept": pair_mean(kept, on)}

    return loss


# ---------------------------------------------------------------- dpo


@attrs.define
class DPOConfig:
    beta: float = 0.1
    reference: str = ""  # a saved model directory; "" = the run's (aggregated) teacher
    normalize: bool = False  # standard DPO sums the response log-probabilities
    chosen_nll: float = 0.0  # weight of the chosen responses' per-token NLL (RPO)


class DPO:
    """DPO (Rafailov et al. 2023): mean over pairs of
    ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` where ``pi``/``ref`` are the
    policy's (student's) and the frozen reference's response log-likelihoods, plus
    ``chosen_nll`` times the per-token NLL of the chosen responses (RPO, Pang et al. 2024:
    keeps DPO from lowering the likelihood of both responses).

    The reference is the model at ``reference`` (run outside autodiff in ``prepare_batch``),
    or, with ``reference = ""``, the run's teacher signal (with the teacher also used by the
    ``from-teacher`` initializer this is the usual setup: start from the SFT model and keep
    it as the reference).
    """

    def __init__(self, config: DPOConfig, setup: Any = None):
        self.config = config
        self.reference = None
        if config.reference:
            path = Path(setup.resolve(config.reference)) if setup else Path(config.reference)
            self.reference, _, _ = load_model(path)
            self.reference.freeze()
            tokenizer = getattr(setup, "tokenizer", None)
            if tokenizer is not None and (path / "tokenizer.json").exists():
                if fingerprint(load_tokenizer(path)) != fingerprint(tokenizer):
                    raise SpecError(
                        f"dpo reference {path} has another vocabulary than the run "
                        "@ $.losses.dpo.params.reference"
                    )
        elif setup is not None and getattr(setup, "spec", None) is not None:
            if not setup.spec.teachers:
                raise SpecError(
                    "dpo needs a reference: params.reference = MODEL_DIR, or a teacher "
                    "(used as the reference) @ $.losses"
                )

    def reference_ll(self, batch: dict, teacher: TeacherSignal | None) -> mx.array:
        if "reference_ll" in batch:
            return batch["reference_ll"]
        labels, mask = batch["labels"], batch["mask"]
        if self.reference is not None:
            logits = self.reference(batch["input_ids"]).logits
            return mx.stop_gradient(logits_response_ll(logits, labels, mask, self.config.normalize))
        if teacher is None:
            raise ValueError("dpo has no reference: set params.reference or add a teacher")
        return mx.stop_gradient(signal_response_ll(teacher, labels, mask, self.config.normalize))

    def prepare_batch(self, batch: dict, context: StepContext) -> dict:
        """Outside autodiff: the reference model's response log-likelihoods (a model
        ``reference``); with the teacher as the reference, the loss reads its signal."""
        if self.reference is None:
            return batch
        ll = self.reference_ll(batch, None)
        mx.eval(ll)
        return {**batch, "reference_ll": ll}

    def __call__(self, inputs: LossInputs):
        batch = inputs.batch
        require_pairs(batch, "dpo")
        S, valid = pair_matrix(batch)
        policy = logits_response_ll(
            inputs.student.logits, batch["labels"], batch["mask"], self.config.normalize
        )
        reward = policy - self.reference_ll(batch, inputs.teacher)
        z = inputs.params.beta * (S @ reward)
        value = pair_mean(mx.logaddexp(mx.zeros_like(z), -z), valid)
        on_chosen = mx.abs(S) * batch["pair_chosen"].astype(mx.float32)[None, :]
        chosen = on_chosen @ reward
        metrics = {}
        weight = inputs.params.chosen_nll
        if isinstance(weight, mx.array) or weight:
            per_token = logits_response_ll(inputs.student.logits, batch["labels"], batch["mask"])
            nll = -pair_mean(on_chosen @ per_token, valid)
            value = value + weight * nll
            metrics["chosen_nll"] = nll
        return value, {
            **metrics,
            "reward_accuracy": pair_mean((z > 0).astype(mx.float32), valid),
            "reward_margin": pair_mean(S @ reward, valid),
            "chosen_reward": pair_mean(chosen, valid),
        }
