"""The table of results/results.md from runs/live and runs/cached (summary.json and
metrics.jsonl of each run)."""

import json
import os
import platform
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def row(name: str) -> str:
    run = HERE / "runs" / name
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    steps = [r["step_s"] for r in records if "step_s" in r]
    step = statistics.median(steps[1:]) if len(steps) > 1 else steps[0]
    return (
        f"| {name} | {len(steps)} | {step:.1f} | {summary['peak_memory_bytes'] / 2**30:.2f} | "
        f"{summary['peak_rss_bytes'] / 2**30:.2f} | {summary['eval']['val_loss']:.3f} |"
    )


if __name__ == "__main__":
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, load average before the "
        f"summary {os.getloadavg()[0]:.1f}; batch 4 x 512 tokens, V = 151,936.",
        "",
        "| teacher | steps | step (s, median after the first) | MLX peak (GiB) | "
        "peak RSS (GiB) | val loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        row("live"),
        row("cached"),
    ]
    out = HERE / "results" / "results.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
