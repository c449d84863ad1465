"""Where a real model's distillation step spends its time, kd (MLX) beside PyTorch: the
``breakdown`` of the ``real_model`` section (benchmarks/real_model.py's step, same model,
shapes and tokens).

By phase, each timed alone (median of 3 after one warm-up, evaluated between phases):
``teacher_forward`` (its final hidden states, no gradient), ``student_forward``,
``loss`` (kd: the fused head + loss pass, CE + KL(T = 1) with its gradient, from fixed
hidden states; PyTorch: both heads' logits, CE + KL and their backward to the hidden
states), ``backward`` (the student's forward + loss + backward, less the forward and the
loss) and ``optimizer`` (one AdamW update).

Inside the student's layers, by kind of work: one layer's operations at the step's shape
[B, L, D], forward and backward, each kind timed alone and multiplied by the student's
layers (value and gradients, with kd's heap reuse): ``matmuls`` (the seven projections,
forward and both gradients), ``attention`` (scores, softmax and values;
kd: with and without the native softmax), ``norms`` (two RMSNorms), ``rotary`` (RoPE on q
and k), ``activations`` (SwiGLU; kd: with and without the native kernel) and ``copies``
(the head split and merge: reshape, transpose, contiguous copy). PyTorch's rows come from
``torch.profiler`` over one student forward + backward (self CPU time per ``aten`` op,
grouped into the same kinds; ``other`` is what no kind claims).

``python -m benchmarks.real_model_breakdown`` prints the JSON that ``benchmarks/run --only
real_model_breakdown`` stores (each side in its own process, ``--side kd|torch``; about 3
minutes on 2 cores); ``--quick`` runs real_model's tiny random llama.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def _timed(fn, evaluate, runs: int = 3) -> float:
    evaluate(fn())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        evaluate(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------- kd (MLX)


def kd_side(ctx: dict) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from kdcore.engine.fused import FusedTerm, fused_pass
    from kdcore.engine.heap import reuse_freed_memory
    from kdcore.engine.optim import AdamW
    from kdcore.kernels.native import install_registered_kernels, native_kernel
    from kdcore.losses.rows import cross_entropy_rows, teacher_rows
    from kdcore.models import ops
    from kdcore.models.mlxlm import load_mlxlm
    from kdcore.signal.teacher import TeacherSignal

    install_registered_kernels()
    reuse_freed_memory()  # as kd distill runs (kdcore.engine.heap)
    teacher, config = load_mlxlm(ctx["teacher"], "float32")
    student, _ = load_mlxlm(ctx["teacher"], "float32")
    inner = student.model
    inner.layers = [inner.layers[i] for i in ctx["layer_map"]]
    student.args.num_hidden_layers = len(inner.layers)
    mx.eval(student.parameters())
    data = np.load(ctx["batches"])
    ids = mx.array(data["input_ids"][0])
    labels = mx.array(data["labels"][0])
    mask = (labels >= 0).astype(mx.float32)
    batch = {"input_ids": ids, "labels": labels, "mask": mask}
    head = teacher.model.embed_tokens.as_linear
    weight = student.model.embed_tokens.weight

    def evaluate(x):
        mx.eval(x)

    t_hidden = teacher.model(ids)
    mx.eval(t_hidden)
    signal = TeacherSignal(vocab_size=config["vocab_size"], final_hidden=t_hidden, head=head)

    def loss_of(hidden):
        from kdcore.models.output import ModelOutput

        out = ModelOutput(final_hidden=hidden, head=lambda h: h @ weight.T, head_weight=weight)
        terms = [
            FusedTerm("ce", cross_entropy_rows(), 0.5, mask),
            FusedTerm("kl", teacher_rows(signal, "forward_kl"), 0.5, mask),
        ]
        return fused_pass(terms, out, signal, batch, head_grad=True)[0]

    s_hidden = mx.stop_gradient(student.model(ids))
    mx.eval(s_hidden)

    def objective(model):
        return loss_of(model.model(ids))

    value_and_grad = nn.value_and_grad(student, objective)
    phases = {
        "teacher_forward": _timed(lambda: teacher.model(ids), evaluate),
        "student_forward": _timed(lambda: student.model(ids), evaluate),
        "loss": _timed(lambda: mx.grad(loss_of)(s_hidden), evaluate),
    }
    whole = _timed(lambda: value_and_grad(student), evaluate)
    phases["backward"] = whole - phases["student_forward"] - phases["loss"]
    _, grads = value_and_grad(student)
    mx.eval(grads)
    optimizer = AdamW(learning_rate=1e-4, weight_decay=0.0, kernel=native_kernel("adam"))
    phases["optimizer"] = _timed(
        lambda: optimizer.update(student, grads), lambda _: mx.eval(student.parameters())
    )

    # one layer's kinds of work, forward and backward, at [B, L, D]
    layer = inner.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    B, L = ids.shape
    D = config["hidden_size"]
    heads, kv = attn.n_heads, attn.n_kv_heads
    hd = D // heads
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((B, L, D)).astype(np.float32))
    q = mx.array(rng.standard_normal((B, heads, L, hd)).astype(np.float32))
    k = mx.array(rng.standard_normal((B, kv, L, hd)).astype(np.float32))
    v = mx.array(rng.standard_normal((B, kv, L, hd)).astype(np.float32))
    gate = mx.array(rng.standard_normal((B, L, mlp.gate_proj.weight.shape[0])).astype(np.float32))

    # value and gradient, as a layer in the step computes both: mx.grad of a sum alone
    # skips the forward products that the gradient does not read
    def fwd_bwd(f, *args):
        argnums = tuple(range(len(args)))
        return lambda: mx.value_and_grad(lambda *a: f(*a).sum(), argnums=argnums)(*args)

    projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    mats = [p.weight for p in projections] + [
        mlp.gate_proj.weight,
        mlp.up_proj.weight,
        mlp.down_proj.weight,
    ]

    def matmuls(x, gate, *weights):  # each product's input and weight gradients, as in a layer
        total = 0.0
        for w in weights:
            inp = x if w.shape[1] == D else gate
            total = total + (inp @ w.T).sum()
        return total

    def heads_split(x):
        return (
            x.reshape(B, L, heads, hd).transpose(0, 2, 1, 3).transpose(0, 2, 1, 3).reshape(B, L, D)
            + 0.0
        )

    saved = ops.use_layer_kernels(None, None)
    try:
        mlx_attention = _timed(
            fwd_bwd(lambda q, k, v: ops.attention(q, k, v, hd**-0.5, "causal"), q, k, v), evaluate
        )
        mlx_swiglu = _timed(fwd_bwd(lambda g, u: ops.swiglu(g, u), gate, gate), evaluate)
    finally:
        ops.use_layer_kernels(*saved)
    per_layer = {
        "matmuls": _timed(
            lambda: mx.value_and_grad(matmuls, argnums=tuple(range(2 + len(mats))))(x, gate, *mats),
            evaluate,
        ),
        "attention": _timed(
            fwd_bwd(lambda q, k, v: ops.attention(q, k, v, hd**-0.5, "causal"), q, k, v), evaluate
        ),
        "attention_without_native_softmax": mlx_attention,
        "norms": _timed(
            fwd_bwd(lambda x: layer.input_layernorm(x) + layer.post_attention_layernorm(x), x),
            evaluate,
        ),
        "rotary": _timed(
            fwd_bwd(lambda q, k: attn.rope(q).sum() + attn.rope(k).sum(), q, k), evaluate
        ),
        "activations": _timed(fwd_bwd(lambda g, u: ops.swiglu(g, u), gate, gate), evaluate),
        "activations_without_native_swiglu": mlx_swiglu,
        "copies": _timed(fwd_bwd(heads_split, x), evaluate),
    }
    layers = len(inner.layers)
    return {
        "phases_s": phases,
        "step_s": sum(phases.values()),
        "student_layers_s": {k: v * layers for k, v in per_layer.items()},
        "per_layer_s": per_layer,
        "parameters": sum(v.size for _, v in tree_flatten(student.parameters())),
    }


# ---------------------------------------------------------------- PyTorch

KINDS = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product", "flash_attention", "aten::_softmax", "attention"),
    "norms": ("aten::pow", "aten::mean", "aten::rsqrt", "rms_norm"),
    "rotary": ("aten::cat", "aten::neg", "aten::slice"),
    "activations": ("aten::silu", "silu_backward"),
    "copies": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::transpose", "aten::t"),
    "allocation": ("aten::empty", "aten::zeros", "aten::fill_", "aten::resize_"),
}


def torch_side(ctx: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    path = ctx["teacher"]
    teacher = LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    )
    teacher.eval().requires_grad_(False)
    config = LlamaConfig.from_pretrained(path, num_hidden_layers=len(ctx["layer_map"]))
    config._attn_implementation = "sdpa"
    student = LlamaForCausalLM(config).to(torch.float32)
    source = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        parts = name.split(".")
        if name.startswith("model.layers."):
            parts[2] = str(ctx["layer_map"][int(parts[2])])
        state[name] = source[".".join(parts)].clone()
    student.load_state_dict(state, strict=True)
    student.tie_weights()
    student.train()
    data = np.load(ctx["batches"])
    x = torch.from_numpy(data["input_ids"][0].astype(np.int64))
    y = torch.from_numpy(data["labels"][0].astype(np.int64))
    vocab = config.vocab_size
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=x, use_cache=False).last_hidden_state

    def loss_of(hidden):
        s_logits = student.lm_head(hidden)
        with torch.no_grad():
            t_logits = teacher.lm_head(t_hidden)
        ce = F.cross_entropy(s_logits.reshape(-1, vocab), y.reshape(-1))
        kl = F.kl_div(
            F.log_softmax(s_logits, -1).reshape(-1, vocab),
            F.log_softmax(t_logits, -1).reshape(-1, vocab),
            log_target=True,
            reduction="batchmean",
        )
        return 0.5 * ce + 0.5 * kl

    def nothing(_):
        return None

    def teacher_forward():
        with torch.no_grad():
            return teacher.model(input_ids=x, use_cache=False)

    def student_forward():
        return student.model(input_ids=x, use_cache=False).last_hidden_state

    hidden = student_forward().detach().requires_grad_(True)

    def loss_only():
        student.zero_grad(set_to_none=True)
        loss_of(hidden).backward()

    def whole():
        student.zero_grad(set_to_none=True)
        loss_of(student_forward()).backward()

    phases = {
        "teacher_forward": _timed(teacher_forward, nothing),
        "student_forward": _timed(student_forward, nothing),
        "loss": _timed(loss_only, nothing),
    }
    total = _timed(whole, nothing)
    phases["backward"] = total - phases["student_forward"] - phases["loss"]
    whole()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
    phases["optimizer"] = _timed(optimizer.step, nothing)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        student.zero_grad(set_to_none=True)
        hidden_states = student_forward()
        hidden_states.sum().backward()
    kinds = {k: 0.0 for k in [*KINDS, "other"]}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        name = event.key
        kind = next((k for k, names in KINDS.items() if any(n in name for n in names)), "other")
        kinds[kind] += seconds
    return {
        "phases_s": phases,
        "step_s": sum(phases.values()),
        "student_layers_s": kinds,
        "method": "torch.profiler self CPU time over one student forward + backward",
        "torch": torch.__version__,
    }


def measure(quick: bool = False) -> dict:
    import tempfile
    from pathlib import Path

    from benchmarks.common import machine, run_isolated
    from benchmarks.real_model import prepare_data, shapes, teacher_folder
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
    prepare_data(ctx)
    sides = {
        # PyTorch as a user runs it: without kd's OpenBLAS preload (see run_isolated)
        side: run_isolated(
            "real_model_breakdown",
            ["--side", side, "--ctx", json.dumps(ctx)],
            fast_path=False if side == "torch" else None,
        )
        for side in ("kd", "torch")
    }
    from kdcore.kernels.native import install_registered_kernels, row_kernel_status

    install_registered_kernels()
    return {
        **sides,
        "shapes": {"batch": s["batch"], "seq": s["seq"], "layers": s["student_layers"]},
        "machine": machine(),
        # which attention kd's layers ran: the flash kernel, or the native softmax before it
        "attention_kernel": "flash"
        if row_kernel_status()["attention"]["path"] == "native"
        else "softmax",
        "torch_as_users_run_it": True,  # without kd's OpenBLAS preload
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=["kd", "torch"])
    parser.add_argument("--ctx")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.side is None:
        print(json.dumps(measure(args.quick)))
        return
    ctx = json.loads(args.ctx)
    result = kd_side(ctx) if args.side == "kd" else torch_side(ctx)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
