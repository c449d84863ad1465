"""Framework overhead: a `kd distill` step against a minimal hand-written MLX loop that
trains the same student on the same batches with the same loss (0.5 CE + 0.5 T^2 KL).

Steady-state time per step is taken as the difference between runs of N1 and N2 steps,
so set-up, evaluation and saving cancel out. Target: ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from kdcore import app
from kdcore.engine.build import build_parts
from kdcore.engine.distill import train_parts
from kdcore.losses.tokens import masked_mean, token_cross_entropy
from kdcore.models.io import load_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shakespeare"


def spec_dict(steps: int) -> dict:
    return {
        "run": {"name": "overhead", "seed": 0},
        "data": {
            "name": "text",
            "params": {
                "path": str(EXAMPLE / "data" / "tinyshakespeare.txt"),
                "seq_len": 128,
                "val_fraction": 0.05,
            },
        },
        "teachers": [{"path": str(EXAMPLE / "teacher")}],
        "student": {
            "model": {
                "name": "transformer",
                "params": {"dim": 80, "layers": 2, "heads": 4, "max_seq_len": 128},
            }
        },
        "losses": [
            {"name": "ce", "weight": 0.5},
            {"name": "hinton", "weight": 0.5, "params": {"temperature": 2.0}},
        ],
        "train": {
            "steps": steps,
            "batch_size": 16,
            "log_every": 1000,
            "grad_clip": None,
            "optimizer": {"name": "adamw", "lr": 1e-3},
        },
        "eval": {"batches": 1},
    }


def engine_seconds(steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_parts(app.load_spec(spec_dict(steps)))
        start = time.perf_counter()
        train_parts(parts, Path(tmp) / "run", progress=False)
        return time.perf_counter() - start


def minimal_seconds(steps: int) -> float:
    """The loop a user would write by hand with MLX alone."""
    dataset = build_parts(app.load_spec(spec_dict(steps))).dataset
    mx.random.seed(0)
    from kdcore.models.transformer import Transformer, TransformerConfig

    student = Transformer(
        TransformerConfig(vocab_size=256, dim=80, layers=2, heads=4, max_seq_len=128)
    )
    teacher, _, _ = load_model(EXAMPLE / "teacher")
    teacher.freeze()
    optimizer = optim.AdamW(learning_rate=1e-3, weight_decay=0.0)
    T = 2.0

    def loss_fn(model, ids, labels, mask, t_logits):
        s_logits = model(ids).logits
        ce = masked_mean(token_cross_entropy(s_logits, labels), mask)
        lt = nn.log_softmax(t_logits / T, -1)
        ls = nn.log_softmax(s_logits / T, -1)
        kl = masked_mean((mx.exp(lt) * (lt - ls)).sum(-1), mask) * T * T
        return 0.5 * ce + 0.5 * kl

    loss_and_grad = nn.value_and_grad(student, loss_fn)
    start = time.perf_counter()
    for step in range(steps):
        batch = {k: mx.array(v) for k, v in dataset.batch(step, 16).items()}
        t_logits = mx.stop_gradient(teacher(batch["input_ids"]).logits)
        loss, grads = loss_and_grad(
            student, batch["input_ids"], batch["labels"], batch["mask"], t_logits
        )
        optimizer.update(student, grads)
        mx.eval(loss, student.parameters(), optimizer.state)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--long", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    engine, minimal = [], []
    for _ in range(args.rounds):  # interleaved so drifts in machine load hit both
        engine.append(
            (engine_seconds(args.long) - engine_seconds(args.short)) / (args.long - args.short)
        )
        minimal.append(
            (minimal_seconds(args.long) - minimal_seconds(args.short)) / (args.long - args.short)
        )
    e, m = min(engine), min(minimal)
    print(
        json.dumps(
            {
                "engine_step_s": e,
                "minimal_step_s": m,
                "ratio": e / m,
                "target": 1.10,
                "tokens_per_step": 16 * 128,
            }
        )
    )


if __name__ == "__main__":
    main()
