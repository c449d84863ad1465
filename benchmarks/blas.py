"""MLX with the BLAS its Linux wheel carries vs the OpenBLAS fast path that `kd` preloads.

Run as a child process twice (with and without LD_PRELOAD); each prints the time of a
512x512 matmul and of one training step of the bundled example's student.
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from benchmarks.common import median_time, run_isolated
from kdcore.cli import fastpath
from kdcore.losses.tokens import masked_mean, token_cross_entropy
from kdcore.models.transformer import Transformer, TransformerConfig


def child() -> dict:
    a, b = mx.random.normal((512, 512)), mx.random.normal((512, 512))
    mx.eval(a, b)
    matmul = median_time(lambda: mx.eval(a @ b), repeats=10)
    model = Transformer(TransformerConfig(dim=80, layers=2, heads=4, max_seq_len=128))
    opt = optim.AdamW(1e-3)
    ids = mx.random.randint(0, 256, (16, 128))
    mask = mx.ones((16, 128))
    loss_and_grad = nn.value_and_grad(
        model, lambda m: masked_mean(token_cross_entropy(m(ids).logits, ids), mask)
    )

    def step():
        loss, grads = loss_and_grad(model)
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)

    return {
        "matmul_512_s": matmul,
        "train_step_s": median_time(step, repeats=3),
        "fast_path_active": fastpath.fast_path_active(),
    }


def main() -> None:
    if fastpath.openblas_path() is None:
        print(json.dumps({"available": False}))
        return
    bundled = run_isolated("blas", ["--child"], fast_path=False)
    fast = run_isolated("blas", ["--child"], fast_path=True)
    print(
        json.dumps(
            {
                "available": True,
                "bundled": bundled,
                "fast": fast,
                "matmul_speedup": bundled["matmul_512_s"] / fast["matmul_512_s"],
                "train_step_speedup": bundled["train_step_s"] / fast["train_step_s"],
            }
        )
    )


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(child()))
    else:
        main()
