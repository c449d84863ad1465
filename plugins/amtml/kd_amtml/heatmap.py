"""``kd amtml-heatmap RUN_DIR``: the aggregator's instance weights against data domains.

The run is rebuilt from its resolved spec with its last checkpoint (student and aggregator
parameters) loaded (``app.open_run``), and every val example is scored by the
aggregator. The result is the mean weight of each teacher over the examples of each domain
(a heatmap PNG and a JSON file under ``RUN_DIR/report/``) and the routing accuracy: how
often the largest weight goes to the teacher of the example's domain. Teacher k belongs to
the domain with the same name as its label when every label names a domain, else to
domain k.

``kd report RUN_DIR`` draws the same heatmap into its report for a run whose aggregator
is ``amtml`` (:func:`report_section`, the plugin's ``kd_report_sections``), scoring the
run's ``eval.batches`` val batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kdcore import LossInputs, SpecError, app
from kdcore.app import CheckpointError, write_json


def teacher_labels(spec) -> list[str]:
    labels = []
    for i, ref in enumerate(spec.teachers):
        if ref.label:
            labels.append(ref.label)
        elif ref.path:
            parts = [p for p in Path(ref.path).parts if p not in ("student", ".")]
            labels.append(parts[-1] if parts else f"teacher{i}")
        else:
            labels.append(f"teacher{i}")
    return labels


def domain_of_teacher(labels: list[str], domains: list[str]) -> list[int]:
    """Domain index of each teacher: by name when every label is a domain name, else by
    position."""
    if all(label in domains for label in labels):
        return [domains.index(label) for label in labels]
    return list(range(len(labels)))


def instance_weights(
    run_dir: str | Path, batches: int | None = None, split: str = "val"
) -> dict[str, Any]:
    """Per-example teacher weights [N, K] and domains [N] of a finished multi-teacher run,
    with the per-domain mean matrix and the routing accuracy."""
    run = app.open_run(run_dir)  # rebuilt, with the last checkpoint's weights
    if not run.teachers:
        raise SpecError("the run has no teachers: nothing was aggregated")
    aggregator = getattr(run.trainable, "aggregator", run.aggregator)
    if hasattr(aggregator, "eval"):
        aggregator.eval()  # score with the trained statistics; do not update them
    domains = getattr(run.dataset, "domain_names", None)
    all_w, all_d = [], []
    for batch_np in run.dataset.batches(run.spec.train.batch_size, split, batches):
        if "domain" not in batch_np:
            raise SpecError(
                f"dataset {run.spec.data.name!r} gives no 'domain' ids; use the 'mixture' dataset"
            )
        batch = {k: mx.array(v) for k, v in batch_np.items()}
        signals = run.teacher_signals(batch)
        out = run.student(batch["input_ids"], capture=run.capture)
        signal = aggregator(signals, LossInputs(student=out, teacher=None, batch=batch))
        K = len(signals)
        B = batch["input_ids"].shape[0]
        w = signal.weights if signal.weights is not None else mx.full((B, K), 1.0 / K)
        if w.ndim == 3:  # per-token weights: average over the loss tokens
            m = batch["mask"][..., None]
            w = (w * m).sum(1) / mx.maximum(m.sum(1), 1.0)
        all_w.append(np.array(w.astype(mx.float32)))
        all_d.append(batch_np["domain"])
    weights = np.concatenate(all_w)
    domain_ids = np.concatenate(all_d).astype(int)
    n_domains = int(domain_ids.max()) + 1
    domains = list(domains) if domains else [f"domain{d}" for d in range(n_domains)]
    labels = teacher_labels(run.spec)
    owner = domain_of_teacher(labels, domains)
    matrix = [
        weights[domain_ids == d].mean(0).tolist()
        if (domain_ids == d).any()
        else [0.0] * len(labels)
        for d in range(len(domains))
    ]
    routed = np.array([owner[k] for k in weights.argmax(1)])
    return {
        "run": str(run_dir),
        "split": split,
        "teachers": labels,
        "domains": domains,
        "teacher_domain": owner,
        "matrix": matrix,
        "examples": {name: int((domain_ids == d).sum()) for d, name in enumerate(domains)},
        "routing_accuracy": float((routed == domain_ids).mean()),
        "mean_weights": weights.mean(0).tolist(),
        "weights": weights,
        "domain_ids": domain_ids,
    }


def plot_heatmap(result: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Rows: domains; columns: teachers; cell: mean instance weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(result["matrix"])
    fig, ax = plt.subplots(
        figsize=(1.6 + 1.3 * matrix.shape[1], 1.2 + 0.7 * matrix.shape[0]), dpi=110
    )
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(matrix.shape[1]), result["teachers"], rotation=20, ha="right")
    ax.set_yticks(range(matrix.shape[0]), result["domains"])
    ax.set_xlabel("teacher")
    ax.set_ylabel("data domain")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            f"{value:.2f}",
            ha="center",
            va="center",
            color="black" if value > 0.6 else "white",
            fontsize=9,
        )
    ax.set_title(
        title or f"mean instance weight (routing acc. {result['routing_accuracy']:.2f})", fontsize=9
    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_json(result: dict[str, Any]) -> dict[str, Any]:
    """The result without the per-example arrays."""
    return {k: v for k, v in result.items() if k not in ("weights", "domain_ids")}


def write_heatmap(result: dict[str, Any], png: str | Path) -> dict[str, Any]:
    """The heatmap PNG at ``png`` and its numbers beside it (same name, ``.json``)."""
    png = plot_heatmap(result, png)
    data = summary_json(result)
    data["png"] = str(png)
    write_json(png.with_suffix(".json"), data)
    return data


def report_section(run_dir: str | Path, figures_dir: str | Path) -> list[str] | None:
    """``kd report``'s section for an ``amtml`` run: the heatmap and the routing accuracy.

    None for any other run. A run the heatmap cannot be made for (no checkpoint, no
    ``domain`` ids in its dataset) gets a section that says why."""
    run_dir, figures_dir = Path(run_dir), Path(figures_dir)
    spec_file = run_dir / "spec.toml"
    if not spec_file.exists() or not (run_dir / "run.json").exists():
        return None
    spec = app.read_config(spec_file, dict)  # the plain tables: no components built
    if spec.get("aggregator", {}).get("name") != "amtml":
        return None
    lines = ["## AMTML instance weights", ""]
    try:
        result = instance_weights(run_dir, batches=spec.get("eval", {}).get("batches"))
    except (CheckpointError, SpecError) as exc:
        return [*lines, f"No heatmap: {exc}", ""]
    png = figures_dir / "amtml_weights.png"
    write_heatmap(result, png)
    examples = sum(result["examples"].values())
    lines += [
        f"![amtml instance weights](report/{png.name})",
        "",
        f"- routing accuracy: {result['routing_accuracy']:.3f} (the largest weight goes to "
        f"the teacher of the example's domain; {result['split']} split, {examples} examples)",
        "",
        "| domain | examples | " + " | ".join(result["teachers"]) + " |",
        "| --- | --- | " + " | ".join("---" for _ in result["teachers"]) + " |",
    ]
    for name, row in zip(result["domains"], result["matrix"], strict=True):
        cells = " | ".join(f"{v:.3f}" for v in row)
        lines.append(f"| {name} | {result['examples'][name]} | {cells} |")
    return lines


def cmd_heatmap(args) -> int:
    run_dir = Path(args.run_dir)
    out = Path(args.output) if args.output else run_dir / "report" / "amtml_weights.png"
    if args.output:  # a file the user named: never the run's own, replaced only with --force
        run_files = [(p, "a file of the run") for p in run_dir.rglob("*") if p.is_file()]
        app.check_output(out, run_files, args.force, "kd amtml-heatmap")
    result = instance_weights(run_dir, batches=args.batches, split=args.split)
    data = write_heatmap(result, out)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    width = max(len(d) for d in result["domains"])
    print(f"{'domain'.ljust(width)}  " + "  ".join(t[:12].rjust(12) for t in result["teachers"]))
    for name, row in zip(result["domains"], result["matrix"]):
        print(f"{name.ljust(width)}  " + "  ".join(f"{v:12.3f}" for v in row))
    print(f"routing accuracy: {result['routing_accuracy']:.3f}")
    print(out)
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "amtml-heatmap",
        help="instance teacher weights against data domains (heatmap PNG + routing accuracy)",
    )
    p.add_argument("run_dir")
    p.add_argument("--batches", type=int, default=None, help="val batches (default: all)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--output", "-o", help="PNG path (default: RUN_DIR/report/amtml_weights.png)")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_heatmap)
