"""``kd design``, ``kd temperature`` and ``kd compare``: the analysis commands."""

from __future__ import annotations

import sys
from pathlib import Path

from kdcore.cli.output import _print_json, _table
from kdcore.errors import SpecError


def _number(text: str) -> float:
    """``1e6``, ``250k``, ``1.5M``, ``2B`` -> float."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}
    text = text.strip().replace("_", "").replace(",", "")
    factor = scale.get(text[-1:].lower(), 1.0)
    try:
        return float(text[:-1] if factor != 1.0 else text) * factor
    except ValueError:
        raise SpecError(f"--params takes a count like 250000, 250k or 1.5M, got {text!r}") from None


def cmd_design(args) -> int:
    from kdcore.analysis.design import design_student

    params = None if args.params is None else int(round(_number(args.params)))
    report = design_student(args.teacher, args.compression, params, args.keep)
    if args.json:
        _print_json(report)
        return 0
    t, s = report["teacher"], report["student"]
    shape = lambda x: ", ".join(f"{k} {v}" for k, v in x.items())  # noqa: E731
    print(f"teacher: {t['architecture']}, {t['parameters']:,} parameters ({shape(t['shape'])})")
    print(
        f"student: {s['parameters']:,} parameters ({shape(s['shape'])}); target "
        f"{report['target_parameters']:,} ({report['relative_error']:+.1%}), "
        f"compression {report['compression']:.2f}x, keep {report['keep']}"
    )
    for note in report["notes"]:
        print(f"note: {note}")
    print()
    print(report["toml"], end="")
    return 0


def cmd_temperature(args) -> int:
    from kdcore.analysis.temperature import _is_run_dir, plot_temperatures, temperature_stats

    try:
        temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    except ValueError:
        raise SpecError(
            f"--temperatures takes numbers like 1,2,4,8, got {args.temperatures!r}"
        ) from None
    report = temperature_stats(args.source, args.data, temperatures, args.batches, args.batch_size)
    png = args.png
    if png is None:
        base = Path(args.source) / "analysis" if _is_run_dir(Path(args.source)) else Path(".")
        png = base / "temperature.png"
    report["png"] = str(plot_temperatures(report, png))
    if args.json:
        _print_json(report)
        return 0
    print(
        f"teacher {report['teacher']} on {report['data']}: {report['tokens']} tokens, "
        f"V = {report['vocab_size']} (ln V = {report['max_entropy']:.3f})"
    )
    rows = [
        [
            f"{r['temperature']:g}",
            f"{r['entropy']:.3f}",
            f"{r['support']:.1f}",
            f"{r['top1_mass']:.3f}",
            f"{r['top5_mass']:.3f}",
            f"{r['top10_mass']:.3f}",
        ]
        for r in report["rows"]
    ]
    print(_table(rows, ["T", "entropy", "support", "top1", "top5", "top10"]))
    print(f"plot: {report['png']}")
    return 0


def cmd_compare(args) -> int:
    from kdcore.analysis.compare import compare_runs, plot_comparison

    report = compare_runs(args.runs, speed=not args.no_speed)
    if args.png or not args.json:
        report["png"] = str(plot_comparison(report, args.png or "compare.png"))
    if args.json:
        _print_json(report)
        return 0
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    rows = []
    for r in report["rows"]:
        frontier = [n for n in ("size", "speed") if r.get(f"{n}_frontier")]
        rows.append(
            [
                r["run"],
                fmt(r["parameters"], ","),
                fmt(r.get("tokens_per_s"), ",.0f"),
                fmt(r["val_loss"], ".4f"),
                fmt(r.get("retention"), ".3f"),
                fmt(r.get("top1_agreement"), ".3f"),
                ",".join(frontier) or "-",
            ]
        )
    header = ["run", "params", "tok/s", "val_loss", "retention", "top1", "pareto"]
    print(_table(rows, header))
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"plot: {report['png']}")
    return 0


def add_commands(subparsers) -> None:
    """``kd design``, ``kd temperature`` and ``kd compare``."""
    p = subparsers.add_parser("design", help="a student config of a given size for a teacher")
    p.add_argument("--teacher", required=True, help="the teacher's model folder")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument(
        "--compression", type=float, metavar="R", help="teacher parameters / student parameters"
    )
    size.add_argument("--params", metavar="N", help="student parameters (e.g. 250k, 1.5M)")
    p.add_argument(
        "--keep",
        choices=["depth", "width", "balanced"],
        default="balanced",
        help="what to keep close to the teacher's (default: balanced)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_design)

    p = subparsers.add_parser(
        "temperature", help="teacher entropy, support and top-k mass at each temperature"
    )
    p.add_argument("source", help="a run folder (its teacher) or a teacher model folder")
    p.add_argument("--data", help="a text/JSONL file (default: the run's val split)")
    p.add_argument("--temperatures", default="1,2,4,8")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--png", help="plot file (default RUN/analysis/temperature.png or ./)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_temperature)

    p = subparsers.add_parser("compare", help="quality vs size and speed across runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--png", help="plot file (default ./compare.png; with --json only if given)")
    p.add_argument("--no-speed", action="store_true", help="skip the forward-speed measurement")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)
