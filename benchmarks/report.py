"""Run every benchmark side by side and write results.json and docs/performance.md.

Each section runs in its own process so one's peak memory does not colour another's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, run_isolated

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [
    "bandwidth",
    "losses",
    "kernels",
    "overhead",
    "cache",
    "served",
    "generation",
    "real_vocab",
    "real_model",
    "real_model_breakdown",
    "scaling",
    "blas",
    "quantization",
    "dtype_policy",
]
# Sections only --only runs: hours of training, resumable (their modules say how long).
LONG_SECTIONS = ["real_model_quality"]
# The loss kernels at three vocabulary sizes (tokens, vocab); fewer tokens at 128k keep the
# plain formulations within memory and the section within its budget.
LOSS_SIZES = [(4096, 8192), (2048, 32000), (512, 128000)]
LOSS_REPEATS = 2
# Sections whose script writes its JSON to --out (the others print it), with their budget.
FILE_SECTIONS = {
    "cache": [
        "--teacher",
        str(ROOT / "examples" / "shakespeare" / "teacher"),
        "--max-chars",
        "300000",
        "--steps",
        "120",
        "--eval-batches",
        "8",
    ],
}


def plot(path: Path, xs, series: dict, xlabel: str, ylabel: str, title: str, logx=False) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return f"figures/{path.name}"


def _file_section(section: str, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "out.json"
        run_isolated(section, [*args, "--out", str(target)], expect_json=False)
        return json.loads(target.read_text())


def _loss_reading(sizes: list[dict], kernels: dict | None = None) -> str:
    """One paragraph that summarises the loss tables, every figure taken from them."""
    entries = [(n, e) for size in sizes for n, e in size["losses"].items()]
    memory = [e["ratios"]["peak_extra_ours_over_plain"] for _, e in entries]
    names = list(sizes[0]["losses"])
    speedups = {
        n: [1 / size["losses"][n]["ratios"]["wall_ours_over_plain"] for size in sizes]
        for n in names
    }
    torch = [e["ratios"]["wall_ours_over_torch"] for _, e in entries if "torch" in e]
    threads = [e["torch"]["cpu_s"] / e["torch"]["wall_s"] for _, e in entries if "torch" in e]
    slower = [n for n, values in speedups.items() if min(values) < 1.0]
    speed = ", ".join(f"{n} {min(v):.1f}-{max(v):.1f}x" for n, v in speedups.items())
    text = (
        f"Reading the tables: our kernels hold {min(memory):.0%}-{max(memory):.0%} of the plain "
        f"formulation's extra memory at every size; their speed-up over it is {speed}"
        + (f" (slower somewhere: {', '.join(slower)})." if slower else ".")
    )
    if torch and (kernels or {}).get("path") == "native":
        per_loss = {
            n: [size["losses"][n]["ratios"]["wall_ours_over_torch"] for size in sizes]
            for n in names
            if all("torch" in size["losses"][n] for size in sizes)
        }
        spans = ", ".join(f"{n} {min(v):.2f}-{max(v):.2f}" for n, v in per_loss.items())
        text += (
            f" Ours over PyTorch CPU's wall time: {spans} (below 1: ours is faster). The "
            f"divergences' rows are {kernels['source']}'s native kernels (vectorised, "
            "both cores; the kernels section); bild's top-k terms are MLX element-wise ops, "
            "scalar on one core on this CPU (see the bandwidth section), where PyTorch spends "
            f"{sum(threads) / len(threads):.1f} CPU seconds per wall second."
        )
    elif torch:
        text += (
            f" PyTorch CPU is {min(torch):.1f}-{max(torch):.1f}x faster than ours on wall time: "
            f"it spends {sum(threads) / len(threads):.1f} CPU seconds per wall second (both "
            "cores) with vectorised kernels, while MLX's CPU element-wise kernels run on one "
            "core, scalar (see the bandwidth section), which is also why no MLX variant gets "
            "near the memory bandwidth."
        )
    return text


def loss_lines(r: dict, figures: Path) -> list[str]:
    """The loss-kernel tables per vocabulary, the share of memory bandwidth reached and
    the ours / plain ratios against V."""
    sizes = r["losses"]["sizes"]
    bandwidth = r.get("bandwidth", {}).get("gb_per_s")
    lines = ["## Loss kernels", ""]
    if "kernels" not in r["losses"]:  # results written before the section recorded it
        lines += [
            "These tables were measured with kdcore's pure-MLX row functions, before the "
            "native kd-kernels existed (they record no kernel path); the native rows' "
            "figures are in the kd-kernels section below.",
            "",
        ]
    if bandwidth:
        lines += [
            "*Bandwidth share*: the least traffic a loss needs (read the student and teacher "
            "logits, write the gradient: 3 x N x V x 4 bytes) divided by our wall time, as a "
            f"share of the measured {bandwidth:.1f} GB/s copy bandwidth.",
            "",
            "| V | N | loss | ours wall s | GB/s | bandwidth share |",
            "| ---: | ---: | --- | ---: | ---: | ---: |",
        ]
        for size in sizes:
            moved = 3 * size["tokens"] * size["vocab"] * 4
            for loss, entry in size["losses"].items():
                rate = moved / entry["ours"]["wall_s"] / 1e9
                lines.append(
                    f"| {size['vocab']} | {size['tokens']} | {loss} | "
                    f"{entry['ours']['wall_s']:.2f} | {rate:.2f} | {rate / bandwidth:.1%} |"
                )
        lines.append("")
    lines += [_loss_reading(sizes, r["losses"].get("kernels")), ""]
    vocabs = [size["vocab"] for size in sizes]
    names = list(sizes[0]["losses"])
    memory = plot(
        figures / "losses_memory.png",
        vocabs,
        {
            n: [size["losses"][n]["ratios"]["peak_extra_ours_over_plain"] for size in sizes]
            for n in names
        },
        "vocabulary size",
        "peak+ memory, ours / plain",
        "loss kernels: memory ratio",
        logx=True,
    )
    wall = plot(
        figures / "losses_wall.png",
        vocabs,
        {n: [size["losses"][n]["ratios"]["wall_ours_over_plain"] for size in sizes] for n in names},
        "vocabulary size",
        "wall time, ours / plain",
        "loss kernels: time ratio",
        logx=True,
    )
    lines += [f"![memory ratio]({memory})", "", f"![time ratio]({wall})", ""]
    for size in sizes:
        lines += [f"### V = {size['vocab']}", "", size["markdown"], ""]
    return lines


def cache_lines(c: dict) -> list[str]:
    """Training from the top-k cache vs with the live teacher (benchmarks/cache.py)."""
    step, val, mem, cache = c["step_seconds"], c["val_loss"], c["runs"], c["cache"]
    yes = {True: "met", False: "**missed**"}
    t = c["targets"]
    return [
        "## Offline cache vs live teacher",
        "",
        f"Bundled teacher ({c['teacher']['parameters']:,} parameters, "
        f"{c['teacher_to_student']:.1f}x the student), {c['loss']['name']} "
        f"T={c['loss']['temperature']} + CE, k={cache['k']} {cache['dtype']} cache of "
        f"{cache['tokens']:,} tokens, {mem['online']['steps']} steps each; step times are "
        f"medians of {step['rounds']} interleaved timed steps.",
        "",
        "| | live teacher | top-k cache | ratio | target |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| seconds per step | {step['online']:.3f} | {step['cached']:.3f} | "
        f"**{step['ratio_cached_over_online']:.2f}x** | <= 0.6x, "
        f"{yes[t['cached_step_at_most_0.6x_online']]} |",
        f"| MLX peak memory | {mem['online']['mlx_peak_bytes'] / 2**20:.1f} MiB | "
        f"{mem['cached']['mlx_peak_bytes'] / 2**20:.1f} MiB | "
        f"{c['memory_ratio_cached_over_online']['mlx_peak']:.2f}x | - |",
        f"| bytes per token | {cache['dense_float32_bytes_per_token']} (float32 logits) | "
        f"{cache['bytes_per_token']:.0f} | {1 - cache['storage_saving']:.2f}x | <= 400, "
        f"{yes[t['at_most_400_bytes_per_token_at_k64']]} |",
        f"| student val loss | {val['online']:.4f} | {val['cached']:.4f} | "
        f"{val['cached'] / val['online']:.3f}x | <= 1.02x, "
        f"{yes[t['val_loss_within_2_percent']]} |",
        "",
        f"Writing the cache took {cache['build_seconds']:.0f} s (one teacher pass).",
        "",
    ]


def generation_lines(g: dict) -> list[str]:
    """KV-cache sampling vs the full recompute and vs mlx-lm (benchmarks/generation.py)."""
    yes = {True: "met", False: "**missed**"}
    t, same, q = g["targets"], g["same_tokens"], g["mlx_lm_model"]
    return [
        "## Generation",
        "",
        f"`app.generate`, batch {g['batch']}, greedy, {g['prompt_tokens']}-token prompt and "
        f"{g['new_tokens']} new tokens; tokens per second over the whole call (prompt "
        f"included), medians of {g['rounds']} interleaved runs. KV cache against the full "
        f"recompute (`cache=False`) on the bundled teacher ({g['teacher_parameters']:,} "
        f"parameters), and against mlx-lm's `stream_generate` on the same random Qwen3 "
        f"({q['parameters']:,} parameters, {q['num_hidden_layers']} layers of "
        f"{q['hidden_size']}).",
        "",
        "| model | ours, KV cache | other | ratio | target |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| bundled teacher | {g['kv_tokens_per_s']:.0f} tok/s | "
        f"{g['no_cache_tokens_per_s']:.1f} tok/s (no cache) | "
        f"**{g['kv_over_no_cache']:.1f}x** | >= 5x, {yes[t['kv_at_least_5x_no_cache']]} |",
        f"| Qwen3 (mlx-lm) | {g['kv_mlxlm_tokens_per_s']:.0f} tok/s | "
        f"{g['mlx_lm_tokens_per_s']:.0f} tok/s (mlx_lm) | **{g['kv_over_mlx_lm']:.2f}x** | "
        f">= 0.8x, {yes[t['kv_at_least_0.8x_mlx_lm']]} |",
        "",
        "Same greedy tokens: KV cache and recompute "
        f"{'yes' if same['kv_vs_no_cache'] else '**no**'}; ours and mlx-lm "
        f"{'yes' if same['kv_vs_mlx_lm'] else '**no**'}.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--only", help="comma-separated sections: " + ",".join(SECTIONS + LONG_SECTIONS)
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--docs", default=str(ROOT / "docs" / "performance.md"))
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite the page from results.json"
    )
    args = parser.parse_args()
    if args.render_only:
        results = json.loads(Path(args.out).read_text())
        Path(args.docs).write_text(render(results, Path(args.docs).parent / "figures"))
        return
    began = time.perf_counter()
    chosen = args.only.split(",") if args.only else SECTIONS
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() and args.only else {}
    results["machine"] = machine()
    for section in chosen:
        start = time.perf_counter()
        print(f"[benchmarks] {section} ...", file=sys.stderr, flush=True)
        if section == "losses":
            from kdcore.kernels.native import install_registered_kernels, row_kernel_status

            install_registered_kernels()  # the kernels the "ours" variants install

            # which rows the measured "ours" variants ran (the tables say when it is unknown)
            results[section] = {"sizes": [], "kernels": row_kernel_status()["forward_kl"]}
            for tokens, vocab in LOSS_SIZES:
                size = ["--tokens", str(tokens), "--vocab", str(vocab)]
                args_ = [*size, "--repeats", str(LOSS_REPEATS)]
                results[section]["sizes"].append(_file_section(section, args_))
        elif section in FILE_SECTIONS:
            results[section] = _file_section(section, FILE_SECTIONS[section])
        else:
            results[section] = run_isolated(section, [])
        results[section]["wall_s"] = time.perf_counter() - start
        out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.only:
        results["total_wall_s"] = time.perf_counter() - began
        out.write_text(json.dumps(results, indent=2) + "\n")
    Path(args.docs).write_text(render(results, Path(args.docs).parent / "figures"))
    print(f"wrote {out} and {args.docs}", file=sys.stderr)


def real_vocab_lines(v: dict) -> list[str]:
    """kd distill at V = 151,936 against full-logit loops (benchmarks/real_vocab.py)."""
    s, gib = v["shapes"], 2**30
    yes = {True: "met", False: "**missed**"}
    t = v["targets"]
    torch = v["torch"]
    torch_row = (
        f"| PyTorch {torch.get('torch', '')} + transformers, full logits, `F.kl_div` | "
        f"{torch['step_s']:.1f} | - | {torch['peak_rss_bytes'] / gib:.1f} |"
        if "step_s" in torch
        else f"| PyTorch + transformers | {torch.get('skipped', 'not run')} | | |"
    )
    torch_rows = [torch_row]
    heap = v.get("torch_heap_reuse") or {}
    if "skipped" in heap:
        torch_rows.append(
            f"| the same PyTorch loop with glibc's heap reuse | {heap['skipped']} | | |"
        )
    if "step_s" in heap:
        torch_rows.append(
            f"| the same PyTorch loop with glibc's heap reuse (`MALLOC_MMAP_MAX_=0`, as kd "
            f"sets for itself) | {heap['step_s']:.1f} | - | {heap['peak_rss_bytes'] / gib:.1f} |"
        )
    k4 = v["kd_4x_tokens"]
    return [
        "## Real vocabulary (Qwen3 layout, V = 151,936)",
        "",
        f"`benchmarks/real_vocab.py`: random-weight Qwen3-layout models made offline, teacher "
        f"hidden {s['teacher']}, student hidden {s['student']}, {s['layers']} layers each, "
        f"tied heads of {s['vocab']:,}; batch {s['batch']} x {s['seq']} tokens; 0.5 CE + 0.5 "
        "KL at T = 1, AdamW; step time the median of the steps after the first "
        f"({s['steps']} steps for kd and PyTorch, {s.get('short_steps', s['steps'])} for the "
        "MLX loop and the 4x point); load average "
        + (
            f"{v['load_average_before']:.1f} before the section."
            if "load_average_before" in v
            else f"{v['load_average_after']:.1f} at its end."
        ),
        "",
        "| contender | step (s) | MLX peak (GiB) | peak RSS (GiB) |",
        "| --- | ---: | ---: | ---: |",
        f"| `kd distill` (fused head + loss) | {v['kd_step_s']:.1f} | "
        f"{v['kd_peak_bytes'] / gib:.2f} | {v['kd']['peak_rss_bytes'] / gib:.1f} |",
        *(
            [
                f"| `kd distill` with glibc's default heap (`KD_HEAP=system`) | "
                f"{v['kd_system_heap']['step_s']:.1f} | "
                f"{v['kd_system_heap']['peak_bytes'] / gib:.2f} | "
                f"{v['kd_system_heap']['peak_rss_bytes'] / gib:.1f} |"
            ]
            if "kd_system_heap" in v
            else []
        ),
        f"| hand-written MLX loop, full logits | {v['mlx_full_logits_step_s']:.1f} | "
        f"{v['mlx_full_logits_peak_bytes'] / gib:.2f} | "
        f"{v['mlx_full_logits']['peak_rss_bytes'] / gib:.1f} |",
        *torch_rows,
        f"| `kd distill` at 4x tokens (batch {s['batch'] * 4}) | {k4['step_s']:.1f} | "
        f"{k4['peak_bytes'] / gib:.2f} | {k4['peak_rss_bytes'] / gib:.1f} |",
        "",
        f"kd / MLX loop: peak memory **{v['kd_peak_ratio']:.2f}x** (target <= 0.30x, "
        f"{yes[t['peak_at_most_0.30x_mlx']]}), step time **{v['kd_step_ratio']:.2f}x** "
        f"(target <= 1.0x, {yes[t['step_at_most_1.0x_mlx']]})"
        + (
            f"; kd / PyTorch step time **{v['kd_over_torch_step']:.2f}x** (target <= 0.80x, "
            f"{yes[v['kd_over_torch_step'] <= 0.80]})"
            + (
                f", {v['kd_over_torch_heap_reuse_step']:.2f}x against PyTorch with the heap reuse."
                if v.get("kd_over_torch_heap_reuse_step")
                else "."
            )
            if v.get("kd_over_torch_step")
            else "."
        )
        + f" At 4x the tokens kd's peak grows {v['kd_4x_peak_over_1x']:.2f}x (weights and "
        "optimizer state are most of it; the loss holds one chunk of rows); the full-logit "
        "loops would need about 4x their peak there, more than this machine has, so they run "
        "at the first point only.",
        "",
        *breakdown_lines(v.get("kd_step_breakdown")),
    ]


def preloaded_torch(section: dict) -> list[str]:
    """A caveat for a section measured before PyTorch ran as a user runs it."""
    if section.get("torch_as_users_run_it"):
        return []
    return [
        "*PyTorch's figures in this section were measured with kd's OpenBLAS preloaded "
        "into PyTorch's process too (before commit 24833aa), which slows PyTorch (its "
        "SmolLM2 forward went from 2.7 s to 18 s here): they flatter kd until this section "
        "is run again.*",
        "",
    ]


def real_model_lines(v: dict, b: dict | None) -> list[str]:
    """kd distill on SmolLM2-135M-Instruct against PyTorch (benchmarks/real_model.py), and
    where the time goes (benchmarks/real_model_breakdown.py)."""
    s, gb = v["shapes"], 1e9
    yes = {True: "met", False: "**missed**"}

    def row(name: str, c: dict, mlx: bool = True) -> str:
        if "step_s" not in c:
            return f"| {name} | {c.get('skipped', 'not run')} | | |"
        peak = f"{c['mlx_peak_bytes'] / gb:.2f}" if mlx and "mlx_peak_bytes" in c else "-"
        return f"| {name} | {c['step_s']:.1f} | {peak} | {c['peak_rss_bytes'] / gb:.2f} |"

    torch = v["torch"]
    lines = [
        "## A real model (SmolLM2-135M-Instruct, 30 layers, V = 49,152)",
        "",
        "`benchmarks/real_model.py` (`benchmarks/run --only real_model`): the teacher is "
        "SmolLM2-135M-Instruct imported from its GGUF as float32, the student its first "
        f"{s['student_layers'] // 2 + s['student_layers'] % 2} and last "
        f"{s['student_layers'] // 2} layers ({s['student_layers']} of "
        f"{s['teacher_layers']}); batch {s['batch']} x {s['seq']} tokens of the same rows "
        "for every contender; 0.5 CE + 0.5 KL at T = 1, AdamW; step time the median of "
        f"steps 2-{s['steps']}, each contender in its own process; load average "
        f"{v['load_average_before']:.2f} before the section, {v['load_average_after']:.2f} "
        "after it.",
        "",
        "| contender | step (s) | MLX peak (GB) | peak RSS (GB) |",
        "| --- | ---: | ---: | ---: |",
        row("`kd distill`, live teacher (fused head + loss, native kernels)", v["kd"]),
        row(
            "the same without the layer kernels (`KD_LAYER_KERNELS=off`)",
            v["kd_no_layer_kernels"],
        ),
        row(f"`kd distill` from a top-{s['top_k']} cache of the teacher", v["kd_cache"]),
        row(f"PyTorch {torch.get('torch', '')} + transformers, full logits", torch, False),
        row("the same PyTorch loop with glibc's heap reuse", v["torch_heap_reuse"], False),
        row(f"`kd distill` at 4x the tokens (batch {s['batch'] * 4})", v["kd_4x_tokens"]),
        "",
    ]
    if v.get("kd_vs_torch") is not None:
        heap_ratio = v.get("kd_vs_torch_heap_reuse")
        heap_reuse = (
            f"**{heap_ratio:.2f}x** against PyTorch with the heap reuse (target <= 1.0x, "
            f"{yes[heap_ratio <= 1.0]})"
            if heap_ratio is not None
            else "PyTorch with the heap reuse did not run (its row says why)"
        )
        lines += [
            f"kd / PyTorch step **{v['kd_vs_torch']:.2f}x** (target <= 0.70x, "
            f"{yes[v['kd_vs_torch'] <= 0.70]}), {heap_reuse}; peak RSS "
            f"**{v['kd_rss_vs_torch']:.2f}x** PyTorch's (target <= 0.50x, "
            f"{yes[v['kd_rss_vs_torch'] <= 0.50]}). The layer kernels make kd's step "
            f"{v['layer_kernels_speedup']:.2f}x faster; from the cache the step is "
            f"{v['kd_cache_vs_torch']:.2f}x PyTorch's. First step's loss: kd "
            f"{v['first_loss']['kd']:.5f}, PyTorch {v['first_loss']['torch']:.5f}.",
            "",
        ]
    if b:
        kinds = ["matmuls", "attention", "norms", "rotary", "activations", "copies"]
        kd, pt = b["kd"], b["torch"]
        lines += [
            "Where the step's time goes (`benchmarks/real_model_breakdown.py`, `benchmarks/run "
            "--only real_model_breakdown`; each phase timed alone, median of 3; load average "
            f"{b['load_average_before']:.2f} before it"
            + (
                "; measured in an earlier run, before kd-kernels' flash attention: its "
                "attention row is the native-softmax path"
                if b.get("attention_kernel") != "flash"
                else ""
            )
            + "):",
            "",
            "| phase | kd (s) | PyTorch (s) |",
            "| --- | ---: | ---: |",
            *(
                f"| {name.replace('_', ' ')} | {kd['phases_s'][name]:.2f} | "
                f"{pt['phases_s'][name]:.2f} |"
                for name in kd["phases_s"]
            ),
            f"| sum | {kd['step_s']:.2f} | {pt['step_s']:.2f} |",
            "",
            "Inside the student's layers, by kind of work (kd: one layer's forward and backward "
            "of each kind at the step's shape, times the layers; PyTorch: `torch.profiler` self "
            "CPU time over one student forward and backward):",
            "",
            "| kind | kd (s) | PyTorch (s) |",
            "| --- | ---: | ---: |",
            *(
                f"| {name} | {kd['student_layers_s'][name]:.2f} | "
                f"{pt['student_layers_s'].get(name, 0.0):.2f} |"
                for name in kinds
            ),
            f"| attention, MLX's own softmax | "
            f"{kd['student_layers_s']['attention_without_native_softmax']:.2f} | |",
            f"| SwiGLU, MLX's own silu | "
            f"{kd['student_layers_s']['activations_without_native_swiglu']:.2f} | |",
            f"| allocation | | {pt['student_layers_s'].get('allocation', 0.0):.2f} |",
            f"| other | | {pt['student_layers_s'].get('other', 0.0):.2f} |",
            "",
        ]
    return lines


def breakdown_lines(b: dict | None) -> list[str]:
    """Where a real-vocabulary kd step goes (the part of each, one measured step)."""
    if not b:
        return []
    names = {
        "teacher_forward_s": "teacher forward (layers)",
        "student_forward_s": "student forward (layers)",
        "fused_loss_s": "fused loss: both heads' matmuls, rows, head and hidden gradients",
        "student_backward_s": "student backward through its layers (the rest of the step)",
        "adamw_update_s": "AdamW update",
    }
    rows = [f"| {names[k]} | {v:.2f} | {b['shares'][k]:.0%} |" for k, v in b["parts_s"].items()]
    return [
        f"One kd step ({b['step_s']:.1f} s here) by part, each part timed on its own (so the "
        "parts need not add up to the step; the backward through the layers is what the step "
        "takes beyond the others, 0 when they already exceed it). At this vocabulary the "
        "fused loss, i.e. the two 151,936-wide heads' matrix products forward and backward, "
        "is the step: BLAS throughput, not element-wise work, sets the time here.",
        "",
        "| part | s | share |",
        "| --- | ---: | ---: |",
        *rows,
        "",
    ]


def quantization_lines(q: dict) -> list[str]:
    """A model distilled into its own low-bit version vs mlx-lm's DWQ
    (benchmarks/quantization.py, examples/quantize)."""
    b = q["budget"]

    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    rows = [
        f"| {r['bits'] or '-'} | {r['method']} | {r['val_loss']:.4f} | "
        f"{num(r.get('gap_recovered'), '.2f')} | {num(r.get('step_s'), '.2f')} |"
        for r in q["rows"]
    ]
    return [
        "## Quantized students vs mlx-lm DWQ",
        "",
        f"`examples/quantize/run.py`: a 4-layer mlx-lm llama, then round-to-nearest, "
        f"`mlx_lm dwq` and kdcore's `quantize` student on the same {b['tokens']:,} tokens "
        f"(group size {b['group_size']}), {b.get('seeds', 1)} seed(s), means over them. "
        f"Share of the {q['bits']}-bit quantization gap "
        "recovered, `(rtn - x) / (rtn - fp)` of the held-out loss: kdcore (forward KL) "
        f"**{num(q['kd_gap_recovered'], '.2f')}**, at DWQ's T = 2 "
        f"**{num(q.get('kd_t2_gap_recovered'), '.2f')}**, DWQ "
        f"**{num(q['dwq_gap_recovered'], '.2f')}**.",
        "",
        "| bits | model | val loss | gap recovered | s / step |",
        "| ---: | --- | ---: | ---: | ---: |",
        *rows,
        "",
    ]


def real_model_quality_lines(q: dict) -> list[str]:
    """The quality tables on SmolLM2 (benchmarks/real_model_quality.py): their home is
    docs/results.md; this page keeps the figures results.json holds."""

    def shares(methods: dict) -> str:
        named = [(k.removesuffix("_gap_recovered"), v) for k, v in methods.items()]
        return ", ".join(f"{name} {v:.2f}" for name, v in named if v is not None)

    gaps = "; ".join(f"{bits} bits: {shares(m)}" for bits, m in sorted(q["quantization"].items()))
    state = "all units measured" if q["complete"] else f"{len(q['missing'])} units not measured yet"
    return [
        "## Quality on SmolLM2-135M-Instruct (summary)",
        "",
        f"`benchmarks/run --only real_model_quality` (`examples/real_quality`; {state}; collected "
        f"{q['collected']}; the tables, their tests and machine loads are in docs/results.md): "
        f"held-out loss, SFT {q['sft_val_loss'] or float('nan'):.4f} vs distilled "
        f"{q['kd_val_loss'] or float('nan'):.4f} (p = {q['p_value'] or float('nan'):.4f}); "
        f"quantization gap recovered: {gaps or 'none yet'}.",
        "",
    ]


def provenance_lines(r: dict) -> list[str]:
    """Which run each section comes from, with that run's wall time for the section.

    ``--only`` replaces its sections in results.json and keeps the rest (and the last full
    run's ``total_wall_s``), so the page can combine runs. A full run's total covers every
    section it measured: a total below the sections' sum means some were measured since."""
    measured = [(s, r[s]["wall_s"]) for s in SECTIONS if "wall_s" in r.get(s, {})]
    if not measured:
        return []
    together = sum(wall for _, wall in measured)
    if r.get("total_wall_s", 0) >= together:
        head = (
            f"All sections come from one run of `benchmarks/run`, "
            f"{r['total_wall_s'] / 60:.1f} minutes; each section's part of it:"
        )
    else:
        head = (
            "The sections come from separate runs: `benchmarks/run --only SECTION` measures "
            "one and replaces it in results.json, leaving the others as they were. The wall "
            f"time of each section in the run that measured it ({together / 60:.0f} minutes "
            "in all):"
        )
    return [
        head,
        "",
        "| section | command | wall time |",
        "| --- | --- | ---: |",
        *[f"| {s} | `benchmarks/run --only {s}` | {wall / 60:.1f} min |" for s, wall in measured],
        "",
    ]


def render(r: dict, figures: Path) -> str:
    m = r["machine"]
    lines = [
        "# Performance",
        "",
        "Every figure on this page comes from `benchmarks/run`, which writes",
        "`benchmarks/results.json` and this page. Each section runs in its own process; within",
        "a section the variants run side by side, and figures are ratios between them.",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, MLX {m['mlx']} on {m['device']}, "
        f"OpenBLAS fast path {'on' if m['fast_path_active'] else 'off'}.",
        "",
        *provenance_lines(r),
    ]
    if "bandwidth" in r:
        b = r["bandwidth"]
        lines += [
            "## Memory bandwidth",
            "",
            f"Copying a 256 MiB float32 array (read + write): **{b['gb_per_s']:.1f} GB/s**, "
            "the physical limit for memory-bound kernels. MLX's element-wise kernels on "
            f"this CPU reach {b['mlx_elementwise_gb_per_s']:.2f} GB/s on the same array: "
            "they are scalar on Linux, so losses here are compute-bound, not "
            "memory-bound.",
            "",
        ]
    if "losses" in r and "sizes" in r["losses"]:
        lines += loss_lines(r, figures) + preloaded_torch(r["losses"])
    if "kernels" in r:  # benchmarks/kernels.py
        lines += ["## Native row kernels (kd-kernels)", "", r["kernels"]["markdown"], ""]
        lines += preloaded_torch(r["kernels"])
    if "real_vocab" in r:
        lines += real_vocab_lines(r["real_vocab"]) + preloaded_torch(r["real_vocab"])
    if "real_model" in r:
        lines += real_model_lines(r["real_model"], r.get("real_model_breakdown"))
    if "cache" in r:
        lines += cache_lines(r["cache"])
    if "served" in r:
        from benchmarks.served import markdown_lines

        lines += markdown_lines(r["served"])
    if "generation" in r:
        lines += generation_lines(r["generation"])
    if "quantization" in r:
        lines += quantization_lines(r["quantization"])
    if "real_model_quality" in r:
        lines += real_model_quality_lines(r["real_model_quality"])
    if "overhead" in r:
        o = r["overhead"]
        lines += [
            "## Framework overhead",
            "",
            "One `kd distill` step (bundled example: teacher 128x4, student 80x2, 0.5 CE + "
            "0.5 hinton, batch 16x128) against a hand-written MLX loop training the same "
            "student on the same batches with the same loss; steady-state seconds per step.",
            "",
            "| engine step | minimal loop step | ratio | target |",
            "| --- | --- | --- | --- |",
            f"| {o['engine_step_s']:.3f} s | {o['minimal_step_s']:.3f} s | "
            f"**{o['ratio']:.2f}x** | <= {o['target']:.2f}x |",
            "",
        ]
    if "scaling" in r:
        s = r["scaling"]
        a = plot(
            figures / "scaling_tokens.png",
            s["tokens"],
            {"step": s["step_s_by_tokens"]},
            "tokens per batch",
            "seconds per step",
            "step time vs tokens",
            logx=True,
        )
        b = plot(
            figures / "scaling_vocab.png",
            s["vocabs"],
            {"step": s["step_s_by_vocab"]},
            "vocabulary size",
            "seconds per step",
            "step time vs vocabulary",
            logx=True,
        )
        lines += [
            "## Scaling",
            "",
            "Step time (teacher forward, student forward + backward of CE + hinton, "
            "AdamW) as tokens per batch grow at V=256, and as the vocabulary grows at 512 "
            "tokens per batch. 'ratio to line' divides each time by the least-squares line "
            "a + b x through all points (a: the part of a step that does not grow): 1.0 "
            "everywhere is perfectly linear. R^2: "
            f"{s['tokens_fit'].get('r_squared', float('nan')):.4f} (tokens), "
            f"{s['vocab_fit'].get('r_squared', float('nan')):.4f} (vocabulary).",
            "",
            "| tokens | seconds | ratio to line |",
            "| --- | --- | --- |",
            *[
                f"| {t} | {y:.3f} | {q:.2f} |"
                for t, y, q in zip(
                    s["tokens"], s["step_s_by_tokens"], s["tokens_fit"]["ratio_to_line"]
                )
            ],
            "",
            f"![tokens]({a})",
            "",
            "| vocabulary | seconds | ratio to line |",
            "| --- | --- | --- |",
            *[
                f"| {v} | {y:.3f} | {q:.2f} |"
                for v, y, q in zip(
                    s["vocabs"], s["step_s_by_vocab"], s["vocab_fit"]["ratio_to_line"]
                )
            ],
            "",
            f"![vocabulary]({b})",
            "",
        ]
    if "blas" in r and r["blas"].get("available"):
        bl = r["blas"]
        lines += [
            "## MLX's bundled BLAS vs the OpenBLAS fast path (Linux)",
            "",
            "| | bundled | fast path | speed-up |",
            "| --- | --- | --- | --- |",
            f"| 512x512 matmul | {bl['bundled']['matmul_512_s'] * 1e3:.1f} ms | "
            f"{bl['fast']['matmul_512_s'] * 1e3:.2f} ms | **{bl['matmul_speedup']:.1f}x** |",
            f"| student train step (16x128) | {bl['bundled']['train_step_s']:.3f} s | "
            f"{bl['fast']['train_step_s']:.3f} s | **{bl['train_step_speedup']:.1f}x** |",
            "",
        ]
    if "dtype_policy" in r:
        d = r["dtype_policy"]
        rows = [
            ("float16 folder, the CPU dtype policy (float32 compute)", "float16_folder_policy"),
            ("float16 folder, teacher in float16 (`params.dtype`)", "float16_folder_as_float16"),
            ("float32 folder", "float32_folder"),
        ]
        lines += [
            "## A float16 checkpoint on a CPU: the dtype policy",
            "",
            "`benchmarks/run --only dtype_policy`: SmolLM2-135M-Instruct imported from its GGUF"
            f" with `--dtype float16` (and float32), teacher and full-depth student, "
            f"{d['tokens_per_step']} tokens a step, median of steps 2-{d['steps']}.",
            "",
            "| | step | val loss |",
            "| --- | ---: | ---: |",
            *[f"| {name} | {d[k]['step_s']:.2f} s | {d[k]['val_loss']:.4f} |" for name, k in rows],
            "",
            f"The policy's step is {d['policy_vs_float32_folder']:.2f}x the float32 folder's; "
            f"a teacher computed in float16 takes {d['float16_compute_vs_policy']:.1f}x the "
            "policy's step.",
            "",
        ]
    if "cuda" in r:
        lines += ["## MLX on CUDA", "", r["cuda"].get("markdown", ""), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
