"""``kd report``'s section on a routed run (aggregator ``route``): each teacher's share of the
tokens, its loss terms and its top-1 agreement with the student, from ``metrics.jsonl``'s
``route/LABEL/...`` series (their curves are in the report's own plots)."""

from __future__ import annotations

import json
from pathlib import Path


def _series(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the report's own reader names a bad line
        if isinstance(record, dict) and "eval" not in record:
            rows.append(record)
    return rows


def routing_table(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per teacher: ``tokens`` (summed over the logged steps) and, for every other logged
    figure, its mean over those steps weighted by the teacher's tokens in each."""
    table: dict[str, dict[str, float]] = {}
    weights: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            parts = key.split("/", 2)
            if len(parts) != 3 or parts[0] != "route" or parts[2] != "tokens":
                continue
            name, tokens = parts[1], float(value)
            row = table.setdefault(name, {"tokens": 0.0})
            row["tokens"] += tokens
            weights[name] = weights.get(name, 0.0) + tokens
            for other, figure in record.items():
                prefix = f"route/{name}/"
                if other.startswith(prefix) and other != prefix + "tokens":
                    field = other[len(prefix) :]
                    row[field] = row.get(field, 0.0) + tokens * float(figure)
    for name, row in table.items():
        for field in row:
            if field != "tokens":
                row[field] = row[field] / weights[name] if weights[name] else float("nan")
    return table


def routing_section(run_dir: Path, figures_dir: Path) -> list[str] | None:
    """The Markdown lines of the section, or None when the run was not routed."""
    table = routing_table(_series(Path(run_dir)))
    if not table:
        return None
    fields = sorted({f for row in table.values() for f in row} - {"tokens"})
    total = sum(row["tokens"] for row in table.values()) or 1.0
    lines = [
        "## Routing (aggregator `route`)",
        "",
        "Each teacher's tokens over the logged steps, and its figures on its own positions "
        "(means over those steps, weighted by its tokens in each).",
        "",
        "| teacher | tokens | share | " + " | ".join(fields) + " |",
        "| --- | ---: | ---: |" + " ---: |" * len(fields),
    ]
    for name, row in table.items():
        cells = [f"{row.get(f, float('nan')):.4f}" for f in fields]
        share = row["tokens"] / total
        lines.append(f"| {name} | {row['tokens']:,.0f} | {share:.3f} | " + " | ".join(cells) + " |")
    return lines + [""]
