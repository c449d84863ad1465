"""The native row kernels survive a stress run in a child process, interpreter exit included.

Intermittent segfaults (and a bus error) were reported from ``kd distill`` runs with the
native rows on (mid-run in ``_ext.dense_rows`` called from ``chunked_token_mean`` and the
fused pass, and once at interpreter exit). A crash kills the process, so the work runs in a
child python and the test asserts that it exited cleanly. The child makes many calls of
every primitive with varied shapes (empty chunks, V not a multiple of any vector width),
transposed, sliced and broadcast inputs, a broadcast ``scale``, bfloat16 and float16
logits, int64 labels and ids, and the primitives' own VJPs (a broadcast cotangent) taken
twice; then ``chunked_token_mean`` (V = 151,936, chunks of 55 rows as the fused pass has
them) and ``dense_divergence`` under ``mx.value_and_grad`` twice, a short ``app.distill``
run (ce + hinton: the engine's fused head + loss pass), and it exits with arrays (some never
evaluated) still alive.

``KD_KERNELS_STRESS_RUNS`` (default 1) repeats the child, e.g. 20 to hunt an intermittent
crash by hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

kd_kernels = pytest.importorskip("kd_kernels")
if kd_kernels.unavailable_reason() is not None:
    pytest.skip(kd_kernels.unavailable_reason(), allow_module_level=True)

CHILD = textwrap.dedent(
    """
    import faulthandler
    import sys

    import mlx.core as mx
    import numpy as np

    import kd_kernels
    import kdcore
    from kd_kernels import _ext
    from kdcore import app, testing

    faulthandler.enable()
    app.install_registered_kernels()  # kd-kernels' rows for dense_divergence, as a run has
    seed, iterations = int(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(seed)
    DTYPES = (mx.float32, mx.bfloat16, mx.float16)
    kept = []  # alive at exit, some never evaluated


    def logits(c, v, dtype):
        return mx.array((rng.standard_normal((c, v)) * 3).astype(np.float32)).astype(dtype)


    def layout(c, v, dtype):
        mode = int(rng.integers(0, 4))
        if mode == 1 and c > 0:  # transposed
            return logits(v, c, dtype).T
        if mode == 2:  # columns sliced out of wider rows
            return logits(c, v + 5, dtype)[:, 2 : v + 2]
        if mode == 3 and c > 0:  # one row broadcast
            return mx.broadcast_to(logits(1, v, dtype), (c, v))
        return logits(c, v, dtype)


    def scale_of(c):
        pick = int(rng.integers(0, 3))
        if pick == 0:
            return mx.array(rng.random((c, 1)).astype(np.float32))
        if pick == 1:
            return mx.broadcast_to(mx.array([[0.5]]), (c, 1))
        return mx.array(0.25)


    for _ in range(iterations):
        c = int(rng.choice([0, 1, 3, 17, 55]))
        v = int(rng.choice([1, 7, 64, 1000, 4099, 32768]))
        kind = int(rng.integers(0, 6))
        s = layout(c, v, DTYPES[int(rng.integers(0, 3))])
        t = layout(c, v, DTYPES[int(rng.integers(0, 3))])
        scale = scale_of(c)
        values, grad = _ext.dense_rows(scale, s, t, kind, 0.3, 0.5, 1.0)
        mx.eval(values, grad)

        def dense(x):
            return _ext.dense_rows(scale, x, t, kind, 0.3, 1.0, 1.0)[0].sum()

        for _ in range(2):  # the VJP re-runs the kernel with a broadcast cotangent
            mx.eval(mx.value_and_grad(dense)(s))
        k = min(v, int(rng.choice([1, 4, 20])))
        ids = np.array([rng.permutation(v)[:k] for _ in range(c)], dtype=np.int64)
        ids = mx.array(ids.reshape(c, k))
        tail = int(rng.integers(0, 2))
        lp = np.log(rng.dirichlet(np.ones(k + tail), size=c)).reshape(c, k + tail)
        lp = mx.array(lp.astype(np.float32))

        def sparse(x):
            return _ext.sparse_rows(scale, x, ids, lp, kind, 0.3, 1.0, tail)[0].sum()

        mx.eval(mx.value_and_grad(sparse)(s))
        labels = rng.integers(-1, v, size=(c,))
        labels = mx.array(np.where(labels < 0, -100, labels).astype(np.int64))
        smoothing = float(rng.choice([0.0, 0.1]))

        def ce(x):
            return _ext.cross_entropy_rows(scale, x, labels, smoothing, -100)[0].sum()

        mx.eval(mx.value_and_grad(ce)(s))
        kept.append(_ext.dense_rows(scale, s, t, kind, 0.3, 1.0, 1.0))

    # kdcore's callers under mx.value_and_grad, twice each: chunked_token_mean at
    # V = 151,936 (the dense and cross-entropy rows, as the fused pass calls them per chunk of
    # 55 rows), dense_divergence, and a few steps of the engine's fused head + loss pass.
    n, vocab = 112, 151936
    s = mx.array(rng.standard_normal((n, vocab)).astype(np.float32)).astype(mx.bfloat16)
    t = mx.array(rng.standard_normal((n, vocab)).astype(np.float32))
    mask = mx.array((rng.random(n) > 0.2).astype(np.float32))
    labels = mx.array(rng.integers(0, vocab, n).astype(np.int64))
    dense_rows = kd_kernels.dense_factory("forward_kl")(0.0, 2.0, 2.0)
    ce_rows = kd_kernels.cross_entropy_factory(0.1)
    plain = lambda x, *rest: mx.zeros(x.shape[:-1])  # only for the teacher's cotangent

    def chunked(x):
        kl = testing.chunked_token_mean(dense_rows, plain, x, [t], mask, chunk_rows=55)
        ce = testing.chunked_token_mean(ce_rows, plain, x, [labels], mask, chunk_rows=55)
        return kl + ce

    for _ in range(2):
        mx.eval(mx.value_and_grad(chunked)(s))
    kept.append(chunked(s))
    s3, t3, m3 = s[:32].reshape(16, 2, vocab), t[:32].reshape(16, 2, vocab), mask[:32]
    for kind in ("forward_kl", "reverse_kl", "gjsd"):
        f = lambda x: testing.dense_divergence(x, t3, m3.reshape(16, 2), kind, chunk_rows=5)
        mx.eval(mx.value_and_grad(f)(s3))
    corpus, teacher, out = sys.argv[3:6]
    losses = [{"name": "ce", "weight": 0.5}, {"name": "hinton", "weight": 0.5}]
    spec = testing.tiny_spec(corpus, losses, steps=3, teachers=[{"path": teacher}])
    app.distill(spec, output=out, progress=False)
    print("stress ok", iterations)
    """
)


def _run_child(seed: int, iterations: int, *paths: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, KD_KERNELS="native")
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(seed), str(iterations), *map(str, paths)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_the_native_rows_survive_a_stress_run_and_interpreter_exit(tmp_path, corpus, teacher_dir):
    runs = int(os.environ.get("KD_KERNELS_STRESS_RUNS", "1"))
    for run in range(runs):
        done = _run_child(run, 120, corpus, teacher_dir, tmp_path / f"run{run}")
        if done.returncode < 0:
            name = signal.Signals(-done.returncode).name
            pytest.fail(f"run {run}: the child died of {name}:\n{done.stderr[-4000:]}")
        assert done.returncode == 0, done.stderr[-4000:]
        assert "stress ok" in done.stdout, done.stdout
