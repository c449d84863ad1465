"""Choose each margin loss's weight on the tune split, never on the held-out one.

    examples/preference/run.sh weights [--out OUT_DIR] [--stem RESULTS_STEM]
        [--seeds 0 1 ...] [--runs student_kd student_rank:0.1 ...] [--split tune|heldout]

Needs ``OUT_DIR/data`` (split.py) and ``OUT_DIR/teacher-dpo`` (run.sh's teacher stages).
Each run is ``kd distill SPEC.toml --set losses.1.weight=W --set run.seed=S`` (the student
specs beside this script; ``student_kd`` has no margin loss and is the reference), then
``kd eval --pairs OUT_DIR/data/SPLIT.jsonl.gz``. Writes ``RESULTS_STEM.json`` and
``RESULTS_STEM.md`` (default ``results/weights`` beside this script) and prints the table.

The rule, with the default ``--split tune``: for each margin loss, the weight with the
highest agreement with the teacher (mean over the seeds), ties to the higher Kendall tau,
then to the earlier weight. About 3.5 minutes a run on two CPU cores; the default grid is
nine runs. ``--split heldout`` only reports (after the choice, to check it at other seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path
from statistics import mean

HERE = Path(__file__).parent

# Each margin loss at its earlier committed weight first, then smaller ones: at the earlier
# weights the margin losses' gradients outweighed the token KL's (results in docs/preference.md).
GRID = {
    "student_kd": [None],
    "student_rank": [20.0, 1.0, 0.1],
    "student_dpkd": [1.0, 0.1],
    "student_safety": [10.0, 1.0, 0.1],
}


def parse_run(text: str) -> tuple[str, float | None]:
    """``student_rank:0.1`` -> (``student_rank``, 0.1); ``student_kd`` -> (``student_kd``, None)."""
    spec, _, weight = text.partition(":")
    if spec not in GRID:
        raise SystemExit(f"unknown student spec {spec!r}; one of {', '.join(GRID)}")
    if (GRID[spec] == [None]) != (not weight):
        raise SystemExit(
            f"{text!r}: give a weight for a margin loss's spec and none for student_kd"
        )
    return spec, float(weight) if weight else None


def label(spec: str, weight: float | None) -> str:
    return spec if weight is None else f"{spec} w{weight:g}"


def run_one(kd: str, out: Path, spec: str, weight: float | None, seed: int, split: str) -> dict:
    run_dir = out / "weights" / f"{label(spec, weight).replace(' ', '-')}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun replaces its runs, as run.sh does
    sets = ["--set", f"run.seed={seed}"]
    if weight is not None:
        sets += ["--set", f"losses.1.weight={weight}"]
    subprocess.run(
        [kd, "distill", str(HERE / f"{spec}.toml"), *sets, "--output", str(run_dir)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    report = json.loads(
        subprocess.run(
            [kd, "eval", str(run_dir), "--pairs", str(out / "data" / f"{split}.jsonl.gz")]
            + ["--batches", "2", "--json"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    pref = report["preference"]
    return {
        "spec": spec,
        "weight": weight,
        "seed": seed,
        "pairs": pref["pairs"],
        "agreeing_pairs": pref["agreeing_pairs"],
        "agreement": pref["agreement"],
        "kendall_tau": pref["kendall_tau"],
        "safety_preservation": pref["safety_preservation"],
        "margin_gap_std": pref["reward_std"],
        "student_accuracy": pref["student_accuracy"],
        "token_kl": report["kl_teacher_student"],
    }


def choose(rows: list[dict]) -> dict[str, float]:
    """Per margin-loss spec, the weight with the best mean agreement (then tau) over seeds."""
    chosen = {}
    for spec in dict.fromkeys(r["spec"] for r in rows if r["weight"] is not None):
        weights = list(dict.fromkeys(r["weight"] for r in rows if r["spec"] == spec))

        def score(weight, spec=spec):
            runs = [r for r in rows if r["spec"] == spec and r["weight"] == weight]
            return (mean(r["agreement"] for r in runs), mean(r["kendall_tau"] for r in runs))

        chosen[spec] = max(weights, key=score)  # max keeps the first of equal scores
    return chosen


def table(rows: list[dict], chosen: dict[str, float], split: str) -> list[str]:
    lines = [
        f"| student | seed | {split} agreement | Kendall tau | safety preservation | "
        "std of m_s - m_t | accuracy | token KL (val) | chosen |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in rows:
        mark = "yes" if r["weight"] is not None and chosen.get(r["spec"]) == r["weight"] else ""
        lines.append(
            f"| {label(r['spec'], r['weight'])} | {r['seed']} | {r['agreement']:.3f} "
            f"({r['agreeing_pairs']}/{r['pairs']}) | {r['kendall_tau']:.3f} | "
            f"{r['safety_preservation']:.3f} | {r['margin_gap_std']:.3f} | "
            f"{r['student_accuracy']:.3f} | {r['token_kl']:.3f} | {mark} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--stem", type=Path, default=HERE / "results" / "weights")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", nargs="+", help="SPEC or SPEC:WEIGHT (default: the grid)")
    parser.add_argument("--split", choices=["tune", "heldout"], default="tune")
    args = parser.parse_args()
    runs = (
        [parse_run(r) for r in args.runs]
        if args.runs
        else [(spec, weight) for spec, weights in GRID.items() for weight in weights]
    )
    for needed in (
        args.out / "data" / f"{args.split}.jsonl.gz",
        args.out / "teacher-dpo" / "student",
    ):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run examples/preference/run.sh first")
    kd = os.environ.get("KD", "kd")
    rows = [
        run_one(kd, args.out, spec, weight, seed, args.split)
        for spec, weight in runs
        for seed in args.seeds
    ]
    chosen = choose(rows) if args.split == "tune" else {}
    args.stem.parent.mkdir(parents=True, exist_ok=True)
    args.stem.with_suffix(".json").write_text(
        json.dumps({"split": args.split, "chosen": chosen, "runs": rows}, indent=2) + "\n"
    )
    lines = table(rows, chosen, args.split)
    if chosen:
        rule = "per margin loss, the highest tune agreement (mean over seeds), then tau"
        lines += ["", f"Rule: {rule}."]
    args.stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
