"""Distillation quality on a real teacher (SmolLM2-135M-Instruct): the two tables of
``examples/real_quality`` and the figures ``benchmarks/results.json`` keeps of them.

``python -m benchmarks.real_model_quality`` runs both tables' default commands
(``run.sh --table 1``, ``--table 2``; every finished unit is skipped, an interrupted one
resumed), collects them (``run.sh --collect``: ``examples/real_quality/results/`` and the
tables in ``docs/results.md``) and prints one JSON line: the held-out loss of SFT and of
the distilled student (forward KL), the paired bootstrap's p of that comparison, and the
share of the quantization gap each method recovers, by bits. From nothing that is about
eight hours on a 2-core machine (the example's README, "Budget"); with the units done, a
second. ``--collect-only`` skips the training and reports what is there, with the units
still missing named in ``missing``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "real_quality"


def _run(*args: str) -> None:
    subprocess.run(["bash", str(EXAMPLE / "run.sh"), *args], cwd=ROOT, check=True)


def real_model_quality(collect_only: bool = False) -> dict:
    """Run what is missing of the two tables, collect them, and return the section."""
    if not collect_only:
        _run("--table", "1")
        _run("--table", "2")
    _run("--collect")
    summary = json.loads((EXAMPLE / "results" / "summary.json").read_text())
    quantization = {
        bits: {f"{method}_gap_recovered": share for method, share in methods.items()}
        for bits, methods in summary["quantization"].items()
    }
    return {
        "sft_val_loss": summary["sft_val_loss"],
        "kd_val_loss": summary["kd_val_loss"],
        "p_value": summary["p_value"],
        "quantization": quantization,
        "teacher_val_loss": summary["teacher"]["heldout_loss"],
        "complete": not summary["missing"],
        "missing": summary["missing"],
        "budget": summary["budget"],
        "collected": summary["machine"]["time"],
        "tables": "examples/real_quality/results/tables.md",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect-only", action="store_true", help="report the units done")
    args = parser.parse_args()
    print(json.dumps(real_model_quality(args.collect_only)), file=sys.stdout)
