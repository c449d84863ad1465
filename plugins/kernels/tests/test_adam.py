"""kd-kernels' Adam step: bit for bit MLX's update, whatever the gradient's layout (a
Linear weight's gradient is a transposed view), on every instruction set and thread count,
and in place when nothing else holds the parameter and its moments."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

kd_kernels = pytest.importorskip("kd_kernels")
if kd_kernels.unavailable_reason() is not None:
    pytest.skip(kd_kernels.unavailable_reason(), allow_module_level=True)

SCALARS = [0.999, 0.9, 0.1, 0.99, 0.01, 1e-8, 1e-3, 1.25]


def _mlx_step(g, p, m, v, k, bias_correction):
    """The step in MLX ops, with the kernel's roundings (kdcore.engine.optim)."""
    m2 = k[1] * m + k[2] * g
    v2 = k[3] * v + k[4] * mx.square(g)
    root = mx.sqrt(v2)
    denominator = root * k[7] + k[5] if bias_correction else root + k[5]
    return p * k[0] - (k[6] * m2) / denominator, m2, v2


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    p, m = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
    v = np.abs(rng.normal(size=shape)).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    return g, p, m, v


@pytest.mark.parametrize(
    "shape", [(13, 37), (1, 300), (300, 1), (16, 256), (17, 257), (600, 700), (1536, 576)]
)
@pytest.mark.parametrize("bias_correction", [False, True])
def test_a_transposed_gradient_gives_mlxs_step(shape, bias_correction):
    g, p, m, v = _inputs(shape)
    k = mx.array(SCALARS, mx.float32)
    want = _mlx_step(*(mx.array(x) for x in (g, p, m, v)), k, bias_correction)
    mx.eval(want)
    g_t = mx.array(np.ascontiguousarray(g.T)).T  # as value_and_grad gives a Linear's
    assert not memoryview(g_t).c_contiguous or 1 in shape
    step = kd_kernels.adam_factory()
    isa, threads = kd_kernels._ext.isa(), kd_kernels._ext.threads()
    try:
        for name in kd_kernels._ext.isas():
            kd_kernels._ext.set_isa(name)
            for n in (1, 2, 3):
                kd_kernels._ext.set_threads(n)
                got = step(g_t, *(mx.array(x) for x in (p, m, v)), k, bias_correction)
                for a, b in zip(got, want):
                    np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=(name, n))
    finally:
        kd_kernels._ext.set_isa(isa)
        kd_kernels._ext.set_threads(threads)


def _equal(got, want):
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_the_step_runs_in_place_unless_its_inputs_are_held_elsewhere():
    shape = (1024, 1024)  # 4 MiB each
    k = mx.array(SCALARS, mx.float32)
    step = kd_kernels.adam_factory()
    g, p, m, v = (mx.array(x) for x in _inputs(shape))
    want = _mlx_step(g, p, m, v, k, True)
    mx.eval(g, p, m, v, k, want)
    held = [np.array(x) for x in (p, m, v)]
    p2, m2, v2 = step(g, p, m, v, k, True)  # p, m and v stay held here: three new arrays
    mx.eval(p2, m2, v2)
    _equal((p, m, v), held)
    _equal((p2, m2, v2), want)
    p, m, v = p2, m2, v2
    del p2, m2, v2
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    p, m, v = step(g, p, m, v, k, True)  # only the step holds the old ones: in place
    mx.eval(p, m, v)
    assert mx.get_peak_memory() - before < 4 << 20
    _equal((p, m, v), _mlx_step(g, *want, k, True))
