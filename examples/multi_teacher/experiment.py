"""Measurements for the multi-teacher experiment; ``run.sh`` calls it (see docs/multi_teacher.md).

``python experiment.py select``  evaluates every domain teacher on the mixture's val split,
                                 writes runs/teachers.json and prints the best teacher's name.
``python experiment.py report``  evaluates every student per domain, reads the routing of the
                                 adaptive runs, and writes results/results.json,
                                 results/results.md, results/per_domain.png and
                                 results/routing_amtml*.png (one heatmap per adaptive run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from kd_amtml.heatmap import instance_weights, plot_heatmap, summary_json

import kdcore
from kdcore import app, token_cross_entropy
from kdcore.app import count_parameters, load_model

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
RESULTS = HERE / "results"
DOMAINS = ["shakespeare", "gsm8k", "dialogue"]
STUDENTS = [
    ("ce", "student-ce", "cross-entropy only (no teacher)"),
    ("a", "student-single", "(a) best single teacher"),
    ("b", "student-mean", "(b) mean of 3 teachers"),
    ("c", "student-amtml", "(c) amtml soft targets"),
    ("c+", "student-amtml-gate", "(c+) amtml + gate CE"),
    ("d", "student-amtml-hint", "(d) amtml + gate CE + hints"),
]


def mixture_dataset():
    spec = app.load_spec(HERE / "student_mean.toml")
    setup = kdcore.Setup(base_dir=HERE, seed=spec.run.seed)
    return app.build("dataset", "mixture", setup, **spec.data.params)


def per_domain_loss(model, dataset, batch_size: int = 32) -> dict[str, float]:
    """Mean next-token NLL (nats per byte) of ``model`` on the val split, per domain."""
    nll = np.zeros(len(dataset.domain_names))
    tokens = np.zeros(len(dataset.domain_names))
    for batch in dataset.batches(batch_size, "val"):
        logits = model(mx.array(batch["input_ids"])).logits
        per_token = token_cross_entropy(logits, mx.array(batch["labels"])) * mx.array(batch["mask"])
        rows = np.array(per_token.sum(-1))
        for d in range(len(nll)):
            pick = batch["domain"] == d
            nll[d] += rows[pick].sum()
            tokens[d] += batch["mask"][pick].sum()
    out = {name: float(nll[d] / tokens[d]) for d, name in enumerate(dataset.domain_names)}
    out["mixture"] = float(np.mean([out[name] for name in dataset.domain_names]))
    return out


def select() -> None:
    dataset = mixture_dataset()
    teachers = {}
    for name in DOMAINS:
        model, _, _ = load_model(RUNS / f"teacher-{name}" / "student")
        teachers[name] = per_domain_loss(model, dataset)
        teachers[name]["parameters"] = count_parameters(model)
    (RUNS / "teachers.json").write_text(json.dumps(teachers, indent=2))
    best = min(teachers, key=lambda name: teachers[name]["mixture"])
    print(best)


def _bar_chart(rows: dict[str, dict[str, float]], labels: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*DOMAINS, "mixture"]
    keys = list(rows)
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(7.5, 3.4), dpi=110)
    for i, key in enumerate(keys):
        xs = np.arange(len(groups)) + (i - (len(keys) - 1) / 2) * width
        ax.bar(xs, [rows[key][g] for g in groups], width, label=labels[key])
    low = min(rows[k][g] for k in keys for g in groups)
    high = max(rows[k][g] for k in keys for g in groups)
    ax.set_ylim(low - 0.15 * (high - low) - 0.05, high + 0.05 * (high - low) + 0.02)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("val loss (nats / byte)")
    ax.set_title("student val loss per domain (lower is better)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report() -> None:
    RESULTS.mkdir(exist_ok=True)
    dataset = mixture_dataset()
    teachers = json.loads((RUNS / "teachers.json").read_text())
    best = min(teachers, key=lambda name: teachers[name]["mixture"])
    students, labels, wall = {}, {}, {}
    for key, run, label in STUDENTS:
        model, _, _ = load_model(RUNS / run / "student")
        students[key] = per_domain_loss(model, dataset)
        labels[key] = label.replace("best single teacher", f"best single teacher ({best})")
        summary = json.loads((RUNS / run / "summary.json").read_text())
        wall[key] = summary["wall_seconds"]
        students[key]["parameters"] = count_parameters(model)
    routing = {}
    for key, run in (
        ("c", "student-amtml"),
        ("c+", "student-amtml-gate"),
        ("d", "student-amtml-hint"),
    ):
        result = instance_weights(RUNS / run)
        routing[key] = summary_json(result)
        name = run.replace("student-", "routing_").replace("-", "_")
        title = f"({key}) mean weight per domain, routing acc. {result['routing_accuracy']:.2f}"
        plot_heatmap(result, RESULTS / f"{name}.png", title)
    _bar_chart({k: students[k] for k in students}, labels, RESULTS / "per_domain.png")
    results = {
        "teachers": teachers,
        "best_single_teacher": best,
        "students": students,
        "labels": labels,
        "train_seconds": wall,
        "routing": routing,
        "val_examples_per_domain": dataset.domain_counts("val"),
    }
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "results.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    head = "| model | " + " | ".join(DOMAINS) + " | mixture |"
    rule = "| --- |" + " ---: |" * (len(DOMAINS) + 1)
    lines = [
        "Val loss in nats per byte on the held-out 10% of each domain "
        f"({results['val_examples_per_domain']['shakespeare']} windows of 64 bytes per domain; "
        "mixture = mean of the three).",
        "",
        head,
        rule,
    ]
    for name, row in results["teachers"].items():
        cells = " | ".join(f"{row[d]:.3f}" for d in [*DOMAINS, "mixture"])
        lines.append(f"| teacher {name} | {cells} |")
    for key, row in results["students"].items():
        cells = " | ".join(f"{row[d]:.3f}" for d in [*DOMAINS, "mixture"])
        lines.append(f"| student {results['labels'][key]} | {cells} |")
    lines += ["", "Routing: mean instance weight per domain (rows) and teacher (columns).", ""]
    for key, route in results["routing"].items():
        lines.append(
            f"{results['labels'][key]}: routing accuracy {route['routing_accuracy']:.3f} "
            f"(chance {1 / len(route['teachers']):.3f})"
        )
        lines.append("")
        lines.append("| domain | " + " | ".join(route["teachers"]) + " |")
        lines.append("| --- |" + " ---: |" * len(route["teachers"]))
        for name, row in zip(route["domains"], route["matrix"]):
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "select":
        select()
    elif command == "report":
        report()
    else:
        sys.exit(__doc__)
