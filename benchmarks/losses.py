"""Forward + backward of the logit losses at a large vocabulary: ours vs the plain forms.

For each loss (hinton = T^2 forward KL, reverse_kl, gjsd, bild) at N tokens x V vocabulary,
float32, every token counted, three variants are measured side by side:

- ``ours``: the chunked kernels (``kdcore.kernels.divergence``, ``kd_bild.bild_divergence``);
- ``mlx_plain``: the straightforward MLX formulation (whole [N, V] log-softmaxes, autodiff);
- ``torch``: a PyTorch CPU reference built on ``F.kl_div`` (TRL's GKD formula for gjsd, the
  official BiLD code for bild), when torch is importable.

Each measurement runs in a fresh process (clean peak memory), and the repeats of the
variants are interleaved so that a change in machine load hits them alike. Reported per run:
wall seconds, process CPU seconds, and peak memory beyond the inputs and the gradient (MLX:
``mx.get_peak_memory()`` minus the arrays alive before the call minus the gradient; all
variants: the growth of the process's resident-set high-water mark during the call minus the
gradient, the only figure PyTorch CPU offers).

    python -m benchmarks.losses --out results/losses.json [--tokens 4096 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

LOSSES = ("hinton", "reverse_kl", "gjsd", "bild")
VARIANTS = ("ours", "mlx_plain", "torch")
T_KL, T_BILD, BETA, K_BILD = 2.0, 3.0, 0.5, 8


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class _PeakRss:
    """Growth of the process's resident-set high-water mark over a block.

    Linux lets a process reset its high-water mark (``/proc/self/clear_refs`` = 5), so the
    input-building peak before the block does not hide the block's own; elsewhere the
    lifetime maximum from ``getrusage`` is the fallback (an upper bound of the baseline).
    """

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        current = _status_kib("VmRSS")
        self.start = (current * 1024) if (self.reset and current) else self._lifetime()
        return self

    @staticmethod
    def _lifetime() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __exit__(self, *exc):
        hwm = _status_kib("VmHWM") if self.reset else None
        self.growth = (hwm * 1024 if hwm else self._lifetime()) - self.start
        return False


def _inputs(tokens: int, vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    s = (rng.standard_normal((tokens, vocab), dtype=np.float32) * 3).astype(np.float32)
    t = (rng.standard_normal((tokens, vocab), dtype=np.float32) * 3).astype(np.float32)
    return s, t


def _mlx_fn(loss: str, variant: str, t, mask):
    from kd_bild import bild_divergence, plain_bild

    from kdcore.kernels import divergence as D
    from kdcore.kernels.native import install_registered_kernels

    install_registered_kernels()  # "ours" runs kd-kernels' rows where installed, as a run does

    T2 = T_KL * T_KL
    if loss == "bild":
        if variant == "ours":
            return lambda s: bild_divergence(s, t, mask, K_BILD, T_BILD)
        return lambda s: plain_bild(s, t, mask, K_BILD, T_BILD)
    kind = {"hinton": "forward_kl"}.get(loss, loss)
    scale = T2 if loss == "hinton" else 1.0
    T = T_KL if loss == "hinton" else 1.0
    if variant == "ours":
        return lambda s: scale * D.dense_divergence(s, t, mask, kind, temperature=T, beta=BETA)
    return lambda s: scale * D.plain_divergence(s, t, mask, kind, temperature=T, beta=BETA)


def _measure_mlx(loss: str, variant: str, tokens: int, vocab: int) -> dict:
    import mlx.core as mx

    s_np, t_np = _inputs(tokens, vocab)
    s, t = mx.array(s_np), mx.array(t_np)
    mask = mx.ones((tokens,))
    del s_np, t_np
    mx.eval(s, t, mask)
    fn = _mlx_fn(loss, variant, t, mask)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    with _PeakRss() as rss:
        wall, cpu = time.perf_counter(), time.process_time()
        value, grad = mx.value_and_grad(fn)(s)
        mx.eval(value, grad)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_extra_bytes": mx.get_peak_memory() - base - grad.nbytes,
        "rss_extra_bytes": rss.growth - grad.nbytes,
        "inputs_bytes": s.nbytes + t.nbytes,
        "grad_bytes": grad.nbytes,
        "value": value.item(),
    }


def _torch_fn(loss: str, t, mask):
    import torch
    import torch.nn.functional as F

    def masked(rows):
        return (rows * mask).sum() / mask.sum().clamp(min=1.0)

    if loss == "hinton":

        def fn(s):
            rows = F.kl_div(
                F.log_softmax(s / T_KL, -1),
                F.log_softmax(t / T_KL, -1),
                reduction="none",
                log_target=True,
            ).sum(-1)
            return masked(rows) * T_KL * T_KL

    elif loss == "reverse_kl":

        def fn(s):
            rows = F.kl_div(
                F.log_softmax(t, -1), F.log_softmax(s, -1), reduction="none", log_target=True
            ).sum(-1)
            return masked(rows)

    elif loss == "gjsd":  # TRL GKDTrainer.generalized_jsd_loss, 0 < beta < 1

        def fn(s):
            ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
            beta = torch.tensor(BETA)
            lm = torch.logsumexp(torch.stack([ls + torch.log(1 - beta), lt + torch.log(beta)]), 0)
            kl_t = F.kl_div(lm, lt, reduction="none", log_target=True)
            kl_s = F.kl_div(lm, ls, reduction="none", log_target=True)
            return masked((BETA * kl_t + (1 - BETA) * kl_s).sum(-1))

    else:  # the official bild_loss (fpcsong/BiLD), t-LD + s-LD

        def ld(s, student_led):
            if not student_led:
                with torch.no_grad():
                    sel_t, pos = torch.topk(t, k=K_BILD, dim=-1)
                sel_s = torch.gather(s, -1, pos)
            else:
                sel_s, pos = torch.topk(s, k=K_BILD, dim=-1)
                sel_t = torch.gather(t, -1, pos)
            i, j = torch.triu_indices(K_BILD, K_BILD, offset=1)
            dt = (sel_t[..., i] - sel_t[..., j]) / T_BILD
            ds = (sel_s[..., i] - sel_s[..., j]) / T_BILD
            return F.kl_div(F.log_softmax(ds, -1), F.softmax(dt, -1), reduction="none").sum(-1)

        def fn(s):
            return masked(ld(s, False) + ld(s, True))

    return fn


def _measure_torch(loss: str, tokens: int, vocab: int) -> dict:
    import torch

    s_np, t_np = _inputs(tokens, vocab)
    s = torch.from_numpy(s_np).requires_grad_(True)
    t = torch.from_numpy(t_np)
    mask = torch.ones(tokens)
    fn = _torch_fn(loss, t, mask)
    with _PeakRss() as rss:
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn(s)
        value.backward()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    grad_bytes = s.grad.numel() * s.grad.element_size()
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_extra_bytes": rss.growth - grad_bytes,
        "inputs_bytes": 2 * s.numel() * 4,
        "grad_bytes": grad_bytes,
        "value": value.item(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _one(loss: str, variant: str, tokens: int, vocab: int) -> dict:
    if variant == "torch":
        return _measure_torch(loss, tokens, vocab)
    return _measure_mlx(loss, variant, tokens, vocab)


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _summary(runs: list[dict]) -> dict:
    out = {
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "rss_extra_bytes": max(r["rss_extra_bytes"] for r in runs),
        "value": runs[0]["value"],
        "runs": runs,
    }
    if "peak_extra_bytes" in runs[0]:
        out["peak_extra_bytes"] = max(r["peak_extra_bytes"] for r in runs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--one", nargs=2, metavar=("LOSS", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args.one[0], args.one[1], args.tokens, args.vocab)))
        return 0

    from benchmarks.common import machine, run_isolated

    variants = [v for v in VARIANTS if v != "torch" or _torch_available()]
    losses = [x for x in args.losses.split(",") if x]
    size = ["--tokens", str(args.tokens), "--vocab", str(args.vocab)]
    report = {
        "tokens": args.tokens,
        "vocab": args.vocab,
        "dtype": "float32",
        "repeats": args.repeats,
        "settings": {"hinton_T": T_KL, "gjsd_beta": BETA, "bild_k": K_BILD, "bild_T": T_BILD},
        "machine": machine(),
        "torch_as_users_run_it": True,  # without kd's OpenBLAS preload
        "losses": {},
    }
    for loss in losses:
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.repeats):
            for variant in variants:  # interleaved: load drift hits every variant alike
                peer = False if variant == "torch" else None  # PyTorch as a user runs it
                runs[variant].append(
                    run_isolated("losses", ["--one", loss, variant, *size], fast_path=peer)
                )
                last = runs[variant][-1]
                peak = last.get("peak_extra_bytes", last["rss_extra_bytes"]) / 2**20
                print(
                    f"{loss:10s} {variant:9s} run {r + 1}: {last['wall_s']:7.2f}s wall "
                    f"{last['cpu_s']:7.2f}s cpu peak+{peak:8.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
        entry = {v: _summary(runs[v]) for v in variants}
        ours, plain = entry["ours"], entry["mlx_plain"]
        entry["ratios"] = {
            "peak_extra_ours_over_plain": ours["peak_extra_bytes"] / plain["peak_extra_bytes"],
            "wall_ours_over_plain": ours["wall_s"] / plain["wall_s"],
            "cpu_ours_over_plain": ours["cpu_s"] / plain["cpu_s"],
            "value_relative_difference": abs(ours["value"] - plain["value"])
            / max(abs(plain["value"]), 1e-12),
        }
        if "torch" in entry:
            entry["ratios"]["wall_ours_over_torch"] = ours["wall_s"] / entry["torch"]["wall_s"]
            entry["ratios"]["cpu_ours_over_torch"] = ours["cpu_s"] / entry["torch"]["cpu_s"]
            entry["ratios"]["rss_extra_ours_over_torch"] = ours["rss_extra_bytes"] / max(
                entry["torch"]["rss_extra_bytes"], 1
            )
        entry["targets"] = {
            "memory_le_25pct_of_plain": entry["ratios"]["peak_extra_ours_over_plain"] <= 0.25,
            "wall_not_worse_than_plain": entry["ratios"]["wall_ours_over_plain"] <= 1.0,
            "cpu_not_worse_than_plain": entry["ratios"]["cpu_ours_over_plain"] <= 1.0,
        }
        report["losses"][loss] = entry
    report["markdown"] = markdown(report)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(_table(report))
    return 0


def markdown(report: dict) -> str:
    """The report as a Markdown table (for docs/performance.md)."""
    mib = 2**20
    lines = [
        f"Forward + backward at N = {report['tokens']} tokens x V = {report['vocab']}, "
        f"float32, every token counted; median of {report['repeats']} interleaved runs, each "
        "in a fresh process. *Peak+* is the memory beyond the inputs and the gradient: MLX's "
        "allocator peak for the MLX variants, the growth of resident memory for PyTorch.",
        "",
        "| loss | variant | CPU s | wall s | peak+ MiB | ours / variant: CPU, wall, peak+ |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    names = {"ours": "ours (chunked)", "mlx_plain": "MLX plain", "torch": "PyTorch CPU"}
    for loss, entry in report["losses"].items():
        ours = entry["ours"]
        for v in VARIANTS:
            if v not in entry:
                continue
            e = entry[v]
            peak = e.get("peak_extra_bytes", e["rss_extra_bytes"])
            mine = ours.get("peak_extra_bytes", ours["rss_extra_bytes"])
            if v == "torch":
                mine = ours["rss_extra_bytes"]
            ratio = (
                ""
                if v == "ours"
                else f"{ours['cpu_s'] / e['cpu_s']:.2f}, {ours['wall_s'] / e['wall_s']:.2f}, "
                f"{mine / max(peak, 1):.3f}"
            )
            lines.append(
                f"| {loss} | {names[v]} | {e['cpu_s']:.2f} | {e['wall_s']:.2f} | "
                f"{peak / mib:.0f} | {ratio} |"
            )
    lines += [
        "",
        "Targets (ours vs MLX plain): peak+ <= 0.25 and time <= 1.0: "
        + ", ".join(
            f"{loss} {'met' if all(e['targets'].values()) else 'NOT met'}"
            for loss, e in report["losses"].items()
        )
        + ".",
    ]
    return "\n".join(lines)


def _table(report: dict) -> str:
    mib = 2**20
    lines = [
        f"N={report['tokens']} V={report['vocab']} float32, forward+backward, median of "
        f"{report['repeats']} (peak: max)",
        f"{'loss':11s}{'variant':10s}{'wall s':>9s}{'cpu s':>9s}{'peak+ MiB':>11s}"
        f"{'rss+ MiB':>10s}",
    ]
    for loss, entry in report["losses"].items():
        for v in VARIANTS:
            if v not in entry:
                continue
            e = entry[v]
            peak = f"{e['peak_extra_bytes'] / mib:11.0f}" if "peak_extra_bytes" in e else " " * 11
            lines.append(
                f"{loss:11s}{v:10s}{e['wall_s']:9.2f}{e['cpu_s']:9.2f}{peak}"
                f"{e['rss_extra_bytes'] / mib:10.0f}"
            )
        r = entry["ratios"]
        lines.append(
            f"{'':11s}ours/plain: peak {r['peak_extra_ours_over_plain']:.3f}, wall "
            f"{r['wall_ours_over_plain']:.2f}, cpu {r['cpu_ours_over_plain']:.2f}"
            + (
                f"; ours/torch: wall {r['wall_ours_over_torch']:.2f}, cpu "
                f"{r['cpu_ours_over_torch']:.2f}"
                if "wall_ours_over_torch" in r
                else ""
            )
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
