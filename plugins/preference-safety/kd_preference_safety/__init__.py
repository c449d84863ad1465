"""kdcore plugin kd-preference-safety: distil preference rankings and safety margins.

Components: the ``pairs`` dataset; the losses ``preference_kd``, ``ranking_preservation``,
``dpkd``, ``safety_alignment`` and ``dpo``; the ``preference`` metric of ``kd eval --pairs``.
"""

from __future__ import annotations

import kdcore
from kd_preference_safety.data import PairsConfig, PairsDataset, parse_pair, read_pairs
from kd_preference_safety.losses import (
    DPO,
    DPKDConfig,
    DPOConfig,
    MarginConfig,
    PreferenceKDConfig,
    SafetyConfig,
    dpkd,
    preference_kd,
    ranking_preservation,
    safety_alignment,
)
from kd_preference_safety.metrics import PreferenceMetric, PreferenceMetricConfig
from kd_preference_safety.stats import kendall_tau, spearman_rho

__all__ = ["kendall_tau", "parse_pair", "read_pairs", "spearman_rho"]


@kdcore.hookimpl
def kd_datasets():
    return [
        kdcore.Component(
            "pairs",
            PairsDataset,
            PairsConfig,
            doc="chosen/rejected preference pairs (HH or prompt/chosen/rejected JSONL[.gz])",
        )
    ]


@kdcore.hookimpl
def kd_losses():
    margin = {"pairs", "dense_teacher"}
    return [
        kdcore.Component(
            "preference_kd",
            preference_kd,
            PreferenceKDConfig,
            requires={"pairs", "teacher"},
            properties={"zero_at_identity", "shift_invariant"},
            doc="token KL(teacher||student) on chosen and rejected responses",
        ),
        kdcore.Component(
            "ranking_preservation",
            ranking_preservation,
            MarginConfig,
            requires=margin,
            properties={"zero_at_identity", "shift_invariant"},
            doc="MSE between student and teacher preference margins",
        ),
        kdcore.Component(
            "dpkd",
            dpkd,
            DPKDConfig,
            requires=margin,
            properties={"shift_invariant"},
            doc="-log sigmoid(beta (student margin - teacher margin))",
        ),
        kdcore.Component(
            "safety_alignment",
            safety_alignment,
            SafetyConfig,
            requires=margin,
            properties={"zero_at_identity", "shift_invariant"},
            doc="hinge keeping the student's safety-pair gap >= the teacher's",
        ),
        kdcore.Component(
            "dpo",
            DPO,
            DPOConfig,
            requires={"pairs", "reference"},
            properties={"shift_invariant"},
            doc="DPO against a frozen reference model (to train preference teachers)",
        ),
    ]


@kdcore.hookimpl
def kd_metrics():
    return [
        kdcore.Component(
            "preference",
            PreferenceMetric,
            PreferenceMetricConfig,
            doc="preference accuracy, agreement, Kendall/Spearman, safety preservation",
        )
    ]
