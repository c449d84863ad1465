"""How a distillation step's time grows with tokens per batch and with vocabulary size.

One step = teacher forward, student forward + backward of 0.5 CE + 0.5 hinton, AdamW
update, on synthetic token ids (teacher dim 128 x 4 layers, student dim 64 x 2 layers).
Both curves should be close to linear; the report fits a line through the origin and
gives each point's ratio to it.
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

import kdcore
from benchmarks.common import median_time
from kdcore import app, testing
from kdcore.losses.inputs import LossInputs
from kdcore.models.transformer import Transformer, TransformerConfig


def step_seconds(batch: int, length: int, vocab: int) -> float:
    mx.random.seed(0)
    teacher = Transformer(
        TransformerConfig(vocab_size=vocab, dim=128, layers=4, heads=4, max_seq_len=length)
    )
    student = Transformer(
        TransformerConfig(vocab_size=vocab, dim=64, layers=2, heads=4, max_seq_len=length)
    )
    teacher.freeze()
    ce = testing.build_loss("ce")
    hinton = testing.build_loss("hinton", temperature=2.0)
    config = app.make_config("loss", "hinton", temperature=2.0)
    optimizer = optim.AdamW(learning_rate=1e-3)
    ids = mx.random.randint(0, vocab, (batch, length))
    batch_arrays = {
        "input_ids": ids,
        "labels": mx.random.randint(0, vocab, (batch, length)),
        "mask": mx.ones((batch, length)),
    }

    def loss_fn(model, signal):
        out = model(ids)
        base = LossInputs(student=out, teacher=signal, batch=batch_arrays)
        a, _ = ce(base)
        b, _ = hinton(LossInputs(student=out, teacher=signal, batch=batch_arrays, params=config))
        return 0.5 * a + 0.5 * b

    loss_and_grad = nn.value_and_grad(student, loss_fn)

    def step():
        signal = kdcore.TeacherSignal(
            vocab_size=vocab, logits=mx.stop_gradient(teacher(ids).logits)
        )
        loss, grads = loss_and_grad(student, signal)
        optimizer.update(student, grads)
        mx.eval(loss, student.parameters(), optimizer.state)

    return median_time(step, repeats=3, warmup=1)


def linearity(xs: list[int], ys: list[float]) -> dict:
    """Least-squares line ``y = a + b x`` (a: the part of a step that does not grow with x),
    each point's ratio to it, and R^2."""
    n = len(xs)
    mx_, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx_) ** 2 for x in xs)
    slope = sum((x - mx_) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx_
    line = [intercept + slope * x for x in xs]
    residual = sum((y - f) ** 2 for y, f in zip(ys, line))
    total = sum((y - my) ** 2 for y in ys)
    return {
        "seconds_per_unit": slope,
        "intercept_s": intercept,
        "r_squared": 1.0 - residual / total if total > 0 else 1.0,
        "ratio_to_line": [y / f for y, f in zip(ys, line)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="512,1024,2048,4096")
    parser.add_argument("--vocabs", default="256,2048,8192,32768")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    vocabs = [int(v) for v in args.vocabs.split(",")]
    by_tokens = [step_seconds(t // 128, 128, 256) for t in tokens]
    by_vocab = [step_seconds(4, 128, v) for v in vocabs]
    print(
        json.dumps(
            {
                "tokens": tokens,
                "step_s_by_tokens": by_tokens,
                "tokens_fit": linearity(tokens, by_tokens),
                "vocabs": vocabs,
                "step_s_by_vocab": by_vocab,
                "vocab_tokens": 512,
                "vocab_fit": linearity(vocabs, by_vocab),
            }
        )
    )


if __name__ == "__main__":
    main()
