"""Native row kernels (kd-kernels) against kdcore's pure-MLX rows and PyTorch at V = 128,000.

For each loss (hinton = T^2 forward KL at T = 2, reverse_kl, gjsd with beta = 0.5, and the
cross-entropy ce) at N = 512 token rows x V = 128,000, float32, forward and backward:

- ``rows``: the loss's row function alone (per-row values and the gradient with respect to
  the student's logits: the whole forward + backward of the loss) over the N rows in chunks
  of kdcore's default size (32 rows at this V), ``native`` (kd-kernels, through kdcore's
  dispatch) and ``pure`` (``KD_KERNELS=pure``);
- ``loss``: ``mx.value_and_grad`` of the loss through ``testing.dense_divergence``, which
  adds ``chunked_token_mean``'s work around the rows (each chunk copied from a NumPy view
  of the input, the gradient buffer, the VJP's cotangent multiply), native and pure; not
  for ce, whose chunked form is the fused head + loss pass;
- ``torch``: PyTorch CPU's forward + backward of the same loss (``benchmarks.losses``'
  formulations; ``F.cross_entropy`` for ce), when torch is importable.

``bandwidth_share`` = the least traffic of the loss (read the student's and teacher's
logits, write the gradient: 3 x N x V x 4 bytes; 2 x for ce) / wall seconds / the copy
bandwidth measured by ``benchmarks.bandwidth`` in the same run. Target: >= 0.25 for the
native rows of hinton, reverse_kl and gjsd. Each variant runs in its own process; wall time
is the median of the repeats after one warm-up.

    python -m benchmarks.kernels [--tokens 512 --vocab 128000 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

LOSSES = ("hinton", "reverse_kl", "gjsd", "ce")
T_HINTON, BETA = 2.0, 0.5
TARGET = 0.25
TARGET_LOSSES = ("hinton", "reverse_kl", "gjsd")


def _inputs(tokens: int, vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    s = (rng.standard_normal((tokens, vocab), dtype=np.float32) * 3).astype(np.float32)
    t = (rng.standard_normal((tokens, vocab), dtype=np.float32) * 3).astype(np.float32)
    labels = rng.integers(0, vocab, tokens).astype(np.int32)
    return s, t, labels


def _setting(loss: str) -> tuple[str, float, float]:
    """(kind, temperature, loss factor) of a divergence loss."""
    if loss == "hinton":
        return "forward_kl", T_HINTON, T_HINTON * T_HINTON
    return loss, 1.0, 1.0


def _timed(fn, repeats: int) -> dict:
    fn()  # warm-up: allocations, the plugin registry
    walls, cpus, value = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "walls": walls,
        "value": value,
    }


def _mlx(loss: str, part: str, variant: str, tokens: int, vocab: int, repeats: int) -> dict:
    # the variant is kdcore's own switch, read when a row function is built
    os.environ["KD_KERNELS"] = "pure" if variant == "pure" else "native"
    import mlx.core as mx

    from kdcore.kernels import divergence as D
    from kdcore.kernels.chunked import default_chunk_rows
    from kdcore.kernels.fused import cross_entropy_rows
    from kdcore.kernels.kinds import canonical
    from kdcore.kernels.native import install_registered_kernels, row_kernel_status

    install_registered_kernels()  # kd-kernels' rows for "native", as a run installs them

    s_np, t_np, l_np = _inputs(tokens, vocab)
    s, t, labels = mx.array(s_np), mx.array(t_np), mx.array(l_np)
    del s_np, t_np
    mx.eval(s, t, labels)
    size = default_chunk_rows(vocab)
    if part == "rows":
        if loss == "ce":
            rows_fn, other, factor = cross_entropy_rows(), labels, 1.0
        else:
            kind, temperature, factor = _setting(loss)
            kind, coef = canonical(kind, BETA)
            rows_fn, other = D.dense_rows(kind, coef, temperature, temperature), t
        scale = mx.full((tokens, 1), factor / tokens, mx.float32)

        def run() -> float:
            total = 0.0
            for start in range(0, tokens, size):
                end = min(tokens, start + size)
                values, grad = rows_fn(scale[start:end], s[start:end], other[start:end])
                mx.eval(values, grad)
                total += float(values.sum().item())
            return factor * total / tokens

    else:
        kind, temperature, factor = _setting(loss)
        mask = mx.ones((tokens,))

        def fn(x):
            return factor * D.dense_divergence(x, t, mask, kind, temperature=temperature, beta=BETA)

        def run() -> float:
            value, grad = mx.value_and_grad(fn)(s)
            mx.eval(value, grad)
            return float(value.item())

    result = _timed(run, repeats)
    if variant == "native":
        status = row_kernel_status()["cross_entropy" if loss == "ce" else _setting(loss)[0]]
        result["kernel"] = status
    return result


def _torch(loss: str, tokens: int, vocab: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from benchmarks.losses import _torch_fn

    s_np, t_np, l_np = _inputs(tokens, vocab)
    t = torch.from_numpy(t_np)
    labels = torch.from_numpy(l_np.astype("int64"))
    mask = torch.ones(tokens)
    fn = (lambda x: F.cross_entropy(x, labels)) if loss == "ce" else _torch_fn(loss, t, mask)

    def run() -> float:
        s = torch.from_numpy(s_np).requires_grad_(True)
        value = fn(s)
        value.backward()
        return float(value.item())

    out = _timed(run, repeats)
    out["torch"], out["threads"] = torch.__version__, torch.get_num_threads()
    return out


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _traffic(loss: str, tokens: int, vocab: int) -> int:
    return (2 if loss == "ce" else 3) * tokens * vocab * 4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument(
        "--variants", default="native,pure,torch", help="a subset, e.g. native,torch (quicker)"
    )
    p.add_argument("--out", help="also write the JSON report here")
    p.add_argument("--one", nargs=3, metavar=("LOSS", "PART", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        loss, part, variant = args.one
        if variant == "torch":
            result = _torch(loss, args.tokens, args.vocab, args.repeats)
        else:
            result = _mlx(loss, part, variant, args.tokens, args.vocab, args.repeats)
        print(json.dumps(result))
        return 0

    from benchmarks.bandwidth import measure
    from benchmarks.common import machine, run_isolated

    copy = measure()["gb_per_s"]
    size = ["--tokens", str(args.tokens), "--vocab", str(args.vocab)]
    size += ["--repeats", str(args.repeats)]
    variants = set(args.variants.split(","))
    torch = "torch" in variants and _torch_available()
    report: dict = {
        "tokens": args.tokens,
        "vocab": args.vocab,
        "dtype": "float32",
        "repeats": args.repeats,
        "copy_gb_per_s": copy,
        "settings": {"hinton_T": T_HINTON, "gjsd_beta": BETA},
        "target": {"bandwidth_share": TARGET, "losses": list(TARGET_LOSSES), "part": "rows"},
        "machine": machine(),
        "torch_as_users_run_it": True,  # without kd's OpenBLAS preload
        "losses": {},
    }
    for loss in [x for x in args.losses.split(",") if x]:
        moved = _traffic(loss, args.tokens, args.vocab)
        entry: dict = {"least_traffic_bytes": moved}
        parts = ["rows"] if loss == "ce" else ["rows", "loss"]
        runs = [(part, v) for part in parts for v in ("native", "pure") if v in variants]
        if torch:
            runs.append(("torch", "torch"))
        for part, variant in runs:
            result = run_isolated(
                "kernels",
                ["--one", loss, part, variant, *size],
                fast_path=False if variant == "torch" else None,
            )
            result["gb_per_s"] = moved / result["wall_s"] / 1e9
            result["bandwidth_share"] = result["gb_per_s"] / copy
            if part == "torch":
                entry["torch"] = result
            else:
                entry.setdefault(part, {})[variant] = result
            print(
                f"{loss:10s} {part:5s} {variant:6s} {result['wall_s']:8.3f}s wall "
                f"{result['cpu_s']:8.3f}s cpu  share {result['bandwidth_share']:6.1%}",
                file=sys.stderr,
                flush=True,
            )
        for part in parts:
            got = entry.get(part, {})
            if "native" in got and "pure" in got:
                speedup = got["pure"]["wall_s"] / got["native"]["wall_s"]
                entry[f"{part}_speedup_native_over_pure"] = speedup
        native = entry.get("rows", {}).get("native")
        if native is not None and torch:
            entry["rows_native_over_torch_wall"] = native["wall_s"] / entry["torch"]["wall_s"]
        if native is not None and loss in TARGET_LOSSES:
            entry["target_met"] = native["bandwidth_share"] >= TARGET
        report["losses"][loss] = entry
    report["markdown"] = markdown(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    print(report["markdown"], file=sys.stderr)
    print(json.dumps(report))  # one line, the last: benchmarks.common.run_isolated reads it
    return 0


def markdown(report: dict) -> str:
    """The report as a Markdown table (docs/performance.md)."""
    lines = [
        f"Forward + backward at N = {report['tokens']} tokens x V = {report['vocab']}, "
        f"float32; median of {report['repeats']} runs after a warm-up, each variant in a "
        "fresh process. *Share*: the least traffic (read the student's and the teacher's "
        "logits, write the gradient; ce reads no teacher) / wall time / the measured "
        f"{report['copy_gb_per_s']:.1f} GB/s copy bandwidth. *rows*: the row function "
        "alone, chunk by chunk; *loss*: `dense_divergence` forward + backward "
        "(`chunked_token_mean` around the rows).",
        "",
        "| loss | rows native | rows pure | loss native | loss pure | PyTorch CPU | "
        f"native rows >= {report['target']['bandwidth_share']:.0%} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def cell(e: dict | None) -> str:
        return "-" if e is None else f"{e['wall_s']:.3f} s ({e['bandwidth_share']:.1%})"

    for loss, e in report["losses"].items():
        met = e.get("target_met")
        rows = e.get("rows", {})
        lines.append(
            f"| {loss} | {cell(rows.get('native'))} | {cell(rows.get('pure'))} | "
            f"{cell(e.get('loss', {}).get('native'))} | {cell(e.get('loss', {}).get('pure'))} "
            f"| {cell(e.get('torch'))} | {'-' if met is None else ('met' if met else 'NOT met')} |"
        )
    first = next(iter(report["losses"].values()), {})
    kernel = first.get("rows", {}).get("native", {}).get("kernel", {})
    if kernel:
        lines += ["", f"Native kernel: {kernel['path']} ({kernel['source']}): {kernel['detail']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
