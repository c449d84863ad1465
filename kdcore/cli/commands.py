"""The built-in ``kd`` commands; ``kdcore.builtins.commands`` registers them through
``kd_add_commands`` like any plugin's."""

from __future__ import annotations

import sys
from pathlib import Path

import attrs

from kdcore.cli.output import _print_json, _table
from kdcore.errors import SpecError
from kdcore.registry.components import KINDS
from kdcore.registry.manager import get_registry


def cmd_plugins(args) -> int:
    registry = get_registry()
    dists = registry.distributions()
    failures = [attrs.asdict(f) for f in registry.failures]
    if args.json:
        _print_json({"distributions": dists, "failures": failures})
        return 0
    for name, info in dists.items():
        print(f"{name} {info['version']}")
        for kind, names in info["components"].items():
            print(f"  {kind}: {', '.join(names)}")
    for f in failures:
        print(f"FAILED {f['distribution']} (entry point {f['entry_point']}): {f['error']}")
        if f["traceback"].strip():  # empty when the plugin broke a rule rather than raised
            print("  " + f["traceback"].strip().replace("\n", "\n  "))
    return 0


def cmd_components(args) -> int:
    registry = get_registry()
    kinds = [args.kind] if args.kind else list(KINDS)
    rows = []
    for kind in kinds:
        if kind not in KINDS:
            print(f"error: unknown kind {kind!r}; kinds: {', '.join(KINDS)}", file=sys.stderr)
            return 2
        for reg in registry.entries(kind):
            rows.append([kind, reg.component.name, reg.distribution, reg.component.doc])
    if args.json:
        _print_json([dict(zip(["kind", "name", "distribution", "doc"], r)) for r in rows])
    else:
        print(_table(rows, ["kind", "name", "distribution", "doc"]))
    return 0


def describe(reg) -> dict:
    from kdcore.spec.convert import converter

    component = reg.component
    params = []
    for f in attrs.fields(component.config):
        default = f.default
        if isinstance(default, attrs.Factory):
            default = default.factory() if not default.takes_self else None
        if default is attrs.NOTHING:
            default = "(required)"
        params.append(
            {
                "name": f.name,
                "type": getattr(f.type, "__name__", None) or str(f.type),
                "default": converter.unstructure(default) if default != "(required)" else default,
            }
        )
    return {
        "name": component.name,
        "kind": reg.kind,
        "distribution": reg.distribution,
        "doc": component.doc,
        "requires": sorted(component.requires),
        "properties": sorted(component.properties),
        "parameters": params,
        "details": (getattr(component.factory, "__doc__", None) or "").strip(),
    }


def cmd_explain(args) -> int:
    registry = get_registry()
    found = registry.find(args.name)
    if args.kind:
        found = [r for r in found if r.kind == args.kind]
    if not found:
        every = {n for k in KINDS for n in registry.names(k)}
        from kdcore.registry.manager import unknown_name_message

        print(f"error: {unknown_name_message('component', args.name, every)}", file=sys.stderr)
        return 2
    described = [describe(r) for r in found]
    if args.json:
        _print_json(described if len(described) > 1 else described[0])
        return 0
    for d in described:
        print(f"{d['name']} ({d['kind']}, from {d['distribution']})")
        print(f"  {d['doc']}")
        if d["details"]:
            print("  " + d["details"].replace("\n", "\n  "))
        if d["requires"]:
            print(f"  requires: {', '.join(d['requires'])}")
        if d["properties"]:
            print(f"  properties: {', '.join(d['properties'])}")
        if d["parameters"]:
            print("  parameters:")
            for p in d["parameters"]:
                print(f"    {p['name']}: {p['type']} = {p['default']!r}")
        else:
            print("  parameters: none")
    return 0


def cmd_validate(args) -> int:
    from kdcore.engine.build import check_run
    from kdcore.spec.load import load_spec

    spec = load_spec(args.spec, args.set)
    problems = check_run(spec)  # the checks kd distill runs while building, shared
    if problems:
        raise SpecError(problems, source=args.spec)
    from kdcore.engine.terms import spec_losses

    paths = [(built.label, built.path) for built in spec_losses(spec)]
    dtypes = model_dtypes(spec)
    if args.json:
        from kdcore.spec.load import spec_to_dict

        _print_json({**spec_to_dict(spec), "loss_paths": dict(paths), "dtypes": dtypes})
    else:
        print(f"{args.spec}: ok")
        print("loss paths (fused: with the output heads, chunk by chunk):")
        for label, path in paths:
            print(f"  {label}: {path}")
        print("model dtypes (what each computes in, and why):")
        for label, line in dtypes.items():
            print(f"  {label}: {line}")
    return 0


def model_dtypes(spec) -> dict[str, str]:
    """``{teachers[i] / student: planned dtype line}`` from config and GGUF headers alone
    (the dtype policy of ``kdcore.models.dtype``; no weights are read)."""
    from pathlib import Path

    from kdcore.hub import local_path
    from kdcore.models.dtype import choose_dtype, planned
    from kdcore.models.mlxlm import locate_model

    base = Path(spec.base_dir)

    def headers(named: str) -> Path:
        # a .gguf file is read where it is: validate never imports it
        if str(named).lower().endswith(".gguf"):
            return local_path(named, base)
        return locate_model(named, base)

    out: dict[str, str] = {}
    for i, ref in enumerate(spec.teachers):
        if ref.path and ref.source_name in ("model", "mlx-lm"):
            dtype = (ref.params or {}).get("dtype")
            out[f"teachers[{i}]"] = planned(
                headers(ref.path), dtype, f"$.teachers[{i}].params.dtype"
            )
    model = spec.student.model
    params = model.params or {}
    where = "$.student.model.params.dtype"
    if model.name == "mlx-lm" and params.get("path"):
        out["student"] = planned(headers(params["path"]), params.get("dtype"), where)
    else:  # a fresh model is made in float32
        out["student"] = choose_dtype(params.get("dtype"), {"float32"}, 0, where).describe(
            {"float32"}
        )
    return out


def cmd_distill(args) -> int:
    import shlex

    from kdcore.engine.distill import distill
    from kdcore.errors import RunInterrupted, ServerError

    def resume_line(output: str) -> str:
        sets = [x for s in args.set for x in ("--set", s)]
        command = ["kd", "distill", args.spec, *sets, "--output", output, "--resume"]
        return f"resume with: {shlex.join(command)}"

    try:
        summary = distill(args.spec, overrides=args.set, output=args.output, resume=args.resume)
    except RunInterrupted as stop:
        saved = stop.checkpoint or f"{stop.output}/checkpoints"
        print(f"{stop.signal_name}: stopped at step {stop.step}; saved {saved}", file=sys.stderr)
        print(resume_line(stop.output), file=sys.stderr)
        return stop.exit_code
    except ServerError as exc:
        if exc.output is None:  # before training: nothing to resume
            raise
        print(f"error: {exc}", file=sys.stderr)
        print(resume_line(exc.output), file=sys.stderr)
        return 1
    if args.json:
        _print_json(summary)
    else:
        ev = summary["eval"]
        line = f"done: {summary['steps']} steps, val loss {ev['val_loss']:.4f}"
        line += f" over {ev['tokens']} tokens"
        if "teacher_val_loss" in ev:
            line += f" (teacher {ev['teacher_val_loss']:.4f})"
        print(line + f"; student in {summary['output']}/student")
    return 0


def cmd_eval(args) -> int:
    from kdcore.analysis.evaluate_run import evaluate_run

    if args.positions_out and not args.worst:
        raise SpecError("--positions-out needs --worst N")
    if args.positions_out:  # a file the user named: never an input, replaced only with --force
        from kdcore.cli.outputs import check_output

        run_dir = Path(args.run_dir)
        inputs = [(p, "a file of the run") for p in run_dir.rglob("*") if p.is_file()]
        inputs += [(Path(args.data), "--data")] if args.data else []
        check_output(Path(args.positions_out), inputs, args.force, "kd eval")
    report = evaluate_run(args.run_dir, data=args.data, batches=args.batches, options=vars(args))
    if args.json:
        _print_json(report)
        return 0
    grads = report.pop("grads", None)
    positions = report.pop("positions", None)
    print(f"{report['split']}: {report['tokens']} loss tokens; each figure is a mean over them")
    for key, value in report.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if positions is not None:
        mean, worst = positions["mean"], positions["worst_mean"]
        print(
            f"positions: {positions['written']} worst by {positions['by']} of "
            f"{positions['tokens']} -> {positions['file']}"
        )
        for key in ("kl", "js", "top10"):
            print(f"  {key}: mean {mean[key]:.4f}, worst {worst[key]:.4f}")
    if grads is not None:
        for b in grads["batches"]:
            terms = ", ".join(f"{k} {v:.4f}" for k, v in b["terms"].items())
            print(
                f"grads step {b['step']}: loss {b['loss']:.4f} ({terms}), "
                f"grad norm {b['grad_norm']:.4g}"
            )
        rows = [
            [
                g["group"],
                f"{g['parameters']:,}",
                f"{g['param_norm']:.4g}",
                f"{g['grad_norm']:.4g}" if g["has_grad"] else "frozen",
                f"{g['relative']:.3g}",
                str(g["nan"]),
                str(g["inf"]),
            ]
            for g in grads["groups"]
        ]
        print(_table(rows, ["group", "params", "|w|", "|g| mean", "|g|/|w|", "nan", "inf"]))
        if grads["nonfinite"]:
            print(f"warning: {grads['nonfinite']} non-finite gradient entries")
    return 0


def cmd_report(args) -> int:
    from kdcore.analysis.report import write_report

    path = write_report(args.run_dir)
    print(path)
    return 0


def cmd_data_inspect(args) -> int:
    from kdcore.data.inspect import inspect_data

    report = inspect_data(args.source, args.format, args.limit, args.set)
    if args.json:
        _print_json(report)
    else:
        for key, value in report.items():
            if key == "samples":
                for sample in value:
                    if "error" in sample:
                        print(f"--- line {sample['line']}: {sample['error']}")
                        continue
                    tokens, carried = sample["tokens"], sample["loss_tokens"]
                    where = f"line {sample['line']}, " if "line" in sample else ""
                    cut = f", {sample['cut_tokens']} cut" if sample.get("cut_tokens") else ""
                    print(f"--- sample ({where}{tokens} tokens{cut}, {carried} carry loss)")
                    if "marked" in sample:  # the whole rendering, loss spans in brackets
                        print(sample["marked"][:2000])
                        continue
                    print(f"text:      {sample['text'][:200]!r}")
                    print(f"loss text: {sample['loss_text'][:200]!r}")
            elif key == "rejected":
                print(f"rejected: {report.get('rejected_count', len(value))}")
                for r in value[:20]:
                    print(f"  line {r['line']}: {r['reason']}")
            elif key == "rejected_count":
                continue
            elif key == "stats":
                for split, s in value.items():
                    covered = "" if s["scanned"] == s["of"] else f" (first {s['scanned']})"
                    print(
                        f"{split}: {s['rows']} rows, {s['records']} records{covered}, "
                        f"{s['loss_tokens']} loss tokens, padding {100 * s['padding_share']:.1f}%"
                        f", cut {s['cut_records']} records ({s['cut_tokens']} tokens), "
                        f"overflow {s['overflow_records']} ({s['overflow_tokens']} tokens), "
                        f"refused by the template {s['rejected']}"
                    )
            else:
                print(f"{key}: {value}")
    return 0


def _openblas_kernels() -> str | None:
    """The kernel family of the OpenBLAS in this process (``OPENBLAS_CORETYPE`` or its own
    detection), None when it is not loaded."""
    from kdcore.cli import fastpath

    lib = next((x for x in fastpath.loaded_blas() if x in fastpath.CANDIDATES), None)
    return None if lib is None else fastpath.openblas_core(lib)


def policy_summary() -> str:
    from kdcore.models.dtype import choose_dtype

    choice = choose_dtype(None, {"float16", "bfloat16"})
    shown = choice.dtype or "as stored"
    return f"16-bit checkpoints compute in {shown} here ({choice.reason}); params.dtype overrides"


def cmd_doctor(args) -> int:
    import os
    import platform

    import mlx.core as mx

    from kdcore.cli import fastpath
    from kdcore.engine.heap import heap_status
    from kdcore.kernels.native import install_registered_kernels, row_kernel_status

    install_registered_kernels()  # the kernels a run would install: the registry's

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mlx": getattr(mx, "__version__", "unknown"),
        "device": str(mx.default_device()),
        "metal": bool(getattr(mx, "metal", None) and mx.metal.is_available()),
        "cuda": bool(getattr(mx, "cuda", None) and mx.cuda.is_available()),
        "blas_loaded": fastpath.loaded_blas(),
        "fast_path_available": fastpath.openblas_path(),
        "fast_path_active": fastpath.fast_path_active(),
        "openblas_kernels": _openblas_kernels(),
        "heap": heap_status(),
        "plugins": {k: v["version"] for k, v in get_registry().distributions().items()},
        "plugin_failures": [
            {"distribution": f.distribution, "entry_point": f.entry_point, "error": f.error}
            for f in get_registry().failures
        ],
        "row_kernels": row_kernel_status(),
        "dtype_policy": policy_summary(),
    }
    if args.json:
        _print_json(info)
        return 0
    for key, value in info.items():
        if key == "row_kernels":  # one line per (path, source, detail), not per name
            groups: dict[tuple[str, str, str], list[str]] = {}
            for name, k in value.items():
                groups.setdefault((k["path"], k["source"], k["detail"]), []).append(name)
            print("native kernels (loss rows per token chunk; adam: the optimizer step):")
            for (path, source, detail), names in groups.items():
                origin = f" from {source}" if path == "native" else ""
                print(f"  {path}{origin}: {', '.join(names)}")
                print(f"    {detail}")
            continue
        if key == "plugin_failures":
            print(f"{key}: {len(value)}" + (" (details: kd plugins)" if value else ""))
            for f in value:
                where = f"{f['distribution']} (entry point {f['entry_point']})"
                print(f"  FAILED {where}: {f['error']}")
            continue
        print(f"{key}: {value}")
    # Say what is so in this process and, when it is off, what turned it off.
    if not sys.platform.startswith("linux"):
        pass
    elif info["fast_path_active"]:
        print(f"fast path: OpenBLAS is in use ({info['openblas_kernels']} kernels)")
    elif not info["fast_path_available"]:
        print(
            "hint: OpenBLAS is not installed, so MLX runs on its slow bundled BLAS; "
            "apt-get install libopenblas0-pthread makes matmuls ~30x faster"
        )
    elif os.environ.get("KD_NO_FASTPATH") == "1":
        print("hint: OpenBLAS is installed but not in use: KD_NO_FASTPATH=1 turns it off")
    else:
        print(
            "hint: OpenBLAS is installed but not in use in this process (not started "
            "through `kd`): run it with `python -m kdcore.cli.fastpath -- CMD`"
        )
    return 0


def add_commands(sub) -> None:
    """Add the built-in commands to ``kd``'s sub-parsers."""
    p = sub.add_parser("plugins", help="installed plugin distributions and load failures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("components", help="list components")
    p.add_argument("--kind", help=f"one of: {', '.join(KINDS)}")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_components)

    p = sub.add_parser("explain", help="a component's doc, parameters and requirements")
    p.add_argument("name")
    p.add_argument("--kind")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)

    def spec_args(p):
        p.add_argument("spec", help="TOML or JSON spec file")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a field, e.g. --set train.steps=10 (TOML literal)",
        )

    p = sub.add_parser("validate", help="check a spec; exit 2 listing every problem")
    spec_args(p)
    p.add_argument("--json", action="store_true", help="print the resolved spec")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("distill", help="run a distillation")
    spec_args(p)
    p.add_argument("--output", "-o")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="student vs teacher on held-out data")
    p.add_argument("run_dir")
    p.add_argument(
        "--data",
        help="evaluate on this file instead of the run's val split: text, prompt/response "
        "JSONL (loss on the response), or chat JSONL (messages, prompt/completion or text "
        "records, rendered with the run's chat template, one record a row, loss on the "
        "assistant tokens)",
    )
    p.add_argument(
        "--batches", type=int, help="batches to evaluate (default: the run's eval.batches)"
    )
    p.add_argument("--pairs", help="preference pairs (JSONL) for preference metrics")
    p.add_argument(
        "--grads",
        action="store_true",
        help="gradient norms and NaN/inf counts per parameter group (spec losses)",
    )
    p.add_argument(
        "--grad-batches",
        type=int,
        default=2,
        metavar="N",
        help="training batches for --grads (the run's last N steps)",
    )
    p.add_argument(
        "--worst",
        type=int,
        metavar="N",
        help="write the N positions where student and teacher differ most",
    )
    p.add_argument("--worst-by", choices=["kl", "js", "top10"], default="kl")
    p.add_argument(
        "--positions-out",
        metavar="FILE",
        help="JSONL for --worst (default RUN_DIR/worst_positions.jsonl)",
    )
    p.add_argument("--force", action="store_true", help="replace --positions-out if it exists")
    p.add_argument("--context", type=int, default=48, help="context tokens shown per position")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="Markdown report with loss and schedule plots")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = data_sub.add_parser("inspect", help="how records tokenize and which tokens carry loss")
    q.add_argument("source", help="a spec (uses its [data]) or a data file")
    q.add_argument("--format", help="dataset component for a file (default: by extension)")
    q.add_argument("--limit", type=int, default=3)
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("doctor", help="MLX version, device, BLAS and plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)
