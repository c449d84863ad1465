"""Distillation at a real vocabulary (Qwen3 layout, V = 151,936): kd distill (fused head +
loss) against a hand-written MLX loop with full logits and PyTorch + transformers on CPU.

Models: random weights made offline with ``kdcore.models.mlxlm.create_mlxlm_dir`` (never a
download): teacher hidden 1024, 2 layers; student hidden 512, 2 layers; tied embeddings, as
the small Qwen3 models have. One step: batch 4 x 512 tokens, ``0.5 CE + 0.5 KL(teacher ||
student)`` at T = 1, AdamW. Each contender runs in its own process (clean peak memory):

- ``kd``: ``app.distill`` on a spec (the fused path; step time from the run's own
  ``step_s`` records, MLX peak memory at the end, process peak RSS); once more with
  ``KD_HEAP=system`` (``kd_system_heap``: glibc's default heap, kdcore.engine.heap off);
- ``mlx``: the loop a user writes with mlx-lm models and full ``[B, L, V]`` logits;
- ``torch``: ``Qwen3ForCausalLM`` (transformers) with the same shapes, ``F.kl_div`` on full
  logits, ``torch.optim.AdamW``, CPU threads = cores; skipped when torch is not installed
  (``pip install torch==2.13.0``: benchmarks only, never a runtime dependency). It runs
  twice: as a user starts it, and with glibc's heap reuse (``torch_heap_reuse``: the
  ``MALLOC_`` variables of :data:`GLIBC_HEAP_REUSE`, what ``kd`` sets for itself with
  ``mallopt``; kdcore.engine.heap says why it matters on this machine).

kd and PyTorch run 5 steps and report the median of the last 4; the full-logit loop and the
4x-token point run 3 (the median of the last 2).

A second point runs kd at 4x the tokens (batch 16) to show that the fused path's memory
grows with tokens x hidden, not tokens x vocabulary; the full-logit loops would need about
4x their first-point memory there (more than this machine has), so they run only at the
first point.

``python -m benchmarks.real_vocab`` prints the JSON that ``benchmarks/run`` stores under
``real_vocab``; ``--quick`` runs tiny shapes (a check that every mode works).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kdcore import app

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt"
VOCAB = 151_936
# glibc's tunables for what kdcore.engine.heap sets with mallopt: large blocks from the heap,
# freed memory kept for reuse
GLIBC_HEAP_REUSE = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**64 - 1)}


def shapes(quick: bool) -> dict:
    if quick:
        return dict(vocab=4096, teacher=64, student=32, layers=1, seq=64, batch=2, steps=3)
    # kd and PyTorch: 5 steps, the median of the last 4 (a step's first run grows the
    # process's heap: two steps before they settle); the 83 s steps of the full-logit MLX
    # loop and the 4x-token point (memory is its figure): 3
    return dict(
        vocab=VOCAB, teacher=1024, student=512, layers=2, seq=512, batch=4, steps=5, short_steps=3
    )


def steps_of(s: dict, short: bool = False) -> int:
    return s.get("short_steps", s["steps"]) if short else s["steps"]


def qwen3(hidden: int, layers: int, vocab: int) -> dict:
    heads = max(2, hidden // 128)
    return dict(
        model_type="qwen3",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=3 * hidden,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        rms_norm_eps=1e-6,
        vocab_size=vocab,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    )


def make_models(root: Path, s: dict) -> dict:
    from kdcore.models.mlxlm import create_mlxlm_dir

    out = {}
    for name, hidden, seed in (("teacher", s["teacher"], 1), ("student", s["student"], 2)):
        path = root / name
        if not (path / "model.safetensors").exists():
            create_mlxlm_dir(path, qwen3(hidden, s["layers"], s["vocab"]), seed=seed)
        out[name] = str(path)
    return out


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def batches(s: dict, count: int, batch: int):
    """Byte tokens of the bundled corpus as ``[batch, seq]`` windows (ids < 256 of the
    151,936-wide heads: the cost of a step does not depend on which ids appear)."""
    data = np.frombuffer(CORPUS.read_bytes()[: 1 << 21], dtype=np.uint8).astype(np.int32)
    width = s["seq"] + 1
    for i in range(count):
        start = i * batch * width
        yield data[start : start + batch * width].reshape(batch, width)


# ---------------------------------------------------------------- kd distill


def kd_spec(models: dict, s: dict, batch: int, fused: bool = True, steps: int = 0) -> dict:
    return {
        "run": {"name": "real-vocab", "seed": 0},
        "data": {
            "name": "text",
            "params": {
                "path": str(CORPUS),
                "seq_len": s["seq"],
                "val_fraction": 0.01,
                "tokenizer": models["student"],
            },
        },
        "teachers": [{"source": "mlx-lm", "path": models["teacher"]}],
        "student": {"model": {"name": "mlx-lm", "params": {"path": models["student"]}}},
        "losses": [
            {"name": "ce", "weight": 0.5},
            {"name": "hinton", "weight": 0.5, "params": {"temperature": 1.0}},
        ],
        "train": {
            "steps": steps or s["steps"],
            "batch_size": batch,
            "log_every": 1,
            "grad_clip": None,
            "fused_loss": fused,
            "optimizer": {"name": "adamw", "lr": 1e-4},
        },
        "eval": {"batches": 1},
    }


def run_kd(models: dict, s: dict, batch: int, fused: bool = True, steps: int = 0) -> dict:
    import mlx.core as mx

    spec = kd_spec(models, s, batch, fused, steps)
    with tempfile.TemporaryDirectory() as out:
        mx.reset_peak_memory()
        app.distill(spec, output=Path(out) / "run", progress=False)
        peak = mx.get_peak_memory()
        text = (Path(out) / "run" / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    steps = [r["step_s"] for r in records if "step_s" in r]
    return {
        "step_s": statistics.median(steps[1:]),  # the first step compiles and warms up
        "steps_s": steps,
        "peak_bytes": peak,
        "peak_rss_bytes": peak_rss(),
        "tokens": batch * s["seq"],
    }


def run_breakdown(models: dict, s: dict, batch: int) -> dict:
    """Seconds of each part of a kd step (after a warm-up step): the teacher's forward, the
    student's forward, the fused loss (value and gradient, both heads' matmuls and the
    rows), the student's backward through its layers, and the AdamW update; by timing
    the step's pieces as the engine runs them."""

    from kdcore.engine.build import build_parts
    from kdcore.engine.heap import reuse_freed_memory
    from kdcore.engine.loop import stage_optimizer, stages
    from kdcore.spec.load import load_spec

    reuse_freed_memory()  # as kd distill does
    parts = build_parts(load_spec(kd_spec(models, s, batch)))
    optimizer, _plan = stage_optimizer(parts, stages(parts.spec)[0])

    figures: dict[str, list[float]] = {}
    for step in range(3):  # the first two warm up (the heap grows)
        for key, value in _step_parts(parts, optimizer, step, batch).items():
            figures.setdefault(key, []).append(value)
    last = {k: v[-1] for k, v in figures.items()}
    step_s = last["gradients_s"] + last["adamw_update_s"]
    backward = last["gradients_s"] - last["teacher_forward_s"] - last["student_forward_s"]
    backward -= last["fused_loss_s"]
    parts_s = {
        "teacher_forward_s": last["teacher_forward_s"],
        "student_forward_s": last["student_forward_s"],
        "fused_loss_s": last["fused_loss_s"],
        "student_backward_s": max(backward, 0.0),
        "adamw_update_s": last["adamw_update_s"],
    }
    return {
        "step_s": step_s,
        "parts_s": parts_s,
        "shares": {k: v / step_s for k, v in parts_s.items()},
        "student_parameters": sum(v.size for _, v in _flat(parts.student.parameters())),
    }


def _timed(fn):
    import mlx.core as mx

    start = time.perf_counter()
    out = fn()
    mx.eval(out)
    return time.perf_counter() - start, out


def _step_parts(parts, optimizer, step: int, batch: int) -> dict[str, float]:
    import mlx.core as mx

    from kdcore.engine.fused import FusedTerm, fused_pass
    from kdcore.engine.step import gradients, prepare_batch
    from kdcore.losses.rows import cross_entropy_rows, teacher_rows

    data = prepare_batch(parts, parts.dataset.batch(step, batch), step)
    t_teacher, _ = _timed(lambda: [g.final_hidden for g in parts.teacher_signals(data)])
    teacher = parts.teacher_signals(data)[0]
    out = parts.student(data["input_ids"])  # lazy: the forward runs when evaluated
    t_student, hidden = _timed(lambda: out.final_hidden)
    terms = [
        FusedTerm("ce", cross_entropy_rows(), 0.5, data["mask"]),
        FusedTerm("hinton", teacher_rows(teacher, "forward_kl"), 0.5, data["mask"]),
    ]

    def loss_only(h, w):
        fake = type(out)(final_hidden=h, head=out.head, head_weight=w)
        return fused_pass(terms, fake, teacher, data)[0]

    value_and_grad = mx.value_and_grad(loss_only, argnums=(0, 1))
    t_loss, _ = _timed(lambda: value_and_grad(mx.stop_gradient(hidden), out.head_weight))
    t_step, (_total, _t, _m, grads, _n) = _timed(lambda: gradients(parts, step))

    def update():
        optimizer.update(parts.trainable, grads)
        return parts.trainable.parameters()

    t_update, _ = _timed(update)
    return {
        "teacher_forward_s": t_teacher,
        "student_forward_s": t_student,
        "fused_loss_s": t_loss,
        "gradients_s": t_step,
        "adamw_update_s": t_update,
    }


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


# ---------------------------------------------------------------- hand-written MLX


def run_mlx(models: dict, s: dict, batch: int) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.utils import load_model

    teacher, _ = load_model(Path(models["teacher"]))
    student, _ = load_model(Path(models["student"]))
    teacher.freeze()
    optimizer = optim.AdamW(learning_rate=1e-4)

    def loss_fn(model, x, y):
        s_logits = model(x).astype(mx.float32)
        t_logits = mx.stop_gradient(teacher(x)).astype(mx.float32)
        ce = nn.losses.cross_entropy(s_logits, y, reduction="mean")
        log_q = s_logits - mx.logsumexp(s_logits, axis=-1, keepdims=True)
        log_p = t_logits - mx.logsumexp(t_logits, axis=-1, keepdims=True)
        kl = (mx.exp(log_p) * (log_p - log_q)).sum(-1).mean()
        return 0.5 * ce + 0.5 * kl

    step = nn.value_and_grad(student, loss_fn)
    mx.reset_peak_memory()
    times = []
    for rows in batches(s, steps_of(s, short=True), batch):
        x, y = mx.array(rows[:, :-1]), mx.array(rows[:, 1:])
        start = time.perf_counter()
        loss, grads = step(student, x, y)
        optimizer.update(student, grads)
        mx.eval(loss, student.parameters(), optimizer.state)
        times.append(time.perf_counter() - start)
    return {
        "step_s": statistics.median(times[1:]),
        "steps_s": times,
        "peak_bytes": mx.get_peak_memory(),
        "peak_rss_bytes": peak_rss(),
        "tokens": batch * s["seq"],
    }


# ---------------------------------------------------------------- PyTorch + transformers


def run_torch(models: dict, s: dict, batch: int) -> dict:
    try:
        import torch
        import torch.nn.functional as F
        from transformers import Qwen3Config, Qwen3ForCausalLM
    except ImportError as exc:
        return {"skipped": f"{exc.name} is not installed (pip install torch==2.13.0)"}
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)

    def model(hidden: int):
        cfg = qwen3(hidden, s["layers"], s["vocab"])
        cfg.pop("model_type")
        return Qwen3ForCausalLM(Qwen3Config(**cfg, attn_implementation="sdpa"))

    teacher, student = model(s["teacher"]).eval(), model(s["student"]).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    times = []
    for rows in batches(s, s["steps"], batch):
        x = torch.from_numpy(rows[:, :-1].astype(np.int64))
        y = torch.from_numpy(rows[:, 1:].astype(np.int64))
        start = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits.float()
        s_logits = student(input_ids=x).logits.float()
        ce = F.cross_entropy(s_logits.reshape(-1, s["vocab"]), y.reshape(-1))
        kl = F.kl_div(
            F.log_softmax(s_logits, -1).reshape(-1, s["vocab"]),
            F.log_softmax(t_logits, -1).reshape(-1, s["vocab"]),
            log_target=True,
            reduction="batchmean",
        )
        loss = 0.5 * ce + 0.5 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {
        "step_s": statistics.median(times[1:]),
        "steps_s": times,
        "peak_rss_bytes": peak_rss(),
        "tokens": batch * s["seq"],
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------- the section


def measure(quick: bool = False) -> dict:
    from benchmarks.common import machine, run_isolated

    load_before = os.getloadavg()[0]
    s = shapes(quick)
    root = Path(tempfile.gettempdir()) / f"kd-real-vocab-{'quick' if quick else 'full'}"
    root.mkdir(parents=True, exist_ok=True)
    models = make_models(root, s)
    args = ["--models", json.dumps(models)] + (["--quick"] if quick else [])
    kd = run_isolated("real_vocab", ["--mode", "kd", *args])
    # kd with glibc's default heap (kdcore.engine.heap off): what the heap reuse is worth
    kd_system_heap = run_isolated("real_vocab", ["--mode", "kd", *args], env={"KD_HEAP": "system"})
    mlx = run_isolated("real_vocab", ["--mode", "mlx", *args])
    # PyTorch as a user runs it: without kd's OpenBLAS preload (benchmarks.common.run_isolated)
    torch = run_isolated("real_vocab", ["--mode", "torch", *args], fast_path=False, may_fail=True)
    # PyTorch's CPU allocator is glibc's malloc too: the same heap reuse that kd turns on
    # (kdcore.engine.heap), through glibc's environment, for a like-for-like figure
    torch_heap = run_isolated(
        "real_vocab",
        ["--mode", "torch", *args],
        env=GLIBC_HEAP_REUSE,
        fast_path=False,
        may_fail=True,
    )
    kd_4x = run_isolated("real_vocab", ["--mode", "kd", "--scale", "4", *args])
    breakdown = run_isolated("real_vocab", ["--mode", "breakdown", *args])
    result = {
        "shapes": {**s, "tokens_per_step": s["batch"] * s["seq"]},
        "machine": machine(),
        "torch_as_users_run_it": True,  # without kd's OpenBLAS preload
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "kd": kd,
        "kd_system_heap": kd_system_heap,
        "mlx_full_logits": mlx,
        "torch": torch,
        "torch_heap_reuse": {**torch_heap, "env": GLIBC_HEAP_REUSE},
        "kd_4x_tokens": kd_4x,
        "kd_step_breakdown": breakdown,
        "kd_step_s": kd["step_s"],
        "mlx_full_logits_step_s": mlx["step_s"],
        "torch_step_s": torch.get("step_s"),
        "kd_peak_bytes": kd["peak_bytes"],
        "mlx_full_logits_peak_bytes": mlx["peak_bytes"],
        "torch_peak_rss_bytes": torch.get("peak_rss_bytes"),
        "kd_peak_ratio": kd["peak_bytes"] / mlx["peak_bytes"],
        "kd_step_ratio": kd["step_s"] / mlx["step_s"],
        "kd_over_torch_step": kd["step_s"] / torch["step_s"] if "step_s" in torch else None,
        "kd_over_torch_heap_reuse_step": (
            kd["step_s"] / torch_heap["step_s"] if "step_s" in torch_heap else None
        ),
        "kd_4x_peak_over_1x": kd_4x["peak_bytes"] / kd["peak_bytes"],
    }
    result["targets"] = {
        "peak_at_most_0.30x_mlx": result["kd_peak_ratio"] <= 0.30,
        "step_at_most_1.0x_mlx": result["kd_step_ratio"] <= 1.0,
        "step_at_most_0.80x_torch": (
            result["kd_over_torch_step"] is not None and result["kd_over_torch_step"] <= 0.80
        ),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["kd", "kd-unfused", "mlx", "torch", "breakdown"])
    parser.add_argument("--models", help="JSON {teacher, student} model folders")
    parser.add_argument("--scale", type=int, default=1, help="batch multiplier")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    args = parser.parse_args()
    if args.mode is None:
        print(json.dumps(measure(args.quick)))
        return
    s = shapes(args.quick)
    models = json.loads(args.models)
    batch = s["batch"] * args.scale
    if args.mode == "kd":
        out = run_kd(models, s, batch, steps=steps_of(s, short=args.scale > 1))
    elif args.mode == "kd-unfused":
        out = run_kd(models, s, batch, fused=False)
    elif args.mode == "mlx":
        out = run_mlx(models, s, batch)
    elif args.mode == "breakdown":
        out = run_breakdown(models, s, batch)
    else:
        out = run_torch(models, s, batch)
    sys.stdout.flush()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
