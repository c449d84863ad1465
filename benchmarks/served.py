"""A served teacher against a live one and a top-k cache: tokens/s of the same short
``kd distill`` run with the teacher (a) loaded in the run, (b) read from a top-k cache of
it, (c) behind ``kd serve`` on this machine (a subprocess on loopback, kdcore's protocol,
the next batches' requests in flight while the student trains: ``prefetch = 2``), and (d)
the same without prefetch; the server's overhead per token (served vs local).

The teacher is a random-weight llama made offline (``create_mlxlm_dir``: byte vocabulary,
hidden 256, 4 layers, ~3M parameters, ~11x the student); the student is kdcore's
transformer (dim 64, 2 layers). Every arm trains the same student on the same batches
(tinyshakespeare, seq 128, batch 16, same seed) with ``hinton`` (T = 2, top-k support
from the cache and the server) + ``ce``; only the ``[[teachers]]`` entry differs. Each arm
runs in its own process, the arms in turn, ``--rounds`` times (the server restarted for
each served arm); a step's time is the median of its steps after the first two, over the
rounds. The server and the trainer share the machine's cores, as they would here.

    python -m benchmarks.served            # ~2-3 minutes on 2 cores; prints the JSON
    python -m benchmarks.served --quick    # tiny shapes: a check that every arm works

``benchmarks/run --only served`` stores it under ``served`` and renders it in
docs/performance.md (:func:`markdown_lines`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt"
ARMS = ("live", "cache", "served", "served_no_prefetch")
FULL = {"hidden": 256, "layers": 4, "seq": 128, "batch": 16, "steps": 60, "rounds": 2}
QUICK = {"hidden": 32, "layers": 2, "seq": 32, "batch": 4, "steps": 4, "rounds": 1}
TOP_K = 64
WARMUP_STEPS = 2


def teacher_config(s: dict) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "num_hidden_layers": s["layers"],
        "intermediate_size": 2 * s["hidden"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 256,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    }


def spec_of(teacher_entry: dict, teacher: Path, s: dict) -> dict:
    """The run of every arm; only the ``[[teachers]]`` entry differs."""
    # the steps' rows and a little more (at least enough for a val split)
    chars = max(20_000, int(s["steps"] * s["batch"] * (s["seq"] + 1) * 1.15))
    return {
        "run": {"name": "served-bench", "seed": 0},
        "data": {
            "name": "text",
            "params": {
                "path": str(CORPUS),
                "tokenizer": str(teacher),
                "seq_len": s["seq"],
                "val_fraction": 0.05,
                "max_chars": chars,
            },
        },
        "student": {
            "model": {
                "name": "transformer",
                "params": {"dim": 64, "layers": 2, "heads": 4, "max_seq_len": s["seq"]},
            }
        },
        "teachers": [teacher_entry],
        "losses": [{"name": "hinton", "params": {"temperature": 2.0}}, {"name": "ce"}],
        "train": {
            "steps": s["steps"],
            "batch_size": s["batch"],
            "log_every": 1,
            "optimizer": {"name": "adamw", "lr": 2e-3},
        },
        "eval": {"batches": 2},
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """``kd serve TEACHER`` in a subprocess on loopback, until ``close``."""

    def __init__(self, teacher: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "kdcore.cli", "serve", str(teacher)]
        command += ["--port", str(self.port), "--top-k", str(TOP_K)]
        start = time.perf_counter()
        self.log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(command, stderr=self.log, cwd=ROOT)
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.perf_counter() - start > 300:
                    self.close()
                    raise RuntimeError(f"kd serve did not start: see {log}") from None
                time.sleep(0.2)
        self.start_s = time.perf_counter() - start

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def run_arm(spec: dict, work: Path, name: str) -> dict:
    """One arm's run in a fresh process: its summary and its step records."""
    spec_file, out = work / f"{name}.json", work / name
    spec_file.write_text(json.dumps(spec))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.served", "--arm-spec", str(spec_file)]
        + ["--arm-output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"arm {name} failed:\n{result.stderr[-3000:]}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r and "step" in r]
    summary = json.loads((out / "summary.json").read_text())
    return {"records": records, "summary": summary}


def arm_child(spec_file: Path, output: Path) -> None:
    from kdcore import app

    app.distill(json.loads(spec_file.read_text()), output=output, progress=False)


def measure(quick: bool) -> dict:
    from kdcore.cache.write import write_cache
    from kdcore.models.io import count_parameters, load_model
    from kdcore.models.mlxlm import create_mlxlm_dir
    from kdcore.spec.load import load_spec

    s = dict(QUICK if quick else FULL)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher = create_mlxlm_dir(work / "teacher", teacher_config(s), seed=1)
        start = time.perf_counter()
        cache = work / "cache"
        spec = load_spec(spec_of({"path": str(teacher)}, teacher, s))
        write_cache(spec, cache, top_k=TOP_K, dtype="float16", progress=False)
        cache_build_s = time.perf_counter() - start
        runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        starts = []
        for r in range(s["rounds"]):
            for arm in ARMS:
                server = None
                if arm == "live":  # an mlx-lm folder: its source (kd's "model" wants kd's)
                    entry = {"path": str(teacher), "source": "mlx-lm"}
                elif arm == "cache":
                    entry = {"cache": str(cache)}
                else:
                    server = Served(teacher, work / f"serve-{arm}-{r}.log")
                    starts.append(server.start_s)
                    prefetch = 2 if arm == "served" else 0
                    entry = {"server": server.url, "params": {"top_k": TOP_K, "prefetch": prefetch}}
                try:
                    runs[arm].append(run_arm(spec_of(entry, teacher, s), work, f"{arm}-{r}"))
                finally:
                    if server is not None:
                        server.close()
        parameters = count_parameters(load_model(teacher)[0])
        return summarise(s, runs, cache_build_s, starts, load_before, quick, parameters)


def summarise(
    s: dict,
    runs: dict,
    cache_build_s: float,
    starts: list,
    load: float,
    quick: bool,
    parameters: int,
) -> dict:
    tokens = s["batch"] * s["seq"]
    arms = {}
    for arm, rounds in runs.items():
        steps = [r["step_s"] for run in rounds for r in run["records"][WARMUP_STEPS:]]
        step_s = statistics.median(steps)
        last = rounds[-1]["summary"]
        arms[arm] = {
            "step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "run_tokens_per_s": statistics.median(run["summary"]["tokens_per_s"] for run in rounds),
            "val_loss": last["eval"]["val_loss"],
            "final_loss": rounds[-1]["records"][-1]["loss"],
        }
        if "teacher_servers" in last:
            served = last["teacher_servers"]["teachers[0]"]
            waits = [r["server/wait_s"] for run in rounds for r in run["records"][WARMUP_STEPS:]]
            arms[arm]["server_tokens_per_s"] = served["tokens_per_s"]
            arms[arm]["wait_s_per_step"] = statistics.median(waits)
    live, cache, served = arms["live"], arms["cache"], arms["served"]
    return {
        "quick": quick,
        "shapes": {**s, "tokens_per_step": tokens, "top_k": TOP_K, "vocab": 256},
        "teacher_parameters": parameters,
        "cache_build_s": cache_build_s,
        "server_start_s": statistics.median(starts) if starts else None,
        "arms": arms,
        # what the server costs per token over the teacher in the run, and over a cache
        "served_overhead_us_per_token": (served["step_s"] - live["step_s"]) / tokens * 1e6,
        "served_over_cache_us_per_token": (served["step_s"] - cache["step_s"]) / tokens * 1e6,
        "served_over_live": served["step_s"] / live["step_s"],
        # the same without prefetch: every request waited for, the round trip's full cost
        "unprefetched_overhead_us_per_token": (
            (arms["served_no_prefetch"]["step_s"] - live["step_s"]) / tokens * 1e6
        ),
        "prefetch_speedup": arms["served_no_prefetch"]["step_s"] / served["step_s"],
        "load_average_before": load,
        "load_average_after": os.getloadavg()[0],
    }


def markdown_lines(r: dict) -> list[str]:
    """The section of docs/performance.md."""
    s, a = r["shapes"], r["arms"]
    names = {
        "live": "live teacher (loaded in the run)",
        "cache": f"top-{s['top_k']} cache of it (float16)",
        "served": "`kd serve` on loopback, prefetch 2",
        "served_no_prefetch": "`kd serve` on loopback, no prefetch",
    }
    rows = []
    for arm, label in names.items():
        x = a[arm]
        server = ""
        if "server_tokens_per_s" in x:
            server = f"{x['server_tokens_per_s']:,.0f} | {x['wait_s_per_step'] * 1e3:.1f} ms"
        else:
            server = "- | -"
        rows.append(
            f"| {label} | {x['step_s']:.3f} | {x['tokens_per_s']:,.0f} | {server} | "
            f"{x['val_loss']:.4f} |"
        )
    return [
        "## A served teacher",
        "",
        f"`benchmarks/run --only served` (`benchmarks/served.py`): the same `kd distill` run "
        f"({s['steps']} steps of {s['batch']} x {s['seq']} tokens, hinton T = 2 + CE, student "
        f"dim 64 x 2 layers) with a random-weight llama teacher ({r['teacher_parameters']:,} "
        f"parameters, hidden {s['hidden']}, {s['layers']} layers, V = {s['vocab']}) loaded in "
        "the run, read from a top-k cache, and behind `kd serve` on this machine (a subprocess "
        "on loopback, kdcore's binary protocol, top-k = "
        f"{s['top_k']}). Each arm in its own process, {s['rounds']} round(s) in turn; step time "
        f"the median after the first {WARMUP_STEPS} steps. Load average "
        f"{r['load_average_before']:.1f} before the section"
        + (" (**quick settings: a plumbing check, not a measurement**)." if r["quick"] else "."),
        "",
        "| teacher | s / step | tokens/s | server tokens/s | step's wait for it | val loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"The server's overhead per token over the teacher in the run: "
        f"**{r['served_overhead_us_per_token']:.1f} us** ({r['served_over_live']:.2f}x the live "
        "step"
        + (
            "; below zero, the server's work overlapped the student's on the other core"
            if r["served_overhead_us_per_token"] < 0
            else ""
        )
        + f"); over the cache: {r['served_over_cache_us_per_token']:.1f} us. Without prefetch "
        f"(each step waits for its request) it is {r['unprefetched_overhead_us_per_token']:.1f}"
        f" us per token, the step {r['prefetch_speedup']:.2f}x the one with prefetch. Writing "
        "the cache took "
        f"{r['cache_build_s']:.0f} s; `kd serve` started in {r['server_start_s']:.1f} s.",
        "",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes: a plumbing check")
    p.add_argument("--arm-spec", help=argparse.SUPPRESS)
    p.add_argument("--arm-output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm_spec:
        arm_child(Path(args.arm_spec), Path(args.arm_output))
        return 0
    print(json.dumps(measure(args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
