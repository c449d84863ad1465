"""``kd report RUN_DIR``: a short Markdown report with a plot of every logged series.

The training metrics come first (the total loss with its terms in one plot, every other
metric in a plot of its own), then the schedules (the learning rate, scheduled loss weights
and scheduled loss parameters, read from the run's ``spec.toml``), then the evaluations.
Each plot is titled with the full metric names it shows and has a y label, so that
``reverse_kl/temperature`` is never mistaken for the ``reverse_kl`` loss.

Plugins add sections through the ``kd_report_sections`` hook (the AMTML instance-weight
heatmap of kd-amtml, for one). A section that raises is replaced by a line naming the
plugin and the error; with ``KD_STRICT_PLUGINS=1`` the report is still written, then
``write_report`` raises.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path
from typing import Any

from kdcore.errors import CheckpointError, RegistryError, SpecError
from kdcore.registry.manager import get_registry
from kdcore.spec.load import read_spec_file

# Series that are bookkeeping, not curves worth a plot.
_SKIP = {"step", "stage"}

# y labels of the series kdcore itself logs; any other series is labelled with its name.
_YLABELS = {
    "grad_norm": "gradient norm",
    "tokens_per_s": "tokens read / s",
    "loss_tokens_per_s": "loss tokens / s",
    "lr": "learning rate",
    "val_loss": "nats / token",
    "teacher_val_loss": "nats / token",
    "val_ppl": "perplexity",
    "teacher_val_ppl": "perplexity",
    "kl_teacher_student": "KL(teacher || student), nats / token",
    "js": "JS divergence, nats / token",
    "top1_agreement": "fraction of tokens",
    "top5_overlap": "fraction of the top 5",
    "quality_retention": "teacher ppl / student ppl",
}

# A series with this few points gets markers: a line through one point draws nothing, and
# with the default eval settings every eval series is a single point.
_MARKERS_UP_TO = 30


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


def _is_schedule(value: Any) -> bool:
    return isinstance(value, dict) and "schedule" in value


def schedule_keys(run_dir: Path) -> set[str]:
    """The logged keys that are schedules, not measurements: ``lr``, ``weight/LABEL`` of a
    scheduled weight and ``LABEL/FIELD`` of a scheduled loss parameter (the keys the
    engine's ``schedule_values`` logs), from the run's resolved ``spec.toml``. The raw file
    is read, not the spec built, so a report works without the run's plugins installed."""
    keys = {"lr"}
    try:
        losses = json.loads((run_dir / "summary.json").read_text())["losses"]
        return keys.union(*(loss["schedules"] for loss in losses))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a run from before summary.json listed its losses: read its spec
    try:
        data = read_spec_file(run_dir / "spec.toml")
    except (SpecError, OSError, UnicodeDecodeError):
        return keys
    losses = data.get("losses")
    counts: dict[str, int] = {}
    for ref in losses if isinstance(losses, list) else []:
        if not isinstance(ref, dict):
            continue
        # the label rule of kdcore.spec.load.loss_labels, on the plain table
        base = str(ref.get("label") or ref.get("name"))
        counts[base] = counts.get(base, 0) + 1
        label = base if counts[base] == 1 else f"{base}#{counts[base]}"
        if _is_schedule(ref.get("weight")):
            keys.add(f"weight/{label}")
        params = ref.get("params")
        for field, value in (params if isinstance(params, dict) else {}).items():
            if _is_schedule(value):
                keys.add(f"{label}/{field}")
    return keys


def ylabel_of(key: str, schedule: bool = False) -> str:
    if key in _YLABELS:
        return _YLABELS[key]
    if key.startswith("weight/"):
        return "loss weight"
    # LABEL/FIELD: a scheduled parameter is labelled with the field it sets
    return key.rsplit("/", 1)[-1] if schedule else key


def _file_name(prefix: str, key: str) -> str:
    return prefix + re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".png"


def _title(names: list[str], what: str = "") -> str:
    title = ", ".join(names) + (f" ({what})" if what else "")
    return "\n".join(textwrap.wrap(title, 70))


def plot_series(
    steps: list[int],
    series: dict[str, list[float]],
    title: str,
    path: Path,
    *,
    ylabel: str,
) -> None:
    """Plot ``series`` against ``steps`` into ``path``, titled and with a y label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    marker = "o" if len(steps) <= _MARKERS_UP_TO else None
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for name, values in series.items():
        ax.plot(steps, values, label=name, marker=marker, markersize=4)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plots(
    records: list[dict], groups: dict[str, list[str]], figures: Path, prefix: str, what: str = ""
) -> list[str]:
    """Plot each group of keys of ``records`` into ``figures``; the Markdown lines linking
    them. ``prefix`` starts the file names and alt texts; ``what`` ends the titles."""
    lines = []
    for group, members in groups.items():
        rows = [r for r in records if any(m in r for m in members)]
        series = {m: [r.get(m, float("nan")) for r in rows] for m in members}
        if group == "losses":
            ylabel = "loss"
        elif group == "teacher_weight":
            ylabel = "mean teacher weight"
        else:
            ylabel = ylabel_of(group, schedule=what == "schedule")
        file = figures / _file_name(prefix, group)
        plot_series([r["step"] for r in rows], series, _title(members, what), file, ylabel=ylabel)
        lines += [f"![{prefix.replace('_', ' ')}{group}](report/{file.name})", ""]
    return lines


def _group(keys: list[str]) -> dict[str, list[str]]:
    """The total loss with its terms share a plot, as do the teachers' mean weights and a
    routed run's per-teacher figures (one plot a figure); every other series has a plot of
    its own."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        if key == "loss" or key.startswith("loss/"):
            group = "losses"
        elif key.startswith("teacher_weight/"):
            group = "teacher_weight"
        elif key.startswith("route/") and key.count("/") >= 2:
            group = "route/" + key.split("/", 2)[2]  # a routed run: a line per teacher
        else:
            group = key
        groups.setdefault(group, []).append(key)
    return groups


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    summary = {}
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    figures = run_dir / "report"
    figures.mkdir(exist_ok=True)
    keys = sorted(
        {k for r in train for k, v in r.items() if isinstance(v, (int, float))} - _SKIP,
        key=lambda k: (k != "loss", k),
    )
    schedules = schedule_keys(run_dir)
    lines = [f"# Run report: {summary.get('run', run_dir.name)}", ""]
    if summary:
        lines += [
            f"- steps: {summary.get('steps')}",
            f"- wall seconds: {summary.get('wall_seconds', 0):.1f}",
            f"- tokens/s: {summary.get('tokens_per_s') or 0:,.0f} read, "
            f"{summary.get('loss_tokens_per_s') or 0:,.0f} with loss",
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
    lines += _plots(train, _group([k for k in keys if k not in schedules]), figures, "")
    scheduled = [k for k in keys if k in schedules]
    if scheduled:
        lines += ["## Schedules", ""]
        lines += _plots(train, {k: [k] for k in scheduled}, figures, "schedule_", "schedule")
    if evals:
        eval_keys = sorted({k for r in evals for k, v in r["eval"].items() if isinstance(v, float)})
        rows = [{"step": r["step"], **r["eval"]} for r in evals]
        lines += ["## Evaluation", ""]
        groups = {k: [k] for k in eval_keys}
        lines += _plots(rows, groups, figures, "eval_", "eval on the val split")
    sections, failures = get_registry().report_sections(run_dir, figures)
    lines += sections
    out = run_dir / "report.md"
    out.write_text("\n".join(lines).rstrip("\n") + "\n")
    if failures and os.environ.get("KD_STRICT_PLUGINS") == "1":
        failed = "; ".join(f"{f.plugin} ({f.distribution}): {f.error}" for f in failures)
        raise RegistryError(f"report section failed (report written to {out}): {failed}")
    return out
