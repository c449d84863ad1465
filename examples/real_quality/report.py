"""The tables: every unit's result.json read back, seeds averaged per record, paired
bootstraps over held-out records, ``summary.json`` and ``tables.md``.

    python examples/real_quality/report.py [--quick] [--out DIR]   # = run.py --collect
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    BITS,
    GROUP_SIZE,
    MANIFEST,
    RESULTS,
    T1_ROWS,
    T1_SEEDS,
    T2_DEFAULT,
    T2_DWQ,
    T2_KD,
    T2_ROWS,
    UNITS,
    Budget,
    log,
    machine,
    read_json,
    write_json,
)

BOOTSTRAP_DRAWS = 10_000
DOCS = Path(__file__).resolve().parents[2] / "docs" / "results.md"
BLOCK = ("<!-- real_quality:start -->", "<!-- real_quality:end -->")


# ---------------------------------------------------------------- collecting


def bootstrap(
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    lower_is_better: bool = True,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
) -> dict:
    """Paired bootstrap over records of ``ratio(a) - ratio(b)``, each model's figure a ratio
    of per-record sums (``(sums, tokens)``: a token-weighted mean). ``p``: the one-sided
    p-value of "b is better than a", the share of resamples (plus one, over draws plus one)
    where it is not."""
    (a_num, a_den), (b_num, b_den) = (tuple(np.asarray(x, float) for x in m) for m in (a, b))
    n = len(a_num)
    if n == 0 or len(b_num) != n:
        raise ValueError("a paired bootstrap needs the same records, at least one")
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    diff = a_num[idx].sum(1) / a_den[idx].sum(1) - b_num[idx].sum(1) / b_den[idx].sum(1)
    observed = a_num.sum() / a_den.sum() - b_num.sum() / b_den.sum()
    worse = diff <= 0 if lower_is_better else diff >= 0
    low, high = np.percentile(diff, [2.5, 97.5])
    return {
        "diff": float(observed),
        "ci95": [float(low), float(high)],
        "p": float((worse.sum() + 1) / (draws + 1)),
        "records": n,
    }


def result_files(out: Path, quick: bool) -> dict[str, Path]:
    """Each unit's result: its run folder's, else (full budget) the one kept in
    ``results/units/`` by an earlier machine."""
    stored = [] if quick else UNITS.glob("*/*.json")
    found = {p.relative_to(UNITS).with_suffix("").as_posix(): p for p in stored}
    found.update({p.parent.relative_to(out).as_posix(): p for p in out.glob("*/*/result.json")})
    return dict(sorted(found.items()))


def load_results(out: Path, quick: bool = False) -> list[dict]:
    return [read_json(p) for p in result_files(out, quick).values()]


def seed_mean(units: list[dict], key: str, field: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-record (sums, tokens) of ``key`` (``per_record`` or ``greedy``), averaged over the
    units (the seeds of a row): the pairing unit stays the record."""
    ref = units[0][key]["record"]
    for u in units:
        if u[key]["record"] != ref:
            raise SystemExit(f"{u['row']}: seeds scored on different records; rescore them")
    num = np.mean([u[key][field] for u in units], axis=0)
    den = np.mean([u[key]["tokens"] for u in units], axis=0)
    return num, den


def t1_table(results: list[dict]) -> tuple[dict, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for r in results:
        if "seed" in r and r.get("bits") is None and r["row"] in T1_ROWS:
            rows.setdefault(r["row"], []).append(r)
    table = {}
    for name in (n for n in T1_ROWS if n in rows):
        units = sorted(rows[name], key=lambda u: u["seed"])
        table[name] = row_summary(units)
    comparisons = []
    for base in ("sft", "kd_fkl"):  # every row against SFT, and the others against kd_fkl
        others = [n for n in T1_ROWS if n in rows and n not in ("sft", base)]
        for name in others if base in rows else []:
            comparisons += compare(base, rows[base], name, rows[name])
    return table, comparisons


def row_summary(units: list[dict]) -> dict:
    means = {}
    for figure in ("loss", "kl", "top1"):
        num, den = seed_mean(units, "per_record", "nll" if figure == "loss" else figure)
        means[figure] = float(num.sum() / den.sum())
    num, den = seed_mean(units, "greedy", "nll")
    means["teacher_nll_greedy"] = float(num.sum() / den.sum())
    means["loss_by_source"] = by_source(units)
    main = [u["train"]["main"] for u in units]
    return {
        **means,
        "seeds": [u["seed"] for u in units],
        "per_seed_loss": [u["heldout"]["loss"] for u in units],
        "stopped_share": float(np.mean([u["greedy"]["stopped_share"] for u in units])),
        "mean_answer_tokens": float(np.mean([u["greedy"]["mean_length"] for u in units])),
        "train_wall_s": float(
            np.mean([sum(p["wall_seconds"] for p in u["train"].values()) for u in units])
        ),
        "tokens_per_s": float(np.mean([m["tokens_per_s"] for m in main])),
        "peak_memory_bytes": max(m["peak_memory_bytes"] or 0 for m in main),
        "steps": units[0]["budget"]["steps"],
        "tokens": units[0]["budget"]["tokens"],
        "heldout_records": units[0]["heldout"]["records"],
        "heldout_tokens": units[0]["heldout"]["tokens"],
        "greedy_prompts": len(units[0]["greedy"]["record"]),
    }


def by_source(units: list[dict]) -> dict[str, float]:
    """Held-out loss of GSM8K and of HH records apart (``manifest.json``: GSM8K first)."""
    gsm = read_json(MANIFEST)["heldout"]["gsm8k"]
    num, den = seed_mean(units, "per_record", "nll")
    is_gsm = np.array(units[0]["per_record"]["record"]) < gsm
    out = {}
    for name, pick in (("gsm8k", is_gsm), ("hh", ~is_gsm)):
        if pick.any():
            out[name] = float(num[pick].sum() / den[pick].sum())
    return out


def compare(base: str, a: list[dict], name: str, b: list[dict]) -> list[dict]:
    """Paired bootstraps of row ``name`` against row ``base`` on every held-out figure."""
    out = []
    for figure, key, field, lower in (
        ("loss", "per_record", "nll", True),
        ("kl", "per_record", "kl", True),
        ("top1", "per_record", "top1", False),
        ("teacher_nll_greedy", "greedy", "nll", True),
    ):
        test = bootstrap(seed_mean(a, key, field), seed_mean(b, key, field), lower)
        out.append({"a": base, "b": name, "figure": figure, **test})
    return out


def t2_table(results: list[dict], teacher_loss: float | None) -> tuple[dict, dict, list]:
    by: dict[tuple[int, str], list[dict]] = {}
    for r in results:
        if r.get("bits") is not None:
            by.setdefault((r["bits"], r["row"]), []).append(r)
    table, gaps, tests = {}, {}, []
    for bits in sorted({b for b, _ in by}):
        rtn = by.get((bits, "rtn"))
        rtn_loss = rtn[0]["heldout"]["loss"] if rtn else None
        table[str(bits)], gaps[str(bits)] = {}, {}
        for method in (m for m in T2_ROWS if (bits, m) in by):
            units = sorted(by[(bits, method)], key=lambda u: u["seed"])
            row = t2_row(units, rtn_loss, teacher_loss)
            table[str(bits)][method] = row
            if method != "rtn" and row["gap_recovered"] is not None:
                gaps[str(bits)][method] = row["gap_recovered"]
        for method in (m for m in T2_KD if (bits, m) in by):
            for other in (m for m in T2_DWQ if (bits, m) in by):
                test = bootstrap(
                    seed_mean(by[(bits, other)], "per_record", "nll"),
                    seed_mean(by[(bits, method)], "per_record", "nll"),
                )
                tests.append({"bits": bits, "a": other, "b": method, "figure": "loss", **test})
    return table, gaps, tests


def t2_row(units: list[dict], rtn_loss: float | None, teacher_loss: float | None) -> dict:
    losses = [u["heldout"]["loss"] for u in units]
    gap = None
    if rtn_loss is not None and teacher_loss is not None and rtn_loss > teacher_loss:
        gap = [(rtn_loss - x) / (rtn_loss - teacher_loss) for x in losses]
    train = [u.get("train") or {} for u in units]
    # the training loop alone (kd's summary, DWQ's timed batches) and the whole process
    # (loading, quantizing, validation and saving too; a resumed kd row: its last call only)
    loop = [t.get("wall_seconds") or t.get("train_s") for t in train]
    process = [t.get("call_s") or t.get("wall_s") for t in train]
    return {
        "loss": float(np.mean(losses)),
        "kl": float(np.mean([u["heldout"]["kl"] for u in units])),
        "top1": float(np.mean([u["heldout"]["top1"] for u in units])),
        "gap_recovered": float(np.mean(gap)) if gap else None,
        "gap_recovered_per_seed": gap,
        "seeds": [u["seed"] for u in units],
        "train_s": mean_or_none(loop),
        "process_s": mean_or_none(process),
        "peak_memory_bytes": max((t.get("peak_memory_bytes") or 0) for t in train) or None,
        "peak_rss_bytes": max((t.get("peak_rss_bytes") or 0) for t in train) or None,
        "model_bytes": units[0]["model_bytes"],
        # as saved: every byte of the weight files (scales, norms) over the teacher's parameters
        "bits_per_weight": units[0]["model_bytes"] * 8 / units[0]["teacher_parameters"],
        "steps": units[0]["budget"]["steps"] if units[0]["row"] != "rtn" else 0,
        "tokens": units[0]["budget"]["tokens"] if units[0]["row"] != "rtn" else 0,
    }


def mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def collect(out: Path, quick: bool, budget: Budget) -> dict:
    results = load_results(out, quick)
    ref = next((r for r in results if r.get("row") == "teacher"), None)
    teacher_loss = ref["heldout"]["loss"] if ref else None
    t1, comparisons = t1_table(results)
    t2, gaps, t2_tests = t2_table(results, teacher_loss)
    headline = next(
        (c for c in comparisons if (c["a"], c["b"], c["figure"]) == ("sft", "kd_fkl", "loss")), None
    )
    cache = next((r for r in results if "top_k" in r), None)
    summary = {
        "sft_val_loss": t1.get("sft", {}).get("loss"),
        "kd_val_loss": t1.get("kd_fkl", {}).get("loss"),
        "p_value": headline["p"] if headline else None,
        "quantization": gaps,
        "teacher": {
            "heldout_loss": teacher_loss,
            "teacher_nll_greedy": ref["greedy"]["teacher_nll"] if ref else None,
        },
        "table1": t1,
        "comparisons": comparisons,
        "table2": t2,
        "table2_tests": t2_tests,
        "budget": {**asdict(budget), "tokens_t1": budget.tokens_t1, "tokens_t2": budget.tokens_t2},
        "cache": {k: cache[k] for k in ("top_k", "bytes", "wall_s")} if cache else None,
        "quick": quick,
        "units": len(results),
        "missing": [] if quick else missing_units(out),
        "machine": {
            **machine(),
            "loads": [
                [r["machine_start"]["loadavg"][0], r["machine_end"]["loadavg"][0]] for r in results
            ],
        },
    }
    target = out / "results" if quick else RESULTS
    write_json(target / "summary.json", summary)
    (target / "tables.md").write_text(render(summary), encoding="utf-8")
    log(f"wrote {target / 'summary.json'} and {target / 'tables.md'}")
    if not quick:
        write_docs_block(render(summary))
    return summary


def missing_units(out: Path) -> list[str]:
    """The units of the two tables' default commands that have no result yet."""
    wanted = ["ref/teacher", "t1/cache"]
    wanted += [f"t1/{row}-s{seed}" for row in T1_ROWS for seed in range(T1_SEEDS.get(row, 1))]
    for bits in BITS:
        wanted += [f"t2/{m}-b{bits}" if m == "rtn" else f"t2/{m}-b{bits}-s0" for m in T2_DEFAULT]
    done = result_files(out, quick=False)
    return [unit for unit in wanted if unit not in done]


def write_docs_block(tables: str) -> None:
    """docs/results.md shows the tables between its markers; the reading around them is
    written by hand."""
    text = DOCS.read_text(encoding="utf-8")
    start, end = text.find(BLOCK[0]), text.find(BLOCK[1])
    if start < 0 or end < start:
        log(f"{DOCS} has no {BLOCK[0]} ... {BLOCK[1]} block: not updated")
        return
    body = tables.split("\n", 1)[1].replace("\n## ", "\n### ")  # under the page's heading
    DOCS.write_text(text[: start + len(BLOCK[0])] + "\n" + body + text[end:], encoding="utf-8")
    log(f"wrote the tables into {DOCS}")


def fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def render(s: dict) -> str:
    b, m = s["budget"], s["machine"]
    loads = [x for pair in m["loads"] for x in pair]
    cache = s["cache"]
    lines = [
        "# Distillation quality on SmolLM2-135M-Instruct" + (" (quick mode)" if s["quick"] else ""),
        "",
        f"Collected {m['time']} on {m['platform']}, {m['nproc']} CPUs; 1-minute load "
        f"{min(loads, default=0):.2f}-{max(loads, default=0):.2f} over the units' starts and ends "
        f"(now {m['loadavg'][0]:.2f}). seq_len {b['seq_len']}, batch {b['batch_size']}.",
        f"Table 1: {b['t1_steps']} steps a row = {b['tokens_t1']:,} student tokens; cache: "
        + (
            f"top-{cache['top_k']} float16, {cache['bytes'] / 1e6:.0f} MB, {cache['wall_s']:.0f} s."
            if cache
            else "not built."
        ),
        f"Table 2: {b['t2_steps']} steps a trained row = {b['tokens_t2']:,} tokens, group size "
        f"{GROUP_SIZE}. Teacher held-out loss {fmt(s['teacher']['heldout_loss'])}, its NLL of its "
        f"own greedy answers {fmt(s['teacher']['teacher_nll_greedy'])}.",
        *(
            ["", f"**Not measured yet** ({len(s['missing'])} units): {', '.join(s['missing'])}."]
            if s.get("missing")
            else []
        ),
        "",
        "## Table 1: half-depth student (15 of 30 layers), healed",
        "",
        "| row | seeds | held-out loss | KL to teacher | top-1 agreement | teacher NLL of greedy "
        "answers | answers ended | train tok/s | train s | peak MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in s["table1"].items():
        lines.append(
            f"| {name} | {len(r['seeds'])} | {r['loss']:.4f} | {r['kl']:.4f} | {r['top1']:.4f} | "
            f"{r['teacher_nll_greedy']:.4f} | {r['stopped_share']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['train_wall_s']:.0f} | {r['peak_memory_bytes'] / 1e6:.0f} |"
        )
    lines += [
        "",
        "Paired bootstrap over held-out records (b - a; p: one-sided, b better):",
        "",
        "| a | b | figure | b - a | 95% CI | p |",
        "| --- | --- | --- | ---: | --- | ---: |",
    ]
    for c in s["comparisons"]:
        lines.append(
            f"| {c['a']} | {c['b']} | {c['figure']} | {-c['diff']:+.4f} | "
            f"[{-c['ci95'][1]:+.4f}, {-c['ci95'][0]:+.4f}] | {c['p']:.4f} |"
        )
    lines += [
        "",
        "## Table 2: quantized students (group size 64)",
        "",
        "| bits | method | seeds | held-out loss | KL | top-1 | gap recovered | train s | "
        "process s | peak MB | bits/weight |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for bits, methods in s["table2"].items():
        for name, r in methods.items():
            peak = r["peak_memory_bytes"]
            lines.append(
                f"| {bits} | {name} | {len(r['seeds'])} | {r['loss']:.4f} | {r['kl']:.4f} | "
                f"{r['top1']:.4f} | {fmt(r['gap_recovered'], '.2f')} | "
                f"{fmt(r['train_s'], '.0f')} | {fmt(r['process_s'], '.0f')} | "
                f"{fmt(peak and peak / 1e6, '.0f')} | "
                f"{r['bits_per_weight']:.2f} |"
            )
    for t in s["table2_tests"]:
        lines.append(
            f"\n{t['bits']} bits, {t['b']} vs {t['a']}: loss {-t['diff']:+.4f} "
            f"[{-t['ci95'][1]:+.4f}, {-t['ci95'][0]:+.4f}], p = {t['p']:.4f}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from common import DEFAULT_OUT, FULL, QUICK

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick mode's units")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the units live")
    args = parser.parse_args(argv)
    out = (args.out / "quick" if args.quick else args.out).resolve()
    collect(out, args.quick, QUICK if args.quick else FULL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
