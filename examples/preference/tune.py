"""Choose the DPO stage's settings on the tune split, never on the held-out one.

    examples/preference/run.sh tune [OUT_DIR] [RESULTS_STEM]

Needs ``OUT_DIR/data`` (split.py) and ``OUT_DIR/teacher-sft`` (the SFT stage). Each variant
below is ``kd distill teacher_dpo.toml`` with its overrides, trained on the training pairs,
then ``kd eval --pairs OUT_DIR/data/tune.jsonl.gz``. Writes ``RESULTS_STEM.json`` and
``RESULTS_STEM.md`` (default ``results/tune`` beside this script) and prints the chosen variant.

The rule: among the variants whose val loss stays within
``MAX_VAL_LOSS_RISE`` nats/byte of the SFT teacher's (DPO that lowers the likelihood of
every response has wrecked the language model, whatever its preferences), take the one
with the highest tune accuracy; ties go to the earlier row. About 4 minutes a variant on
two CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
MAX_VAL_LOSS_RISE = 0.5
LR = "train.optimizer.lr"
DPO = "losses.0.params"

# (beta, learning rate, chosen_nll weight, steps); chosen_nll 0 is plain DPO, > 0 is RPO.
# A first round (results/tune_window80.md: 11 variants with the 80-byte response window of the
# previous specs) found plain DPO at chance or wrecked and RPO at beta 5 best; this round
# repeats its informative rows with the 176-byte window of the current specs.
GRID = [
    (5.0, "1e-4", 0.0, 240),
    (0.5, "6e-4", 0.0, 240),
    (5.0, "6e-4", 1.0, 240),
    (5.0, "6e-4", 0.5, 240),
    (10.0, "6e-4", 0.5, 240),
]
VARIANTS = {
    f"beta {beta:g}, lr {lr}, chosen_nll {nll:g}, {steps} steps": [
        f"{DPO}.beta={beta}",
        f"{DPO}.chosen_nll={nll}",
        f"{LR}.start={lr}",
        f"{LR}.end={float(lr) / 10:g}",
        f"train.steps={steps}",
    ]
    for beta, lr, nll, steps in GRID
}


def slug(name: str) -> str:
    return re.sub(r"[^0-9a-z.]+", "-", name.lower()).strip("-")


def run_variant(kd: str, out: Path, name: str, overrides: list[str]) -> dict:
    run_dir = out / "tune" / slug(name)
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun replaces its runs, as run.sh does
    sets = [a for o in overrides for a in ("--set", o)]
    subprocess.run(
        [kd, "distill", str(HERE / "teacher_dpo.toml"), *sets, "--output", str(run_dir)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    report = subprocess.run(
        [kd, "eval", str(run_dir), "--pairs", str(out / "data" / "tune.jsonl.gz")]
        + ["--batches", "2", "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    pref = json.loads(report.stdout)["preference"]
    evaluation = json.loads((run_dir / "summary.json").read_text())["eval"]
    return {
        "overrides": overrides,
        "pairs": pref["pairs"],
        "correct": pref["student_correct"],
        "accuracy": pref["student_accuracy"],
        "reference_accuracy": pref["teacher_accuracy"],
        "reward_accuracy": pref["reward_accuracy"],
        "val_loss": evaluation["val_loss"],
        "reference_val_loss": evaluation["teacher_val_loss"],
    }


def choose(rows: dict[str, dict]) -> str:
    intact = {
        name: r
        for name, r in rows.items()
        if r["val_loss"] <= r["reference_val_loss"] + MAX_VAL_LOSS_RISE
    }
    if not intact:
        raise SystemExit(
            f"no DPO variant kept its val loss within {MAX_VAL_LOSS_RISE} of the reference's"
        )
    return max(intact, key=lambda name: intact[name]["accuracy"])


def main(out: Path, stem: Path) -> None:
    kd = os.environ.get("KD", "kd")
    rows = {name: run_variant(kd, out, name, overrides) for name, overrides in VARIANTS.items()}
    stem.parent.mkdir(parents=True, exist_ok=True)
    chosen = choose(rows)
    result = {"chosen": chosen, "max_val_loss_rise": MAX_VAL_LOSS_RISE, "runs": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    first = next(iter(rows.values()))
    lines = [
        f"DPO variants on the tune split ({first['pairs']} pairs; the SFT reference scores "
        f"{first['reference_accuracy']:.3f}, val loss {first['reference_val_loss']:.3f}). "
        f"Rule: highest accuracy among val loss <= reference + {MAX_VAL_LOSS_RISE}.",
        "",
        "| DPO variant | tune accuracy | reward accuracy | val loss | chosen |",
        "| --- | ---: | ---: | ---: | :---: |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['accuracy']:.3f} ({r['correct']}/{r['pairs']}) | "
            f"{r['reward_accuracy']:.3f} | {r['val_loss']:.3f} | "
            f"{'yes' if name == chosen else ''} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "out"
    main(out_dir, Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "results" / "tune")
