"""Distillation of a real pretrained model: kd distill (live teacher and top-k cache) against
PyTorch + transformers on CPU, the same step on the same tokens.

Models: SmolLM2-135M-Instruct (llama, 30 layers, hidden 576, V = 49,152, tied embeddings)
imported from the GGUF the test suite fetches (``tests/real_models.py``) as float32
(``kdcore.gguf.convert.imported_folder(..., "float32")``: what kd's CPU dtype policy
computes in) is the teacher; the student is the same model at half its depth, its first 8
and last 7 layers (``from-teacher`` with ``layer_map = "ends"``, as examples/smollm2 makes
it). One step: batch 4 x 512 tokens of tinyshakespeare (SmolLM2's tokenizer, kd's ``text``
dataset, seed 0), ``0.5 CE + 0.5 KL(teacher || student)`` at T = 1, AdamW (lr 1e-4, bias
correction, no weight decay: torch.optim.AdamW's update), float32. Each contender runs in
its own process (clean peak memory):

- ``kd``: ``app.distill`` on a spec (live teacher; step time from the run's own ``step_s``
  records, MLX peak memory at the end, process peak RSS);
- ``kd_no_layer_kernels``: ``kd`` with ``KD_LAYER_KERNELS=off`` (MLX's own attention and
  SwiGLU in the layers; the loss rows and Adam stay native): what the layer kernels give;
- ``kd_cache``: the same student and loss from a top-64 cache of the same teacher over the
  same data (``kdcore.cache.write.write_cache`` first, in its own process, not timed);
- ``torch``: ``LlamaForCausalLM`` (transformers) loaded from the same imported folder
  (float32, sdpa attention); the student is a 15-layer ``LlamaForCausalLM`` whose state dict
  is the teacher's with student layer i <- teacher layer ``ends_layer_map(15, 30)[i]`` (the
  map kd's initializer uses, passed from this script) and the same embeddings, final norm
  and tied head; full logits, ``F.cross_entropy`` + ``F.kl_div``, ``torch.optim.AdamW``,
  CPU threads = cores. Its token batches are the kd dataset's own ``batch(step, 4)`` rows,
  written by this script to a file (the PyTorch process never imports kdcore or MLX); its
  first two steps' losses equal kd's to 5 digits (checked at SmolLM2, 1 x 32 tokens: the
  same weights, data, loss and update; ``first_loss`` records step 1's). It runs twice: as
  a user starts it, and with glibc's heap reuse (``torch_heap_reuse``: the ``MALLOC_``
  variables of ``benchmarks.real_vocab.GLIBC_HEAP_REUSE``, what kd sets for itself with
  ``mallopt``). Skipped when torch is not installed (``pip install torch==2.13.0
  transformers``: benchmarks only, never a runtime dependency).

kd, kd_cache and PyTorch run 5 steps and report the median of the last 4. The text is cut
(``max_chars``) to about the 20 train rows those steps read, so the cache covers little
more. A second point runs kd at 4x the tokens (batch 16 x 512, drawn epoch by epoch from the
same rows; 3 steps, the median of the last 2).

``python -m benchmarks.real_model`` prints the JSON that ``benchmarks/run --only real_model``
stores under ``real_model`` (estimated 10-15 minutes on 2 cores); ``--quick`` runs a tiny random
llama made offline with ``kdcore.models.mlxlm.create_mlxlm_dir`` (4 layers, student 2) at
tiny shapes: a check that every mode works, no download needed.
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

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt"
TOP_K = 64
VAL_FRACTION = 0.1


def shapes(quick: bool) -> dict:
    if quick:
        return dict(
            model="tiny random llama",
            teacher_layers=4,
            student_layers=2,
            hidden=64,
            vocab=512,
            seq=64,
            batch=2,
            steps=3,
            short_steps=3,
        )
    return dict(
        model="SmolLM2-135M-Instruct",
        teacher_layers=30,
        student_layers=15,
        hidden=576,
        vocab=49_152,
        seq=512,
        batch=4,
        steps=5,
        short_steps=3,
    )


def steps_of(s: dict, short: bool = False) -> int:
    return s["short_steps"] if short else s["steps"]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tiny_llama(s: dict) -> dict:
    return dict(
        model_type="llama",
        hidden_size=s["hidden"],
        num_hidden_layers=s["teacher_layers"],
        intermediate_size=2 * s["hidden"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=s["hidden"] // 4,
        rms_norm_eps=1e-5,
        vocab_size=s["vocab"],
        max_position_embeddings=1024,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
    )


def teacher_folder(root: Path, s: dict, quick: bool) -> Path:
    if quick:
        from kdcore.models.mlxlm import create_mlxlm_dir

        path = root / "teacher"
        if not (path / "model.safetensors").exists():
            create_mlxlm_dir(path, tiny_llama(s), seed=1)
        return path
    import importlib.util

    from kdcore.gguf.convert import imported_folder

    where = importlib.util.spec_from_file_location("real_models", ROOT / "tests" / "real_models.py")
    module = importlib.util.module_from_spec(where)
    where.loader.exec_module(module)
    return imported_folder(module.smollm2_gguf(), "float32")  # imported once, then cached


# ---------------------------------------------------------------- kd distill


def kd_spec(ctx: dict, batch: int, steps: int, cache: bool = False) -> dict:
    s, teacher = ctx["shapes"], ctx["teacher"]
    init = {"layer_map": "ends"}
    if cache:  # a cache holds no weights: from-teacher copies from the teacher's folder
        init["teacher_path"] = teacher
    return {
        "run": {"name": "real-model-cache" if cache else "real-model", "seed": 0},
        "data": {
            "name": "text",
            "params": {
                "path": str(CORPUS),
                "seq_len": s["seq"],
                "val_fraction": VAL_FRACTION,
                "max_chars": ctx["max_chars"],
                "tokenizer": teacher,
            },
        },
        "teachers": [{"cache": ctx["cache"]} if cache else {"source": "mlx-lm", "path": teacher}],
        "student": {
            "model": {
                "name": "mlx-lm",
                "params": {"base": teacher, "config": {"num_hidden_layers": s["student_layers"]}},
            },
            "init": {"name": "from-teacher", "params": init},
        },
        "losses": [
            {"name": "ce", "weight": 0.5},
            {"name": "hinton", "weight": 0.5, "params": {"temperature": 1.0}},
        ],
        "train": {
            "steps": steps,
            "batch_size": batch,
            "log_every": 1,
            "grad_clip": None,
            # torch.optim.AdamW's algorithm: bias-corrected moments, no weight decay
            "optimizer": {
                "name": "adamw",
                "lr": 1e-4,
                "weight_decay": 0.0,
                "params": {"bias_correction": True},
            },
        },
        "eval": {"batches": 1},
    }


def run_kd(ctx: dict, batch: int, steps: int, cache: bool = False) -> dict:
    import mlx.core as mx

    from kdcore import app

    with tempfile.TemporaryDirectory() as out:
        mx.reset_peak_memory()
        app.distill(kd_spec(ctx, batch, steps, cache), output=Path(out) / "run", progress=False)
        peak = mx.get_peak_memory()
        text = (Path(out) / "run" / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    times = [r["step_s"] for r in records if "step_s" in r]
    return {
        "step_s": statistics.median(times[1:]),  # the first step compiles and warms up
        "steps_s": times,
        "losses": [r["loss"] for r in records if "step_s" in r],
        "mlx_peak_bytes": peak,
        "peak_rss_bytes": peak_rss(),
        "tokens": batch * ctx["shapes"]["seq"],
    }


def run_cache(ctx: dict) -> dict:
    """The teacher's top-k cache over the spec's data (not timed: done once, reused)."""
    from kdcore.cache.write import write_cache

    s = ctx["shapes"]
    spec = kd_spec(ctx, s["batch"], s["steps"])
    manifest = write_cache(spec, ctx["cache"], top_k=TOP_K, progress=False)
    return {"teachers": len(manifest["teachers"]), "k": TOP_K}


def prepare_data(ctx: dict) -> dict:
    """Choose ``max_chars`` so the train split holds one 1x run's rows without repeats
    (kd_cache's cache covers the split: no more than needed), and write the kd dataset's
    batches for the PyTorch contender."""
    from kdcore.data.build import build_dataset
    from kdcore.spec.load import load_spec

    s = ctx["shapes"]
    rows = s["steps"] * s["batch"]
    ctx["max_chars"] = int(rows * (s["seq"] + 1) * 1.5 / (1 - VAL_FRACTION))
    while True:
        dataset = build_dataset(load_spec(kd_spec(ctx, s["batch"], s["steps"])))
        if dataset.num_examples("train") >= rows and dataset.num_examples("val") >= 1:
            break
        ctx["max_chars"] = int(ctx["max_chars"] * 1.25)
    picked = [dataset.batch(i, s["batch"]) for i in range(s["steps"])]  # kd's step i rows
    np.savez(
        ctx["batches"],
        input_ids=np.stack([b["input_ids"] for b in picked]),
        labels=np.stack([b["labels"] for b in picked]),
    )
    return {
        "train_rows": dataset.num_examples("train"),
        "val_rows": dataset.num_examples("val"),
        "max_chars": ctx["max_chars"],
        "masked_tokens": int(sum((b["mask"] == 0).sum() for b in picked)),
    }


# ---------------------------------------------------------------- PyTorch + transformers


def run_torch(ctx: dict) -> dict:
    try:
        import torch
        import torch.nn.functional as F
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        return {"skipped": f"{exc.name} is not installed (pip install torch==2.13.0)"}
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    path = ctx["teacher"]
    teacher = LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    config = LlamaConfig.from_pretrained(path, num_hidden_layers=len(ctx["layer_map"]))
    config._attn_implementation = "sdpa"
    student = LlamaForCausalLM(config).to(torch.float32)
    source = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        parts = name.split(".")
        if name.startswith("model.layers."):  # student layer i <- teacher layer map[i]
            parts[2] = str(ctx["layer_map"][int(parts[2])])
        state[name] = source[".".join(parts)].clone()
    student.load_state_dict(state, strict=True)
    student.tie_weights()
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
    data = np.load(ctx["batches"])
    vocab = config.vocab_size
    times, losses = [], []
    for ids, labels in zip(data["input_ids"], data["labels"]):
        x = torch.from_numpy(ids.astype(np.int64))
        y = torch.from_numpy(labels.astype(np.int64))
        start = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(input_ids=x, use_cache=False).logits.float()
        s_logits = student(input_ids=x, use_cache=False).logits.float()
        ce = F.cross_entropy(s_logits.reshape(-1, vocab), y.reshape(-1))
        kl = F.kl_div(
            F.log_softmax(s_logits, -1).reshape(-1, vocab),
            F.log_softmax(t_logits, -1).reshape(-1, vocab),
            log_target=True,
            reduction="batchmean",
        )
        loss = 0.5 * ce + 0.5 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {
        "step_s": statistics.median(times[1:]),
        "steps_s": times,
        "losses": losses,
        "peak_rss_bytes": peak_rss(),
        "tokens": int(data["input_ids"][0].size),
        "torch": torch.__version__,
        "student_parameters": sum(p.numel() for p in student.parameters()),
    }


# ---------------------------------------------------------------- the section


def _ratio(a: dict, b: dict, key: str) -> float | None:
    return a[key] / b[key] if key in a and key in b else None


def measure(quick: bool = False) -> dict:
    from benchmarks.common import machine, run_isolated
    from benchmarks.real_vocab import GLIBC_HEAP_REUSE
    from kdcore.models.init import ends_layer_map

    load_before = os.getloadavg()[0]
    s = shapes(quick)
    root = Path(tempfile.gettempdir()) / f"kd-real-model-{'quick' if quick else 'full'}"
    root.mkdir(parents=True, exist_ok=True)
    ctx = {
        "shapes": s,
        "teacher": str(teacher_folder(root, s, quick)),
        "batches": str(root / "batches.npz"),
        "layer_map": ends_layer_map(s["student_layers"], s["teacher_layers"]),
    }
    data = prepare_data(ctx)
    # a cache is reused by a rerun with the same data (write_cache refuses other settings)
    ctx["cache"] = str(root / f"cache-{ctx['max_chars']}-{s['seq']}")
    args = ["--ctx", json.dumps(ctx)] + (["--quick"] if quick else [])

    def mode(name: str, *extra: str, env: dict | None = None) -> dict:
        # PyTorch as a user runs it: without kd's OpenBLAS preload (see run_isolated)
        peer = False if name == "torch" else None
        return run_isolated(
            "real_model",
            ["--mode", name, *extra, *args],
            env=env,
            fast_path=peer,
            may_fail=name == "torch",
        )

    kd = mode("kd")
    # the lever of the layer kernels (kdcore.models.ops): the same step without them
    kd_no_layers = mode("kd", env={"KD_LAYER_KERNELS": "off"})
    mode("cache")
    kd_cache = mode("kd-cache")
    torch = mode("torch")
    # PyTorch's CPU allocator is glibc's malloc: the heap reuse kd turns on for itself
    torch_heap = mode("torch", env=GLIBC_HEAP_REUSE)
    kd_4x = mode("kd", "--scale", "4")
    return {
        "shapes": {
            **s,
            "tokens_per_step": s["batch"] * s["seq"],
            "layer_map": ctx["layer_map"],
            "top_k": TOP_K,
            "data": {"corpus": CORPUS.name, **data},
        },
        "machine": machine(),
        "torch_as_users_run_it": True,  # without kd's OpenBLAS preload
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "kd": kd,
        "kd_no_layer_kernels": {**kd_no_layers, "env": {"KD_LAYER_KERNELS": "off"}},
        "kd_cache": kd_cache,
        "torch": torch,
        "torch_heap_reuse": {**torch_heap, "env": GLIBC_HEAP_REUSE},
        "kd_4x_tokens": kd_4x,
        "kd_step_s": kd["step_s"],
        "kd_cache_step_s": kd_cache["step_s"],
        "kd_no_layer_kernels_step_s": kd_no_layers["step_s"],
        "layer_kernels_speedup": kd_no_layers["step_s"] / kd["step_s"],
        "torch_step_s": torch.get("step_s"),
        "torch_heap_reuse_step_s": torch_heap.get("step_s"),
        "kd_peak_rss_bytes": kd["peak_rss_bytes"],
        "kd_mlx_peak_bytes": kd["mlx_peak_bytes"],
        "kd_cache_peak_rss_bytes": kd_cache["peak_rss_bytes"],
        "kd_cache_mlx_peak_bytes": kd_cache["mlx_peak_bytes"],
        "torch_peak_rss_bytes": torch.get("peak_rss_bytes"),
        "torch_heap_reuse_peak_rss_bytes": torch_heap.get("peak_rss_bytes"),
        "kd_vs_torch": _ratio(kd, torch, "step_s"),
        "kd_vs_torch_heap_reuse": _ratio(kd, torch_heap, "step_s"),
        "kd_cache_vs_torch": _ratio(kd_cache, torch, "step_s"),
        "kd_rss_vs_torch": _ratio(kd, torch, "peak_rss_bytes"),
        # the same student, data and loss: the first steps' losses agree (a check)
        "first_loss": {"kd": kd["losses"][0], "torch": (torch.get("losses") or [None])[0]},
        "kd_4x_step_s": kd_4x["step_s"],
        "kd_4x_peak_rss_bytes": kd_4x["peak_rss_bytes"],
        "kd_4x_mlx_peak_bytes": kd_4x["mlx_peak_bytes"],
        "kd_4x_step_over_1x": kd_4x["step_s"] / kd["step_s"],
        "kd_4x_mlx_peak_over_1x": kd_4x["mlx_peak_bytes"] / kd["mlx_peak_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["kd", "kd-cache", "cache", "torch"])
    parser.add_argument("--ctx", help="JSON: teacher folder, cache, batches file, layer map")
    parser.add_argument("--scale", type=int, default=1, help="batch multiplier (kd)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    args = parser.parse_args()
    if args.mode is None:
        print(json.dumps(measure(args.quick)))
        return
    ctx = json.loads(args.ctx)
    s = ctx["shapes"]
    if args.mode == "kd":
        out = run_kd(ctx, s["batch"] * args.scale, steps_of(s, short=args.scale > 1))
    elif args.mode == "kd-cache":
        out = run_kd(ctx, s["batch"], s["steps"], cache=True)
    elif args.mode == "cache":
        out = run_cache(ctx)
    else:
        out = run_torch(ctx)
    sys.stdout.flush()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
