"""Which loss recipe distils the bundled teacher best? Each recipe trains the demo's student
(distill.toml: same data, model, steps and optimiser) at several seeds and reports the val
loss (nats/byte, cross-entropy on the held-out text) as mean and spread.

    examples/shakespeare/run.sh recipes [--seeds 0 1 2] [--out runs/recipes]

Writes results/recipes.json and results/recipes.md beside this script.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (spec, --set overrides): ce.toml, or hinton.toml (0.5 CE + 0.5 hinton at T = 2)
# with overrides; the last recipe is what distill.toml, the demo's spec, runs.
RECIPES = {
    "ce alone": ("ce.toml", []),
    "0.5 ce + 0.5 hinton T=2": (
        "hinton.toml",
        ["losses.0.weight=0.5", "losses.1.weight=0.5", "losses.1.params.temperature=2.0"],
    ),
    "0.5 ce + 0.5 hinton T=1": (
        "hinton.toml",
        ["losses.0.weight=0.5", "losses.1.weight=0.5", "losses.1.params.temperature=1.0"],
    ),
    "hinton T=1 alone (forward KL)": (
        "hinton.toml",
        ["losses.0.weight=0.0", "losses.1.weight=1.0", "losses.1.params.temperature=1.0"],
    ),
}


def run(spec: str, overrides: list[str], seed: int, out: Path) -> dict:
    args = ["kd", "distill", str(HERE / spec), "--output", str(out), "--set", f"run.seed={seed}"]
    for override in overrides:
        args += ["--set", override]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "val_loss": summary["eval"]["val_loss"],
        "top1_agreement": summary["eval"].get("top1_agreement"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = {}
    for name, (spec, overrides) in RECIPES.items():
        runs = []
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        for seed in args.seeds:
            runs.append({"seed": seed, **run(spec, overrides, seed, args.out / f"{slug}-{seed}")})
            print(f"{name:<32} seed {seed}: val loss {runs[-1]['val_loss']:.4f}", flush=True)
        losses = [r["val_loss"] for r in runs]
        results[name] = {
            "spec": spec,
            "overrides": overrides,
            "runs": runs,
            "mean": statistics.mean(losses),
            "stdev": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        }
    baseline = results["ce alone"]["mean"]
    lines = [
        f"Seeds {', '.join(map(str, args.seeds))}; val loss in nats/byte (lower is better); "
        "the gain is ce alone's mean minus the recipe's.",
        "",
        "| recipe | val loss, mean ± sd | per seed | gain over ce alone |",
        "| --- | ---: | --- | ---: |",
    ]
    for name, r in results.items():
        per_seed = ", ".join(f"{x['val_loss']:.4f}" for x in r["runs"])
        gain = "-" if name == "ce alone" else f"{baseline - r['mean']:+.4f}"
        lines.append(f"| {name} | {r['mean']:.4f} ± {r['stdev']:.4f} | {per_seed} | {gain} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    target = HERE / "results"
    target.mkdir(exist_ok=True)
    wall = time.perf_counter() - started
    (target / "recipes.json").write_text(
        json.dumps({"seeds": args.seeds, "recipes": results, "wall_s": wall}, indent=2) + "\n"
    )
    (target / "recipes.md").write_text(
        "# Loss recipes on the bundled example (`python examples/shakespeare/recipes.py`)\n\n"
        + table
        + f"\nWall time: {wall / 60:.1f} minutes.\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
