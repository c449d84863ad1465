"""``kd compare``: quality against size and speed across finished runs.

Quality comes from each run's ``summary.json`` (the engine's final evaluation): student
val loss (nats/token), and where the run had a teacher model, quality retention
``exp(teacher_val_loss - val_loss)`` (= teacher perplexity / student perplexity, as
``kd eval`` reports it) and top-1 agreement. Size is the student's parameter count.
Speed is measured here, side by side in one process: forward tokens/s of each saved
student on the same token batch (best of 5 round-robin timings), so runs trained on
different machines compare fairly. Two students of one shape still differ by timing noise.

A run is on the size frontier when no other run has val loss <= and parameters <= with
one of them strictly smaller; likewise on the speed frontier with tokens/s >=.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from kdcore.errors import CheckpointError


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[bool]:
    """For each point, whether no other point is at least as good in every coordinate and
    strictly better in one (``maximize[i]`` says the direction of coordinate ``i``)."""
    signs = [1.0 if up else -1.0 for up in maximize]
    keyed = [[s * v for s, v in zip(signs, p)] for p in points]  # larger is better

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(other, p) for other in keyed if other is not p) for p in keyed]


def _read_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.exists():
        raise CheckpointError(f"{path} not found: not a finished kd distill run")
    summary = json.loads(path.read_text())
    ev = summary.get("eval", {})
    row: dict[str, Any] = {
        "run": summary.get("run", run_dir.name),
        "path": str(run_dir),
        "parameters": summary.get("student_parameters"),
        "steps": summary.get("steps"),
        "val_loss": ev.get("val_loss"),
        "train_tokens_per_s": summary.get("tokens_per_s"),
    }
    teachers = summary.get("teacher_parameters") or []
    if "teacher_val_loss" in ev:
        row["teacher_parameters"] = teachers[0] if teachers else None
        row["teacher_val_loss"] = ev["teacher_val_loss"]
        row["retention"] = math.exp(ev["teacher_val_loss"] - ev["val_loss"])
        row["top1_agreement"] = ev.get("top1_agreement")
        row["kl_teacher_student"] = ev.get("kl_teacher_student")
    return row


def _data_of(run_dir: Path) -> str | None:
    from kdcore.engine.rundir import load_run_spec

    try:
        spec = load_run_spec(run_dir)
    except Exception:  # an old or hand-made run folder: compare it anyway
        return None
    return json.dumps(spec.data.params, sort_keys=True, default=str)


def measure_speed(
    run_dirs: Sequence[Path], batch: int = 8, seq_len: int = 128, rounds: int = 5
) -> list[float]:
    """Forward tokens/s of each run's saved student (or of a model directory) on one shared
    random batch: the best of ``rounds`` timings, taken round-robin so that a burst of load
    hits every model alike."""
    from kdcore.analysis.temperature import load_model_dir

    dirs = [Path(d) for d in run_dirs]
    models = [load_model_dir(d / "student" if (d / "student").is_dir() else d)[0] for d in dirs]
    vocab = min(m(mx.zeros((1, 1), mx.int32)).logits.shape[-1] for m in models)
    limits = [getattr(getattr(m, "config", None), "max_seq_len", seq_len) for m in models]
    length = min([seq_len, *limits])
    ids = mx.random.randint(0, vocab, (batch, length), key=mx.random.key(0)).astype(mx.int32)
    for m in models:
        mx.eval(m(ids).logits)  # warm-up
    best = [math.inf] * len(models)
    for _ in range(rounds):
        for i, m in enumerate(models):
            start = time.perf_counter()
            mx.eval(m(ids).logits)
            best[i] = min(best[i], time.perf_counter() - start)
    return [ids.size / t for t in best]


def compare_runs(run_dirs: Sequence[str | Path], speed: bool = True) -> dict[str, Any]:
    """The table of ``kd compare``: one row per run, frontier membership marked."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise CheckpointError("kd compare needs at least one run folder")
    rows = [_read_run(d) for d in dirs]
    names = [r["run"] for r in rows]
    for row, d in zip(rows, dirs):
        if names.count(row["run"]) > 1:  # same [run] name: tell them apart by folder
            row["run"] = d.name if [x.name for x in dirs].count(d.name) == 1 else str(d)
    if speed:
        for row, tps in zip(rows, measure_speed(dirs)):
            row["tokens_per_s"] = tps
    sizes = [(r["val_loss"], r["parameters"]) for r in rows]
    for row, on in zip(rows, pareto_front(sizes, [False, False])):
        row["size_frontier"] = on
    if speed:
        speeds = [(r["val_loss"], r["tokens_per_s"]) for r in rows]
        for row, on in zip(rows, pareto_front(speeds, [False, True])):
            row["speed_frontier"] = on
    notes = []
    data = {_data_of(d) for d in dirs} - {None}
    if len(data) > 1:
        notes.append("the runs use different [data] sections: their val losses may not compare")
    return {"rows": rows, "notes": notes}


def plot_comparison(report: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = report["rows"]
    panels = [("parameters", "student parameters", "size_frontier", True)]
    if all("tokens_per_s" in r for r in rows):
        panels.append(("tokens_per_s", "student forward tokens/s", "speed_frontier", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), dpi=100)
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (key, label, frontier, lower_better) in zip(axes, panels):
        on = [r for r in rows if r[frontier]]
        off = [r for r in rows if not r[frontier]]
        if off:
            ax.scatter(
                [r[key] for r in off], [r["val_loss"] for r in off], c="gray", label="dominated"
            )
        ax.scatter(
            [r[key] for r in on],
            [r["val_loss"] for r in on],
            c="C3",
            label="Pareto-optimal",
            zorder=3,
        )
        front = sorted(on, key=lambda r: r[key], reverse=not lower_better)
        ax.step(
            [r[key] for r in front], [r["val_loss"] for r in front], where="post", c="C3", alpha=0.5
        )
        for r in rows:
            ax.annotate(
                r["run"],
                (r[key], r["val_loss"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        if key == "parameters":
            teachers = {
                (r["teacher_parameters"], r["teacher_val_loss"])
                for r in rows
                if r.get("teacher_parameters")
            }
            for tp, tl in teachers:
                ax.scatter([tp], [tl], marker="*", s=120, c="C0", label="teacher")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
