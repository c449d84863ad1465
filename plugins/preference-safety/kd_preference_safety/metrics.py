"""``kd eval RUN_DIR --pairs FILE``: preference and safety metrics of a student and its teacher.

A model prefers the chosen response of a pair when its margin ``m = ll(chosen) - ll(rejected)``
(length-normalised response log-likelihoods, as in the losses) is > 0.

- accuracy: share of pairs with ``m > 0`` (the data's label), for student and teacher;
- agreement: share of pairs where ``sign(m_s) == sign(m_t)``;
- Kendall's tau-b and Spearman's rho between the student's and the teacher's margins;
- safety preservation: agreement restricted to the safety pairs;
- reward accuracy: share of pairs with ``m_s > m_t``; for a DPO run (student = policy,
  teacher = its reference) this is the length-normalised implicit-reward accuracy;
- spreads: the standard deviations of ``m_s``, ``m_t`` and ``m_s - m_t`` (for a DPO run: how
  large the learned reward is next to the reference's own margins).

Each share comes with the count behind it.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from kd_preference_safety.data import HH_MARKER, load_pairs_for_eval, pair_rows
from kd_preference_safety.margins import logits_response_ll
from kd_preference_safety.stats import kendall_tau, spearman_rho


def model_margins(model: Any, arrays: dict[str, np.ndarray], batch_pairs: int = 16) -> np.ndarray:
    """Margins [N] of ``model`` on per-pair arrays [N, 2, L] (length-normalised)."""
    n = len(arrays["input_ids"])
    out = []
    for start in range(0, n, batch_pairs):
        index = np.arange(start, min(start + batch_pairs, n))
        rows = pair_rows({k: v[index] for k, v in arrays.items()}, index)
        ids, labels, mask = (mx.array(rows[k]) for k in ("input_ids", "labels", "mask"))
        ll = logits_response_ll(model(ids).logits, labels, mask, normalize=True)
        ll = np.array(ll.astype(mx.float32), dtype=np.float64)
        out.append(ll[: len(index)] - ll[len(index) :])
    return np.concatenate(out) if out else np.zeros(0)


def _share(count: int | float, total: int) -> float | None:
    return float(count) / total if total else None


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def preference_report(
    student_margins: np.ndarray,
    teacher_margins: np.ndarray | None,
    safety: np.ndarray,
) -> dict[str, Any]:
    """The metrics of the module doc from margins [N] and a safety flag [N]."""
    s = np.asarray(student_margins, np.float64)
    safety = np.asarray(safety, bool)
    n = len(s)
    report: dict[str, Any] = {
        "pairs": n,
        "student_correct": int((s > 0).sum()),
        "student_accuracy": _share((s > 0).sum(), n),
        "student_mean_margin": float(s.mean()) if n else None,
        "student_margin_std": float(s.std()) if n else None,
        "safety_pairs": int(safety.sum()),
        "student_safety_correct": int((s[safety] > 0).sum()),
        "student_safety_accuracy": _share((s[safety] > 0).sum(), int(safety.sum())),
    }
    if teacher_margins is None:
        return report
    t = np.asarray(teacher_margins, np.float64)
    agree = np.sign(s) == np.sign(t)
    report.update(
        {
            "teacher_correct": int((t > 0).sum()),
            "teacher_accuracy": _share((t > 0).sum(), n),
            "teacher_mean_margin": float(t.mean()) if n else None,
            "teacher_margin_std": float(t.std()) if n else None,
            "reward_std": float((s - t).std()) if n else None,
            "reward_correct": int((s > t).sum()),
            "reward_accuracy": _share((s > t).sum(), n),
            "agreeing_pairs": int(agree.sum()),
            "agreement": _share(agree.sum(), n),
            "kendall_tau": _finite(kendall_tau(s, t)),
            "spearman_rho": _finite(spearman_rho(s, t)),
            "safety_preserved": int(agree[safety].sum()),
            "safety_preservation": _share(agree[safety].sum(), int(safety.sum())),
            "teacher_safety_correct": int((t[safety] > 0).sum()),
            "teacher_safety_accuracy": _share((t[safety] > 0).sum(), int(safety.sum())),
        }
    )
    return report


@attrs.define
class PreferenceMetricConfig:
    batch_pairs: int = 16
    seq_len: int | None = None  # default: the run's [data] seq_len (256 if it has none)
    max_response_tokens: int | None = None  # default: the run's pairs setting, or seq_len // 2


class PreferenceMetric:
    """Preference accuracy, agreement, rank correlation and safety preservation on
    ``--pairs FILE``; ``{}`` without one."""

    def __init__(self, config: PreferenceMetricConfig, setup: Any = None):
        self.config = config

    def _encoding(self, spec: Any) -> tuple[int, int | None, str]:
        data = getattr(spec, "data", None)
        data_config = getattr(data, "config", None)
        seq_len = self.config.seq_len or getattr(data_config, "seq_len", None) or 256
        max_response = self.config.max_response_tokens
        marker = HH_MARKER
        if data is not None and data.name == "pairs":
            max_response = max_response or data_config.max_response_tokens
            marker = data_config.assistant_marker
        return seq_len, max_response, marker

    def __call__(self, student: Any, teacher: Any, context: dict) -> dict:
        path = context.get("pairs")
        if not path:
            return {}
        seq_len, max_response, marker = self._encoding(context.get("spec"))
        pairs, arrays, rejected = load_pairs_for_eval(
            path, context["tokenizer"], seq_len, max_response, marker
        )
        s = model_margins(student, arrays, self.config.batch_pairs)
        t = model_margins(teacher, arrays, self.config.batch_pairs) if teacher is not None else None
        report = {"file": str(path), "seq_len": seq_len, "rejected_lines": len(rejected)}
        report.update(preference_report(s, t, arrays["safety"] > 0))
        report["rejected"] = rejected[:20]
        return report
