"""Rank correlations and preference metrics against values computed by hand."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from kd_preference_safety import kendall_tau, spearman_rho
from kd_preference_safety.data import encode_pairs, read_pairs
from kd_preference_safety.metrics import (
    PreferenceMetric,
    PreferenceMetricConfig,
    model_margins,
    preference_report,
)
from kd_preference_safety.stats import average_ranks

from kdcore.app import ByteTokenizer, load_model


def test_kendall_tau_by_hand():
    # x increasing; y = 3 1 2 5 4: concordant 7 pairs, discordant 3 (1-2, 1-3, 4-5)
    assert kendall_tau([1, 2, 3, 4, 5], [3, 1, 2, 5, 4]) == pytest.approx(0.4)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_kendall_tau_b_with_ties_by_hand():
    # x = 1 2 2 3, y = 1 3 2 4: C = 5, D = 0, n0 = 6, one pair tied in x, none in y
    assert kendall_tau([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(5 / math.sqrt(5 * 6))
    # chunking does not change the count
    assert kendall_tau([1, 2, 2, 3], [1, 3, 2, 4], chunk=1) == pytest.approx(5 / math.sqrt(30))


def test_spearman_rho_by_hand():
    # ranks of y = 3 1 2 5 4; d = -2 1 1 -1 1; 1 - 6 * 8 / (5 * 24) = 0.6
    assert spearman_rho([1, 2, 3, 4, 5], [3, 1, 2, 5, 4]) == pytest.approx(0.6)


def test_spearman_rho_with_ties_by_hand():
    # ranks x = 1 2.5 2.5 4, y = 1 3 2 4; centred dot 4.5, norms^2 4.5 and 5
    assert average_ranks(np.array([1, 2, 2, 3])).tolist() == [1, 2.5, 2.5, 4]
    assert spearman_rho([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_constant_input_has_no_correlation():
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman_rho([1, 2, 3], [2, 2, 2]))


def test_preference_report_by_hand():
    s = np.array([0.5, -0.2, 0.1, 0.3])
    t = np.array([0.4, 0.1, -0.3, 0.2])
    safety = np.array([True, True, False, False])
    r = preference_report(s, t, safety)
    assert (r["pairs"], r["student_correct"], r["teacher_correct"]) == (4, 3, 3)
    assert r["student_accuracy"] == 0.75 and r["teacher_accuracy"] == 0.75
    # signs s + - + +, t + + - +: agree on pairs 0 and 3
    assert (r["agreeing_pairs"], r["agreement"]) == (2, 0.5)
    # s - t = .1 -.3 .4 .1: the student's margin is above the teacher's on 3 pairs
    assert (r["reward_correct"], r["reward_accuracy"]) == (3, 0.75)
    # safety pairs 0, 1: the student keeps the teacher's order on pair 0 only
    assert (r["safety_pairs"], r["safety_preserved"], r["safety_preservation"]) == (2, 1, 0.5)
    assert (r["teacher_safety_correct"], r["student_safety_correct"]) == (2, 1)
    # C = 5 (all but pair 1-2), D = 1
    assert r["kendall_tau"] == pytest.approx(4 / 6)
    # ranks s 4 1 2 3, t 4 2 1 3; sum d^2 = 2; 1 - 6 * 2 / (4 * 15)
    assert r["spearman_rho"] == pytest.approx(0.8)
    assert r["student_mean_margin"] == pytest.approx(0.175)
    # population standard deviations: s - t = .1 -.3 .4 .1 has mean .075, squares sum .2475
    assert r["reward_std"] == pytest.approx(math.sqrt(0.2475 / 4))
    assert r["student_margin_std"] == pytest.approx(math.sqrt((0.39 - 4 * 0.175**2) / 4))
    assert r["teacher_margin_std"] == pytest.approx(math.sqrt((0.3 - 4 * 0.1**2) / 4))


def test_report_without_teacher_or_safety_pairs():
    r = preference_report(np.array([1.0, -1.0]), None, np.array([False, False]))
    assert r["student_accuracy"] == 0.5 and "agreement" not in r
    assert r["safety_pairs"] == 0 and r["student_safety_accuracy"] is None


def test_model_margins_are_length_normalised_ll_differences(random_model_dir, explicit_file):
    model, _, _ = load_model(random_model_dir)
    tok = ByteTokenizer()
    pairs, _, _ = read_pairs(explicit_file)
    arrays, _ = encode_pairs(tok, pairs, seq_len=32)
    margins = model_margins(model, arrays, batch_pairs=2)
    for i, pair in enumerate(pairs):
        lls = []
        for response in (pair.chosen, pair.rejected):
            ids = tok.encode(pair.prompt + response)
            logits = np.array(model(mx.array([ids])).logits[0], dtype=np.float64)
            shifted = logits - logits.max(-1, keepdims=True)
            lp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            start = len(tok.encode(pair.prompt))
            lls.append(np.mean([lp[j - 1, ids[j]] for j in range(start, len(ids))]))
        assert margins[i] == pytest.approx(lls[0] - lls[1], abs=1e-4)


def test_metric_is_empty_without_pairs_and_counts_rejected_lines(random_model_dir, mixed_file):
    model, _, _ = load_model(random_model_dir)
    metric = PreferenceMetric(PreferenceMetricConfig(), None)
    context = {"pairs": None, "tokenizer": ByteTokenizer(), "spec": None}
    assert metric(model, model, context) == {}
    report = metric(model, model, {**context, "pairs": str(mixed_file)})
    assert report["pairs"] == 3 and report["rejected_lines"] == 7
    assert report["rejected"][0] == {"line": 3, "reason": report["rejected"][0]["reason"]}
    # a model agrees with itself on every pair
    assert report["agreement"] == 1.0 and report["kendall_tau"] == pytest.approx(1.0)
    assert report["student_accuracy"] == report["teacher_accuracy"]
