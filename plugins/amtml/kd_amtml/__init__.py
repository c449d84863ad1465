"""kdcore plugin kd-amtml: adaptive multi-teacher, multi-level distillation (AMTML-KD).

Components:

- aggregator ``amtml``: learned per-instance teacher weights (latent or attention scorer);
- losses ``amtml`` (soft targets against the integrated target), ``hint`` (FitNets,
  single / all / multi-group, optionally instance-weighted), ``attention_transfer`` and
  ``cka``;
- dataset ``mixture``: several text domains with a ``domain`` id per example;
- command ``kd amtml-heatmap RUN_DIR``: instance weights against domains;
- report section: ``kd report RUN_DIR`` of an ``amtml`` run includes that heatmap.
"""

from __future__ import annotations

import kdcore
from kd_amtml.aggregator import Amtml, AmtmlConfig, amtml_aggregator
from kd_amtml.data import MixtureConfig, MixtureDataset
from kd_amtml.losses import (
    AmtmlLossConfig,
    AttentionTransferConfig,
    CkaConfig,
    Hint,
    HintConfig,
    amtml_loss,
    attention_transfer_loss,
    cka_loss,
    hint_loss,
    linear_cka,
)

__all__ = [
    "Amtml",
    "AmtmlConfig",
    "AmtmlLossConfig",
    "AttentionTransferConfig",
    "CkaConfig",
    "Hint",
    "HintConfig",
    "MixtureConfig",
    "MixtureDataset",
    "linear_cka",
]


@kdcore.hookimpl
def kd_teacher_aggregators():
    return [
        kdcore.Component(
            "amtml",
            amtml_aggregator,
            AmtmlConfig,
            doc="AMTML-KD learned per-instance teacher weights (latent or attention scorer)",
        )
    ]


@kdcore.hookimpl
def kd_losses():
    return [
        kdcore.Component(
            "amtml",
            amtml_loss,
            AmtmlLossConfig,
            requires={"teacher", "dense_teacher"},
            properties={"zero_at_identity", "shift_invariant"},
            doc="T^2 KL to the integrated soft target sum_k mu_k softmax(z_k/T), + L2 of amtml",
        ),
        kdcore.Component(
            "hint",
            hint_loss,
            HintConfig,
            requires={"teacher", "hidden_states"},
            doc="FitNets hints with a learned projection; single, all or multi-group teachers",
        ),
        kdcore.Component(
            "attention_transfer",
            attention_transfer_loss,
            AttentionTransferConfig,
            requires={"teacher", "attentions"},
            properties={"zero_at_identity", "shift_invariant"},
            doc="KL (or MSE) between attention maps, teacher heads grouped or repeated",
        ),
        kdcore.Component(
            "cka",
            cka_loss,
            CkaConfig,
            requires={"teacher", "hidden_states"},
            properties={"zero_at_identity", "shift_invariant"},
            doc="1 - linear CKA between student and teacher hidden states of any widths",
        ),
    ]


@kdcore.hookimpl
def kd_datasets():
    return [
        kdcore.Component(
            "mixture",
            MixtureDataset,
            MixtureConfig,
            doc="several text files (domains) mixed; 'domain' id per example",
        )
    ]


@kdcore.hookimpl
def kd_add_commands(subparsers):
    from kd_amtml.heatmap import add_commands

    add_commands(subparsers)


@kdcore.hookimpl
def kd_report_sections(run_dir, figures_dir):
    from kd_amtml.heatmap import report_section

    return report_section(run_dir, figures_dir)
