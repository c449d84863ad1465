"""Collect the `kd eval --pairs` reports of the preference example into JSON and Markdown.

    python examples/preference/report.py OUT_DIR RESULTS_STEM

reads ``OUT_DIR/eval/RUN.json`` (written by run.sh) and ``OUT_DIR/RUN/summary.json`` and
writes ``RESULTS_STEM.json`` and ``RESULTS_STEM.md`` (run.sh: ``out`` and ``results/results``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli is a kdcore dependency there
    import tomli as tomllib

TEACHERS = [("teacher-sft", "teacher after `ce` (SFT)"), ("teacher-dpo", "teacher after `dpo`")]
STUDENTS = [
    (name, None) for name in ("student-kd", "student-rank", "student-dpkd", "student-safety")
]


def fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def losses_label(spec_toml: Path) -> str:
    """``preference_kd + ranking_preservation (weight 0.1)`` from a run's spec.toml."""
    parts = []
    for loss in tomllib.loads(spec_toml.read_text())["losses"]:
        weight = loss.get("weight", 1.0)
        if not isinstance(weight, (int, float)):
            parts.append(f"{loss['name']} (scheduled weight)")
        else:
            parts.append(loss["name"] + ("" if weight == 1 else f" (weight {weight:g})"))
    return " + ".join(parts)


def chance_p_value(correct: int, total: int) -> float:
    """One-sided binomial p-value of ``correct`` or more out of ``total`` under a coin flip."""
    return sum(math.comb(total, k) for k in range(correct, total + 1)) / 2**total


def main(out: Path, stem: Path) -> None:
    runs = {}
    for name, label in TEACHERS + STUDENTS:
        report = json.loads((out / "eval" / f"{name}.json").read_text())
        summary = json.loads((out / name / "summary.json").read_text())
        pref = report["preference"]
        runs[name] = {
            "label": label or losses_label(out / name / "spec.toml"),
            "losses": summary["final_losses"],
            "steps": summary["steps"],
            "train_seconds": round(summary["wall_seconds"], 1),
            "parameters": report["student_parameters"],
            "teacher_parameters": report.get("teacher_parameters"),
            "val_loss": summary["eval"]["val_loss"],
            "token_kl": report.get("kl_teacher_student"),
            "preference": pref,
            "accuracy_p_value": chance_p_value(pref["student_correct"], pref["pairs"]),
        }
    first = runs["student-kd"]["preference"]
    result = {
        "heldout_file": first["file"],
        "heldout_pairs": first["pairs"],
        "heldout_rejected_lines": first["rejected_lines"],
        "safety_pairs": first["safety_pairs"],
        "runs": runs,
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    lines = [
        f"Held-out split: {first['pairs']} pairs ({first['safety_pairs']} safety pairs; "
        f"{first['rejected_lines']} malformed lines reported and skipped).",
        "",
        "| model | parameters | accuracy (chosen preferred) | p vs chance (one-sided) | "
        "safety-pair accuracy | val loss (nats/byte) | reward accuracy | margin std | "
        "reward std |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, _ in TEACHERS:
        r = runs[name]
        p = r["preference"]
        lines.append(
            f"| {r['label']} | {r['parameters']:,} | {fmt(p['student_accuracy'])} "
            f"({p['student_correct']}/{p['pairs']}) | {r['accuracy_p_value']:.3g} | "
            f"{fmt(p['student_safety_accuracy'])} "
            f"({p['student_safety_correct']}/{p['safety_pairs']}) | {fmt(r['val_loss'])} | "
            f"{fmt(p.get('reward_accuracy'))} | {fmt(p['student_margin_std'])} | "
            f"{fmt(p.get('reward_std'))} |"
        )
    lines += [
        "",
        "Reward accuracy and reward std: the DPO policy's margin minus its SFT reference's, i.e. "
        "the length-normalised implicit reward (n/a for the SFT teacher, which has no "
        "reference). Margin std: the spread of the model's own margins.",
    ]
    lines += [
        "",
        "Students distilled from the DPO teacher (teacher accuracy "
        f"{fmt(first['teacher_accuracy'])}):",
        "",
        "| student losses | parameters | accuracy | agreement with teacher | Kendall tau | "
        "Spearman rho | safety preservation | token KL to the teacher (val) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, _ in STUDENTS:
        r = runs[name]
        p = r["preference"]
        lines.append(
            f"| {r['label']} | {r['parameters']:,} | {fmt(p['student_accuracy'])} "
            f"({p['student_correct']}/{p['pairs']}) | {fmt(p['agreement'])} "
            f"({p['agreeing_pairs']}/{p['pairs']}) | {fmt(p['kendall_tau'])} | "
            f"{fmt(p['spearman_rho'])} | {fmt(p['safety_preservation'])} "
            f"({p['safety_preserved']}/{p['safety_pairs']}) | {fmt(r['token_kl'])} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
