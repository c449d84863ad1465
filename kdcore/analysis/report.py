"""``kd report RUN_DIR``: a short Markdown report with a plot of every logged series.

Plugins add sections through the ``kd_report_sections`` hook (the AMTML instance-weight
heatmap of kd-amtml, for one). A section that raises is replaced by a line naming the
plugin and the error; with ``KD_STRICT_PLUGINS=1`` the report is still written, then
``write_report`` raises.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdcore.errors import CheckpointError, RegistryError
from kdcore.registry.manager import get_registry

# Series that are bookkeeping, not curves worth a plot.
_SKIP = {"step", "stage"}


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise CheckpointError(f"{path} not found: not a kd distill run folder")
    train, evals = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}:{number} is not JSON: {exc.msg}") from exc
        (evals if "eval" in record else train).append(record)
    return train, evals


def plot_series(steps, series: dict[str, list[float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for name, values in series.items():
        ax.plot(steps, values, label=name)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    summary = {}
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    figures = run_dir / "report"
    figures.mkdir(exist_ok=True)
    keys = sorted({k for r in train for k, v in r.items() if isinstance(v, (int, float))} - _SKIP)
    groups: dict[str, list[str]] = {}
    for key in keys:
        group = "losses" if key == "loss" or key.startswith("loss/") else key.split("/")[0]
        groups.setdefault(group, []).append(key)
    lines = [f"# Run report: {summary.get('run', run_dir.name)}", ""]
    if summary:
        lines += [
            f"- steps: {summary.get('steps')}",
            f"- wall seconds: {summary.get('wall_seconds', 0):.1f}",
            f"- tokens/s: {summary.get('tokens_per_s') or 0:,.0f}",
            f"- student parameters: {summary.get('student_parameters'):,}",
            f"- teacher parameters: {summary.get('teacher_parameters')}",
            "",
            "## Final evaluation",
            "",
            "| metric | value |",
            "| --- | --- |",
            *[
                f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                for k, v in summary.get("eval", {}).items()
            ],
            "",
        ]
    lines += ["## Curves", ""]
    for group, members in groups.items():
        rows = [r for r in train if any(m in r for m in members)]
        steps = [r["step"] for r in rows]
        series = {m: [r.get(m, float("nan")) for r in rows] for m in members}
        file = figures / f"{group.replace('/', '_')}.png"
        plot_series(steps, series, group, file)
        lines += [f"![{group}](report/{file.name})", ""]
    if evals:
        eval_keys = sorted({k for r in evals for k, v in r["eval"].items() if isinstance(v, float)})
        steps = [r["step"] for r in evals]
        for key in eval_keys:
            file = figures / f"eval_{key}.png"
            plot_series(steps, {key: [r["eval"].get(key, float("nan")) for r in evals]}, key, file)
            lines += [f"![eval {key}](report/{file.name})", ""]
    sections, failures = get_registry().report_sections(run_dir, figures)
    lines += sections
    out = run_dir / "report.md"
    out.write_text("\n".join(lines).rstrip("\n") + "\n")
    if failures and os.environ.get("KD_STRICT_PLUGINS") == "1":
        failed = "; ".join(f"{f.plugin} ({f.distribution}): {f.error}" for f in failures)
        raise RegistryError(f"report section failed (report written to {out}): {failed}")
    return out
