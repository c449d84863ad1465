"""The native row kernels equal a float64 reference and kdcore's pure-MLX rows (values and
gradients, every divergence and temperature, masks, extreme logits, bfloat16, every
instruction set), and kdcore runs them where it should: through ``chunked_token_mean``
(``dense_divergence``), the engine's fused head + loss pass, and ``kd doctor``'s report.

The pure rows sum in float32 one element after another, the native ones in float32 lanes
joined in float64, so at V = 32k the pure path is the less accurate one (measured: up to
2e-3 of the largest gradient entry for skew_reverse_kl, against 3e-6 native): large rows are
checked against the float64 reference, small ones against the pure path as well.
"""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

import kdcore
from kdcore import app, testing

kd_kernels = pytest.importorskip("kd_kernels")
if kd_kernels.unavailable_reason() is not None:
    pytest.skip(kd_kernels.unavailable_reason(), allow_module_level=True)

KINDS = kd_kernels.NATIVE_KINDS


@pytest.fixture(autouse=True, scope="module")
def _registered_kernels():
    """The registry's native kernels installed, as a run installs them (kdcore's kernels
    never look them up themselves); the previous table is restored afterwards."""
    with testing.plugins():
        yield


@pytest.fixture(autouse=True)
def _native_on(monkeypatch):
    """The native kernels are opt-in (KD_KERNELS=native); these tests compare them, so on
    unless a test says otherwise."""
    monkeypatch.setenv("KD_KERNELS", "native")


COEF = {"gjsd": 0.3, "skew_kl": 0.2, "skew_reverse_kl": 0.2}
OPTIONS = {"beta": 0.3, "alpha": 0.2}  # dense_divergence's keywords for the same coefs
# (student T, teacher T): equal, both hot, and the mixture case (teacher log-probs at 1).
TEMPERATURES = [(1.0, 1.0), (2.0, 2.0), (0.5, 3.0)]


# ---------------------------------------------------------------- a float64 reference


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def xlogy(a, b):
    return np.where(a > 0, a * np.where(a > 0, b, 0.0), 0.0)


def terms(kind, coef, lq, lp):
    """kdcore's row_terms in float64: (value, g = d value / d lq)."""
    q, p = np.exp(lq), np.exp(lp)
    with np.errstate(all="ignore"):
        if kind == "forward_kl":
            return xlogy(p, lp - lq).sum(-1), -p
        if kind == "reverse_kl":
            term = xlogy(q, lq - lp)
            return term.sum(-1), term + q
        if kind == "gjsd":
            lm = np.logaddexp(lp + math.log(coef), lq + math.log1p(-coef))
            tq = xlogy(q, lq - lm)
            return coef * xlogy(p, lp - lm).sum(-1) + (1 - coef) * tq.sum(-1), (1 - coef) * tq
        if kind == "skew_kl":
            lm = np.logaddexp(lp + math.log(coef), lq + math.log(1 - coef))
            return xlogy(p, lp - lm).sum(-1), -(1 - coef) * xlogy(p, np.exp(lq - lm))
        if kind == "skew_reverse_kl":
            lm = np.logaddexp(lq + math.log(coef), lp + math.log(1 - coef))
            term = xlogy(q, lq - lm)
            return term.sum(-1), term + (1 - coef) * xlogy(q, np.exp(lp - lm))
        d = q - p
        return 0.5 * np.abs(d).sum(-1), 0.5 * np.sign(d) * q


def _inv(temperature: float) -> np.float64:
    return np.float64(np.float32(1.0 / temperature))  # the float32 reciprocal both paths use


def reference(kind, coef, temperature, teacher_temperature, scale, s, t):
    """(values, scale * d values / d s) in float64 from float32 rows."""
    lq = _log_softmax(s.astype(np.float64) * _inv(temperature))
    lp = _log_softmax(t.astype(np.float64) * _inv(teacher_temperature))
    value, g = terms(kind, coef, lq, lp)
    with np.errstate(all="ignore"):
        grad = (g - np.exp(lq) * g.sum(-1, keepdims=True)) * (
            scale.reshape(-1, 1) * _inv(temperature)
        )
    return value, grad


def sparse_reference(kind, coef, temperature, tail, scale, s, ids, lp):
    """The top-k forms (kdcore sparse_rows) in float64."""
    inv = _inv(temperature)
    lq_full = _log_softmax(s.astype(np.float64) * inv)
    factor = scale.reshape(-1, 1) * inv
    lp = lp.astype(np.float64)
    grad = np.zeros_like(lq_full)
    k = ids.shape[-1]
    top = np.take_along_axis(lq_full, ids, -1)
    if tail == "renormalize":
        lq = _log_softmax(top)
        value, g = terms(kind, coef, lq, lp)
        g_top = g - np.exp(lq) * g.sum(-1, keepdims=True)
        np.put_along_axis(grad, ids, g_top * factor, -1)
        return value, grad
    q = np.exp(lq_full)
    outside = np.ones_like(q)
    np.put_along_axis(outside, ids, 0.0, -1)
    mass = np.maximum((q * outside).sum(-1, keepdims=True), 1e-30)
    lq = np.concatenate([top, np.log(mass)], -1)
    lp = np.concatenate([lp[:, :k], np.maximum(lp[:, k:], math.log(1e-30))], -1)
    value, g = terms(kind, coef, lq, lp)
    total = g.sum(-1, keepdims=True)
    grad = (q * outside * (g[:, k:] / mass) - q * total) * factor
    np.put_along_axis(grad, ids, (g[:, :k] - np.exp(top) * total) * factor, -1)
    return value, grad


def close(got, want, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Largest error within ``rtol`` of the reference's largest magnitude (plus ``atol``)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN where the reference has none"
    assert np.array_equal(np.isinf(got), np.isinf(want)), "inf where the reference has none"
    finite = np.isfinite(want)
    if finite.any():
        assert np.array_equal(got[~finite], want[~finite])
        err = float(np.abs(got[finite] - want[finite]).max())
        scale = float(np.abs(want[finite]).max())
        assert err <= rtol * scale + atol, f"max error {err:.3g} vs scale {scale:.3g}"


def rows_of(rng, rows: int, vocab: int, spread: float = 3.0, offset: float = 0.0):
    return (offset + rng.standard_normal((rows, vocab)) * spread).astype(np.float32)


def native(kind, coef, temperature, teacher_temperature):
    return kd_kernels.dense_factory(kind)(coef, temperature, teacher_temperature)


# ---------------------------------------------------------------- the kernels themselves


@pytest.mark.parametrize("temperatures", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
def test_rows_equal_the_float64_reference_at_a_large_vocabulary(kind, temperatures):
    rng = np.random.default_rng(1)
    s, t = rows_of(rng, 6, 32003), rows_of(rng, 6, 32003)  # odd V: a partial last vector
    scale = rng.random((6, 1)).astype(np.float32)
    coef = COEF.get(kind, 0.0)
    values, grad = native(kind, coef, *temperatures)(mx.array(scale), mx.array(s), mx.array(t))
    want_values, want_grad = reference(kind, coef, *temperatures, scale, s, t)
    close(values, want_values)
    close(grad, want_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_every_instruction_set_and_thread_count_gives_the_same_rows(kind):
    rng = np.random.default_rng(2)
    s, t = mx.array(rows_of(rng, 9, 4099)), mx.array(rows_of(rng, 9, 4099))
    scale = mx.array(rng.random((9, 1)).astype(np.float32))
    rows = native(kind, COEF.get(kind, 0.0), 2.0, 2.0)
    isa, threads = kd_kernels._ext.isa(), kd_kernels._ext.threads()
    results = {}
    try:
        for name in kd_kernels._ext.isas():
            kd_kernels._ext.set_isa(name)
            for n in (1, 2, 3):
                kd_kernels._ext.set_threads(n)
                values, grad = rows(scale, s, t)
                results[name, n] = np.array(values), np.array(grad)
    finally:
        kd_kernels._ext.set_isa(isa)
        kd_kernels._ext.set_threads(threads)
    for (name, n), (values, grad) in results.items():
        one = results[name, 1]
        assert np.array_equal(values, one[0]) and np.array_equal(grad, one[1]), (name, n)
        base = results["base", 1]
        close(values, base[0], 1e-6)
        close(grad, base[1], 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_rows_read_as_their_float32_values(kind):
    rng = np.random.default_rng(3)
    s = mx.array(rows_of(rng, 4, 1000)).astype(mx.bfloat16)
    t = mx.array(rows_of(rng, 4, 1000)).astype(mx.bfloat16)
    scale = mx.array(rng.random((4, 1)).astype(np.float32))
    rows = native(kind, COEF.get(kind, 0.0), 2.0, 1.0)
    for a, b in [(s, t), (s, t.astype(mx.float32)), (s.astype(mx.float32), t)]:
        values, grad = rows(scale, a, b)
        want = rows(scale, a.astype(mx.float32), b.astype(mx.float32))
        assert grad.dtype == mx.float32
        assert np.array_equal(np.array(values), np.array(want[0]))
        assert np.array_equal(np.array(grad), np.array(want[1]))


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_and_infinite_logits(kind):
    """Logits near +-1e4 (the row maximum is subtracted first, as in the pure path), a
    teacher with -inf entries (tokens it rules out) and a student with -inf where the
    teacher has them too (a masked vocabulary): same values, infinities and NaNs as the
    float64 reference."""
    rng = np.random.default_rng(4)
    coef = COEF.get(kind, 0.0)
    s, t = rows_of(rng, 3, 257, offset=1e4), rows_of(rng, 3, 257, offset=-1e4)
    scale = np.full((3, 1), 0.5, np.float32)
    got = native(kind, coef, 1.0, 1.0)(mx.array(scale), mx.array(s), mx.array(t))
    want = reference(kind, coef, 1.0, 1.0, scale, s, t)
    close(got[0], want[0])
    close(got[1], want[1])
    ruled_out = rng.random((3, 257)) < 0.3
    t_inf = np.where(ruled_out, -np.inf, rows_of(rng, 3, 257)).astype(np.float32)
    s_inf = np.where(ruled_out, -np.inf, rows_of(rng, 3, 257)).astype(np.float32)
    s_fin = rows_of(rng, 3, 257)
    for a, b in [(s_fin, t_inf), (s_inf, t_inf)]:
        got = native(kind, coef, 2.0, 2.0)(mx.array(scale), mx.array(a), mx.array(b))
        want = reference(kind, coef, 2.0, 2.0, scale, a, b)
        close(got[0], want[0])
        if np.isfinite(want[0]).all():
            close(got[1], want[1])
    if kind == "reverse_kl":  # q > 0 where p = 0: the divergence is infinite
        got = native(kind, 0.0, 1.0, 1.0)(mx.array(scale), mx.array(s_fin), mx.array(t_inf))
        assert np.isinf(np.array(got[0])).all()


def test_the_primitive_is_differentiable_in_the_student():
    """mx.grad through the native rows: cotangent c on the values gives the rows' gradient
    with scale = c (exactly the kernel run again with that scale); the teacher has none."""
    rng = np.random.default_rng(5)
    s, t = mx.array(rows_of(rng, 5, 300)), mx.array(rows_of(rng, 5, 300))
    c = mx.array(rng.standard_normal(5).astype(np.float32))
    rows = native("gjsd", 0.3, 2.0, 2.0)
    scale = mx.ones((5, 1))
    grad = mx.grad(lambda x: (rows(scale, x, t)[0] * c).sum())(s)
    _, want = rows(c[:, None], s, t)
    assert np.array_equal(np.array(grad), np.array(want))
    # and that is the value's gradient: compare with the float64 reference
    ref = reference("gjsd", 0.3, 2.0, 2.0, np.array(c), np.array(s), np.array(t))[1]
    close(grad, ref)
    with pytest.raises(ValueError, match="no gradient with respect to the teacher"):
        mx.grad(lambda y: rows(scale, s, y)[0].sum())(t)


def _ce_reference(s, labels, smoothing, scale):
    lq = _log_softmax(s.astype(np.float64))
    keep = labels != kdcore.IGNORE_INDEX
    safe = np.where(keep, labels, 0)
    picked = np.take_along_axis(lq, safe[:, None], -1)[:, 0]
    value = (1 - smoothing) * np.where(keep, -picked, 0.0) - smoothing * lq.mean(-1)
    q = np.exp(lq)
    onehot = np.zeros_like(q)
    np.put_along_axis(onehot, safe[:, None], 1.0, -1)
    hard = (q - onehot) * keep[:, None]
    grad = ((1 - smoothing) * hard + smoothing * (q - 1.0 / s.shape[-1])) * scale.reshape(-1, 1)
    return value, grad


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_rows(smoothing):
    rng = np.random.default_rng(6)
    s = rows_of(rng, 7, 32003, offset=5e3)
    labels = rng.integers(0, 32003, 7).astype(np.int32)
    labels[[1, 4]] = kdcore.IGNORE_INDEX
    scale = rng.random((7, 1)).astype(np.float32)
    rows = kd_kernels.cross_entropy_factory(smoothing)
    values, grad = rows(mx.array(scale), mx.array(s), mx.array(labels))
    want_values, want_grad = _ce_reference(s, labels, smoothing, scale)
    close(values, want_values)
    close(grad, want_grad)
    if not smoothing:
        plain = kdcore.token_cross_entropy(mx.array(s), mx.array(labels))
        close(values, np.array(plain))
        assert float(mx.abs(grad[1]).max()) == 0.0  # an ignored row has no gradient
    # a label outside the vocabulary is never read or written: its row is NaN
    bad = labels.copy()
    bad[0] = 32003
    values, grad = rows(mx.array(scale), mx.array(s), mx.array(bad))
    assert np.isnan(np.array(values)[0]) and np.isnan(np.array(grad)[0]).all()
    close(np.array(values)[1:], want_values[1:])


def _support(rng, t, k, tail, temperature):
    """Top-k ids and log-probabilities of teacher logits t, as kdcore.teacher_support."""
    signal = kdcore.TeacherSignal(vocab_size=t.shape[-1], logits=mx.array(t))
    ids, lp = kdcore.teacher_support(signal, temperature, tail, top_k=k)
    return np.array(ids), np.array(lp)


@pytest.mark.parametrize("tail", testing.TAIL_POLICIES)
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_rows_equal_the_float64_reference(kind, tail):
    """A large vocabulary, logits near 1e4, a top-64 support: tail-bucket's tail mass is
    summed over the complement, renormalize's gradient is 0 off the support."""
    rng = np.random.default_rng(9)
    coef = COEF.get(kind, 0.0)
    s, t = rows_of(rng, 5, 32003, offset=1e4), rows_of(rng, 5, 32003)
    ids, lp = _support(rng, t, 64, tail, 2.0)
    scale = rng.random((5, 1)).astype(np.float32)
    rows = kd_kernels.sparse_factory(kind)(coef, 2.0, tail)
    values, grad = rows(mx.array(scale), mx.array(s), mx.array(ids), mx.array(lp))
    want_values, want_grad = sparse_reference(kind, coef, 2.0, tail, scale, s, ids, lp)
    close(values, want_values)
    close(grad, want_grad)
    if tail == "renormalize":
        off = np.ones(s.shape, bool)
        np.put_along_axis(off, ids, False, -1)
        assert np.abs(np.array(grad)[off]).max() == 0.0
    bad = ids.copy()
    bad[2, 0] = 32003  # outside the vocabulary: never read or written, the row is NaN
    values, grad = rows(mx.array(scale), mx.array(s), mx.array(bad), mx.array(lp))
    assert np.isnan(np.array(values)[2]) and np.isnan(np.array(grad)[2]).all()
    close(np.array(values)[[0, 1, 3, 4]], want_values[[0, 1, 3, 4]])


@pytest.mark.parametrize("tail", testing.TAIL_POLICIES)
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_divergence_native_equals_pure_and_autodiff(kind, tail, monkeypatch):
    rng = np.random.default_rng(10)
    s = mx.array(rows_of(rng, 21, 61).reshape(3, 7, 61))
    t = rows_of(rng, 21, 61).reshape(3, 7, 61)
    signal = kdcore.TeacherSignal(vocab_size=61, logits=mx.array(t))
    ids, lp = kdcore.teacher_support(signal, 2.0, tail, top_k=9)
    mask = rng.random((3, 7)).astype(np.float32)
    mask[1, :3] = 0
    mask = mx.array(mask)

    def value_and_grad():
        def f(x):
            return testing.sparse_divergence(
                x, ids, lp, mask, kind, tail=tail, temperature=2.0, chunk_rows=4, **OPTIONS
            )

        value, grad = mx.value_and_grad(f)(s)
        return np.array(value), np.array(grad)

    native_vg = value_and_grad()
    monkeypatch.setenv("KD_KERNELS", "pure")
    pure_vg = value_and_grad()
    plain = mx.value_and_grad(
        lambda x: testing.plain_sparse_divergence(
            x, ids, lp, mask, kind, tail=tail, temperature=2.0, **OPTIONS
        )
    )(s)
    for got, want, ref in zip(native_vg, pure_vg, plain):
        close(got, want)
        close(got, np.array(ref))


# ---------------------------------------------------------------- kdcore's dispatch


def _dense_value_and_grad(kind, s, t, mask, temperature, teacher_temperature):
    def f(x):
        return testing.dense_divergence(
            x,
            t,
            mask,
            kind,
            temperature=temperature,
            teacher_temperature=teacher_temperature,
            chunk_rows=4,
            **OPTIONS,
        )

    value, grad = mx.value_and_grad(f)(s)
    return np.array(value), np.array(grad)


@pytest.mark.parametrize("temperatures", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
def test_dense_divergence_native_equals_pure_and_autodiff(kind, temperatures, monkeypatch):
    """Through chunked_token_mean (chunks of 4 rows, a mask with zeros and fractions):
    native == pure (KD_KERNELS=pure) == autodiff of the plain formulation."""
    rng = np.random.default_rng(7)
    s, t = (
        mx.array(rows_of(rng, 3 * 7, 61).reshape(3, 7, 61)),
        mx.array(rows_of(rng, 3 * 7, 61).reshape(3, 7, 61)),
    )
    mask = rng.random((3, 7)).astype(np.float32)
    mask[0, 4:] = 0
    mask = mx.array(mask)
    native_vg = _dense_value_and_grad(kind, s, t, mask, *temperatures)
    monkeypatch.setenv("KD_KERNELS", "pure")
    pure_vg = _dense_value_and_grad(kind, s, t, mask, *temperatures)
    for got, want in zip(native_vg, pure_vg):
        close(got, want)
    assert np.abs(native_vg[1][0, 4:]).max() == 0.0  # masked rows: no gradient

    def plain(x):  # whole-array autodiff of the same divergence
        lq = kdcore.log_softmax(x, temperatures[0])
        lp = kdcore.log_softmax(t, temperatures[1])
        coef = COEF.get(kind, 0.0)
        return kdcore.masked_mean(testing.row_terms(kind, coef, lq, lp, grad=False)[0], mask)

    for got, want in zip(native_vg, mx.value_and_grad(plain)(s)):
        close(got, np.array(want))


class _Spy:
    """A plugin whose forward_kl kernel records its calls and defers to kd-kernels'."""

    def __init__(self, decline: bool = False):
        self.built, self.calls, self.decline = [], 0, decline

    @kdcore.hookimpl
    def kd_row_kernels(self):
        def forward_kl(coef, temperature, teacher_temperature):
            self.built.append((coef, temperature, teacher_temperature))
            if self.decline:
                return None
            inner = native("forward_kl", coef, temperature, teacher_temperature)

            def rows(*args):
                self.calls += 1
                return inner(*args)

            return rows

        forward_kl.description = "spy"
        return {"forward_kl": forward_kl}


def _forward_kl(mask):
    rng = np.random.default_rng(8)
    s, t = mx.array(rows_of(rng, 10, 33)), mx.array(rows_of(rng, 10, 33))
    return mx.value_and_grad(
        lambda x: testing.dense_divergence(x, t, mask, temperature=2.0, chunk_rows=3)
    )(s)


def test_a_registered_kernel_replaces_the_pure_rows_unless_kd_kernels_is_pure(monkeypatch):
    monkeypatch.setenv("KD_DISABLE_PLUGINS", "kd-kernels")  # the spy's name would clash
    monkeypatch.setenv("KD_KERNELS", "native")
    mask = mx.ones((10,))
    spy = _Spy()
    with testing.plugins(spy):
        value, grad = _forward_kl(mask)
        # every row kept: one native call over the batch (its gradient is the buffer)
        assert spy.built == [(0.0, 2.0, 2.0)] and spy.calls == 1
        holes = mx.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1], mx.float32)
        holed_value, holed_grad = _forward_kl(holes)
        assert spy.calls == 1 + 3  # 9 kept rows in chunks of 3
        monkeypatch.setenv("KD_KERNELS", "pure")
        pure_value, pure_grad = _forward_kl(mask)
        pure_holed_value, pure_holed_grad = _forward_kl(holes)
        assert spy.calls == 4
        close(np.array(value), np.array(pure_value))
        close(np.array(grad), np.array(pure_grad))
        close(np.array(holed_value), np.array(pure_holed_value))
        close(np.array(holed_grad), np.array(pure_holed_grad))
        assert not np.array(holed_grad)[4].any()
        monkeypatch.setenv("KD_KERNELS", "fast")
        with pytest.raises(app.KdError, match="KD_KERNELS='fast'"):
            _forward_kl(mask)
    declining = _Spy(decline=True)
    monkeypatch.setenv("KD_KERNELS", "native")
    with testing.plugins(declining):
        value, _ = _forward_kl(mask)  # the factory returned None: the pure rows ran
        assert declining.built and declining.calls == 0
        close(np.array(value), np.array(pure_value))


def test_the_native_kernels_are_the_default_and_kd_kernels_pure_turns_them_off(capsys, monkeypatch):
    """Installed, the native rows run unless KD_KERNELS=pure, and kd doctor says so."""
    monkeypatch.delenv("KD_KERNELS", raising=False)
    kernels = _doctor(capsys)
    assert kernels["forward_kl"]["path"] == "native"
    monkeypatch.setenv("KD_KERNELS", "pure")
    kernels = _doctor(capsys)
    assert {k["path"] for k in kernels.values()} == {"pure"}
    assert "KD_KERNELS=pure" in kernels["forward_kl"]["detail"]
    monkeypatch.setenv("KD_DISABLE_PLUGINS", "kd-kernels")  # the spy's name would clash
    spy = _Spy()
    with testing.plugins(spy):
        _forward_kl(mx.ones((10,)))
        assert spy.calls == 0
        monkeypatch.delenv("KD_KERNELS")
        _forward_kl(mx.ones((10,)))
        assert spy.calls == 1


def test_a_second_registration_of_a_kernel_is_a_load_failure(monkeypatch):
    monkeypatch.delenv("KD_STRICT_PLUGINS", raising=False)
    with testing.plugins(_Spy()) as registry:
        failures = [f for f in registry.failures if f.distribution == "kdcore-testing"]
        assert len(failures) == 1
        assert "row kernel 'forward_kl' is registered twice" in failures[0].error
        assert registry.row_kernels()["forward_kl"].distribution == "kd-kernels"


def _doctor(capsys) -> dict:
    capsys.readouterr()
    assert testing.run_kd("doctor", "--json") == 0
    return json.loads(capsys.readouterr().out)["row_kernels"]


def test_kd_doctor_says_which_kernels_run_and_why(capsys, monkeypatch):
    monkeypatch.setenv("KD_KERNELS", "native")
    kernels = _doctor(capsys)
    for name in (*KINDS, *(f"sparse:{kind}" for kind in KINDS), "cross_entropy", "attention"):
        assert kernels[name]["path"] == "native", kernels[name]
        assert kernels[name]["source"].startswith("kd-kernels")
        assert kd_kernels._ext.isa() in kernels[name]["detail"]
    monkeypatch.setenv("KD_KERNELS", "pure")
    kernels = _doctor(capsys)
    assert {k["path"] for k in kernels.values()} == {"pure"}
    assert "KD_KERNELS=pure" in kernels["forward_kl"]["detail"]
    monkeypatch.setenv("KD_KERNELS", "native")
    monkeypatch.setenv("KD_DISABLE_PLUGINS", "kd-kernels")
    with testing.plugins():
        kernels = _doctor(capsys)
    assert kernels["gjsd"]["path"] == "pure"
    assert "no plugin registers" in kernels["gjsd"]["detail"]


# ---------------------------------------------------------------- through the engine


class _Counter:
    """kd-kernels' forward_kl and cross-entropy kernels, counting the chunks they run."""

    def __init__(self):
        self.calls = {"forward_kl": 0, "cross_entropy": 0}

    def _counted(self, name, factory):
        def build(*args):
            inner = factory(*args)

            def rows(*inputs):
                self.calls[name] += 1
                return inner(*inputs)

            return rows

        return build

    @kdcore.hookimpl
    def kd_row_kernels(self):
        return {
            "forward_kl": self._counted("forward_kl", kd_kernels.dense_factory("forward_kl")),
            "cross_entropy": self._counted("cross_entropy", kd_kernels.cross_entropy_factory),
        }


def test_the_fused_training_path_runs_the_native_rows_to_the_same_losses(
    tmp_path, corpus, teacher_dir, monkeypatch
):
    """Three steps of ce + hinton (T = 2) through the engine's fused head + loss pass: the
    registered kernels run every chunk, and the losses equal those of KD_KERNELS=pure."""
    spec = testing.tiny_spec(
        corpus,
        [
            {"name": "ce", "weight": 0.5},
            {"name": "hinton", "weight": 0.5, "params": {"temperature": 2.0}},
        ],
        steps=3,
        teachers=[{"path": str(teacher_dir)}],
    )
    monkeypatch.setenv("KD_DISABLE_PLUGINS", "kd-kernels")  # the counter's names would clash
    losses = {}
    for mode in ("native", "pure"):
        monkeypatch.setenv("KD_KERNELS", mode)
        counter = _Counter()
        with testing.plugins(counter):
            app.distill(spec, output=tmp_path / mode, progress=False)
        records = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        losses[mode] = [r for r in map(json.loads, records) if "loss" in r]
        if mode == "native":
            assert counter.calls["forward_kl"] >= 3 and counter.calls["cross_entropy"] >= 3
        else:
            assert counter.calls == {"forward_kl": 0, "cross_entropy": 0}
    assert len(losses["native"]) == len(losses["pure"]) == 3
    for a, b in zip(losses["native"], losses["pure"]):
        assert a.keys() == b.keys()
        for key, value in b.items():
            if isinstance(value, float) and "time" not in key and not key.endswith("_s"):
                assert a[key] == pytest.approx(value, rel=2e-5, abs=1e-6), key


def _plain(s, t, mask, kind, temperature):
    lq, lp = kdcore.log_softmax(s, temperature), kdcore.log_softmax(t, temperature)
    return kdcore.masked_mean(testing.row_terms(kind, 0.0, lq, lp, grad=False)[0], mask)


@pytest.mark.parametrize("mode", ["native", "pure"])
def test_a_weighted_loss_scales_its_own_gradient_buffer_and_nothing_else(mode, monkeypatch):
    """The VJP multiplies the kernel's gradient buffer by the cotangent in place (NumPy):
    weights other than 1, the same logits in two terms, and a full or holed mask all give
    the plain formulation's gradient, and the inputs are untouched."""
    monkeypatch.setenv("KD_KERNELS", mode)
    rng = np.random.default_rng(11)
    s, t = mx.array(rows_of(rng, 10, 33)), mx.array(rows_of(rng, 10, 33))
    before = np.array(s), np.array(t)
    for mask in (mx.ones((10,)), mx.array([1, 0, 1, 1, 1, 1, 0, 1, 1, 1], mx.float32)):

        def loss(x, m=mask):
            a = testing.dense_divergence(x, t, m, temperature=2.0, chunk_rows=3)
            b = testing.dense_divergence(x, t, m, "reverse_kl", chunk_rows=4)
            return 4.0 * a + 0.25 * b + a

        def plain(x, m=mask):
            a = _plain(x, t, m, "forward_kl", 2.0)
            return 5.0 * a + 0.25 * _plain(x, t, m, "reverse_kl", 1.0)

        got = mx.value_and_grad(loss)(s)
        want = mx.value_and_grad(plain)(s)
        for g, w in zip(got, want):
            close(np.array(g), np.array(w))
    np.testing.assert_array_equal(np.array(s), before[0])
    np.testing.assert_array_equal(np.array(t), before[1])


# ---------------------------------------------------------------- the Adam step


class _AdamSpy:
    """A plugin whose "adam" kernel is kd-kernels', counting its calls."""

    def __init__(self):
        self.calls = 0

    @kdcore.hookimpl
    def kd_row_kernels(self):
        def adam():
            def step(*args):
                self.calls += 1
                return kd_kernels.adam_factory()(*args)

            return step

        return {"adam": adam}


def test_training_with_the_native_adam_step_equals_mlxs_update_bit_for_bit(
    tmp_path, corpus, teacher_dir, monkeypatch
):
    """Three AdamW steps (weight decay, bias correction) through app.distill: the
    native step runs every float32 parameter's update, and the student's weights equal
    those of the run with mlx's update (KD_KERNELS=pure) exactly."""
    spec = testing.tiny_spec(
        corpus,
        [{"name": "hinton", "params": {"temperature": 2.0}}],
        steps=3,
        teachers=[{"path": str(teacher_dir)}],
    )
    spec["train"]["optimizer"] = {
        "name": "adamw",
        "lr": 3e-3,
        "weight_decay": 0.1,
        "params": {"bias_correction": True},
    }
    monkeypatch.setenv("KD_DISABLE_PLUGINS", "kd-kernels")  # the spy's name would clash
    weights = {}
    for mode in ("native", "pure"):
        monkeypatch.setenv("KD_KERNELS", mode)
        spy = _AdamSpy()
        with testing.plugins(spy):
            app.distill(spec, output=tmp_path / mode, progress=False)
        weights[mode] = mx.load(str(tmp_path / mode / "student" / "model.safetensors"))
        assert (spy.calls > 0) == (mode == "native")
    assert weights["native"].keys() == weights["pure"].keys()
    for name, want in weights["pure"].items():
        np.testing.assert_array_equal(np.array(weights["native"][name]), np.array(want), name)


def test_the_adam_step_reads_strided_views_and_checks_its_inputs():
    rng = np.random.default_rng(5)
    g, p, m = (mx.array(rng.normal(size=(13, 37)).astype(np.float32)) for _ in range(3))
    v = mx.array(np.abs(rng.normal(size=(37, 13))).astype(np.float32))
    scalars = mx.array([0.999, 0.9, 0.1, 0.99, 0.01, 1e-8, 1e-3, 1.0], mx.float32)
    step = kd_kernels.adam_factory()
    got = step(g, p, m, v.T, scalars, False)  # v read through a transposed view
    p1 = p * 0.999
    m2 = 0.9 * m + 0.1 * g
    v2 = 0.99 * v.T + 0.01 * mx.square(g)
    want = (p1 - 1e-3 * m2 / (mx.sqrt(v2) + 1e-8), m2, v2)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    with pytest.raises(ValueError, match="float32 arrays only"):
        step(g.astype(mx.bfloat16), p, m, v.T, scalars, False)
    with pytest.raises(ValueError, match="differ in shape"):
        step(g, p, m, v, scalars, False)
    with pytest.raises(ValueError, match="8 scalars"):
        step(g, p, m, v.T, scalars[:4], False)
