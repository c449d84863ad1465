"""reverse_kl, skew_kl, skew_reverse_kl, gjsd and the chunked divergence kernels of kdcore.

Every value is checked against an independent float64 NumPy reference written from the
papers' formulas (probabilities mixed directly, not through log-sum-exp).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore import ModelOutput, app, testing

PROFILE = settings.get_profile(testing.PROFILE)

# ---------------------------------------------------------------- float64 reference


def log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def kl64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KL(a || b) per row for probability vectors."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0).sum(-1)


def reference(kind, s, t, mask, T=1.0, beta=0.5, alpha=0.1):
    q = np.exp(log_softmax64(np.asarray(s, np.float64) / T))
    p = np.exp(log_softmax64(np.asarray(t, np.float64) / T))
    if kind == "forward_kl" or (kind == "gjsd" and beta == 0):
        rows = kl64(p, q)
    elif kind == "reverse_kl" or (kind == "gjsd" and beta == 1):
        rows = kl64(q, p)
    elif kind == "gjsd":
        m = beta * p + (1 - beta) * q
        rows = beta * kl64(p, m) + (1 - beta) * kl64(q, m)
    elif kind == "skew_kl":
        rows = kl64(p, alpha * p + (1 - alpha) * q)
    elif kind == "tvd":
        rows = 0.5 * np.abs(p - q).sum(-1)
    else:
        rows = kl64(q, alpha * q + (1 - alpha) * p)
    mask = np.asarray(mask, np.float64)
    return float((rows * mask).sum() / max(mask.sum(), 1.0))


def reference_sparse(kind, s, ids, t, mask, tail, T=1.0, beta=0.5, alpha=0.1):
    """Both distributions reduced to the teacher's top-k support (+ one tail class)."""
    q = np.exp(log_softmax64(np.asarray(s, np.float64) / T))
    p = np.exp(log_softmax64(np.asarray(t, np.float64) / T))
    q_top = np.take_along_axis(q, ids, -1)
    p_top = np.take_along_axis(p, ids, -1)
    if tail == "renormalize":
        qb = q_top / q_top.sum(-1, keepdims=True)
        pb = p_top / p_top.sum(-1, keepdims=True)
    else:
        qb = np.concatenate([q_top, np.maximum(1 - q_top.sum(-1, keepdims=True), 1e-30)], -1)
        pb = np.concatenate([p_top, np.maximum(1 - p_top.sum(-1, keepdims=True), 1e-30)], -1)
    lq, lp = np.log(qb), np.log(pb)
    # reuse the dense reference on the reduced support (logits = log-probabilities, T = 1)
    return reference(kind, lq, lp, mask, 1.0, beta, alpha)


def _mask(rng, shape, p=0.7):
    m = (rng.random(shape) < p).astype(np.float32)
    m.flat[0] = 1.0
    return m


PARAMS = {"beta": 0.3, "alpha": 0.2}


# ---------------------------------------------------------------- conformance


@pytest.mark.parametrize(
    "name,params",
    [
        ("reverse_kl", {}),
        ("reverse_kl", {"temperature": 2.0, "t_squared": True}),
        ("skew_kl", {}),
        ("skew_kl", {"alpha": 0.5, "temperature": 1.5}),
        ("skew_reverse_kl", {}),
        ("skew_reverse_kl", {"alpha": 0.7}),
        ("gjsd", {}),
        ("gjsd", {"beta": 0.0}),
        ("gjsd", {"beta": 1.0}),
        ("gjsd", {"beta": {"schedule": "linear", "start": 0.1, "end": 0.9}}),
        ("tvd", {}),
        ("tvd", {"temperature": 2.0, "tail": "renormalize"}),
    ],
)
def test_losses_conform(name, params):
    testing.check_loss(name, **params)


# ---------------------------------------------------------------- values against float64


@settings(PROFILE)
@given(
    testing.logit_pairs(bound=20.0),
    st.sampled_from(kdcore.DIVERGENCES),
    st.sampled_from([0.5, 1.0, 3.0]),
    st.floats(0.0, 1.0),
)
def test_dense_kernel_matches_the_float64_reference(arrays, kind, T, coef):
    s, t, mask = arrays
    got = testing.dense_divergence(
        mx.array(s),
        mx.array(t),
        mx.array(mask),
        kind,
        temperature=T,
        beta=coef,
        alpha=coef,
        chunk_rows=2,
    ).item()
    want = reference(kind, s, t, mask, T, coef, coef)
    assert got == pytest.approx(want, rel=1e-4, abs=2e-5)
    assert got >= -1e-5  # float32 rounding of log-softmax at |z / T| ~ 40


@pytest.mark.parametrize("kind", ["reverse_kl", "skew_kl", "skew_reverse_kl", "gjsd"])
def test_losses_match_the_reference_with_t_squared(kind):
    rng = np.random.default_rng(1)
    s = rng.standard_normal((2, 3, 9)).astype(np.float32) * 3
    t = rng.standard_normal((2, 3, 9)).astype(np.float32) * 3
    mask = _mask(rng, (2, 3))
    name = kind
    params = {"temperature": 2.0, "t_squared": True}
    if kind == "gjsd":
        params["beta"] = 0.3
    if kind.startswith("skew"):
        params["alpha"] = 0.3
    loss = testing.build_loss(name, **params)
    inputs = kdcore.LossInputs(
        student=ModelOutput(logits=mx.array(s)),
        teacher=kdcore.TeacherSignal(vocab_size=9, logits=mx.array(t)),
        batch={"mask": mx.array(mask)},
        params=app.make_config("loss", name, **params),
    )
    value, _ = loss(inputs)
    want = 4.0 * reference(kind, s, t, mask, 2.0, 0.3, 0.3)
    assert value.item() == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------- endpoint identities


@settings(PROFILE)
@given(testing.logit_pairs(bound=20.0), st.sampled_from([0.5, 1.0, 2.0]))
def test_endpoints(arrays, T):
    s, t, mask = (mx.array(a) for a in arrays)

    def div(kind, **kw):
        return testing.dense_divergence(s, t, mask, kind, temperature=T, **kw).item()

    forward, reverse = div("forward_kl"), div("reverse_kl")
    assert div("gjsd", beta=0.0) == pytest.approx(forward, rel=1e-6, abs=1e-7)
    assert div("gjsd", beta=1.0) == pytest.approx(reverse, rel=1e-6, abs=1e-7)
    assert div("skew_kl", alpha=0.0) == pytest.approx(forward, rel=1e-6, abs=1e-7)
    assert div("skew_reverse_kl", alpha=0.0) == pytest.approx(reverse, rel=1e-6, abs=1e-7)
    # alpha = 1 mixes the distribution with itself: the divergence vanishes
    assert abs(div("skew_kl", alpha=1.0)) < 1e-6
    assert abs(div("skew_reverse_kl", alpha=1.0)) < 1e-6


def test_gjsd_is_symmetric_in_beta_and_direction():
    """JSD_beta(p, q) = JSD_{1-beta}(q, p): swapping student and teacher swaps beta."""
    rng = np.random.default_rng(2)
    s = mx.array(rng.standard_normal((2, 4, 7)).astype(np.float32) * 2)
    t = mx.array(rng.standard_normal((2, 4, 7)).astype(np.float32) * 2)
    mask = mx.ones((2, 4))
    a = testing.dense_divergence(s, t, mask, "gjsd", beta=0.3).item()
    b = testing.dense_divergence(t, s, mask, "gjsd", beta=0.7).item()
    assert a == pytest.approx(b, rel=1e-5)


# ---------------------------------------------------------------- gradients


def _finite_difference(f, x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    g = np.zeros_like(x, dtype=np.float64)
    for i in np.ndindex(x.shape):
        up, down = x.astype(np.float64), x.astype(np.float64)
        up[i] += eps
        down[i] -= eps
        g[i] = (f(up) - f(down)) / (2 * eps)
    return g


@pytest.mark.parametrize("kind", kdcore.DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_gradient_matches_finite_differences(kind, T):
    rng = np.random.default_rng(3)
    s = rng.standard_normal((1, 3, 6)).astype(np.float32) * 2
    t = rng.standard_normal((1, 3, 6)).astype(np.float32) * 2
    mask = np.array([[1.0, 0.0, 1.0]], np.float32)
    grad = mx.grad(
        lambda x: testing.dense_divergence(
            x, mx.array(t), mx.array(mask), kind, temperature=T, **PARAMS
        )
    )(mx.array(s))
    fd = _finite_difference(lambda x: reference(kind, x, t, mask, T, 0.3, 0.2), s)
    np.testing.assert_allclose(np.array(grad), fd, atol=2e-5)
    assert np.all(np.array(grad)[0, 1] == 0)  # the masked position gets no gradient


@pytest.mark.parametrize("kind", kdcore.DIVERGENCES)
@pytest.mark.parametrize("tail", testing.TAIL_POLICIES)
def test_sparse_gradient_matches_finite_differences(kind, tail):
    rng = np.random.default_rng(4)
    s = rng.standard_normal((1, 2, 7)).astype(np.float32) * 2
    t = rng.standard_normal((1, 2, 7)).astype(np.float32) * 2
    mask = np.ones((1, 2), np.float32)
    ids, lp = kdcore.teacher_support(
        kdcore.TeacherSignal(vocab_size=7, logits=mx.array(t)), 1.5, tail, top_k=3
    )
    grad = mx.grad(
        lambda x: testing.sparse_divergence(
            x, ids, lp, mx.array(mask), kind, tail=tail, temperature=1.5, **PARAMS
        )
    )(mx.array(s))
    ids_np = np.array(ids)
    fd = _finite_difference(
        lambda x: reference_sparse(kind, x, ids_np, t, mask, tail, 1.5, 0.3, 0.2), s
    )
    np.testing.assert_allclose(np.array(grad), fd, atol=3e-5)


# ---------------------------------------------------------------- chunked == plain


@pytest.mark.parametrize("kind", kdcore.DIVERGENCES)
@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_chunked_equals_plain_dense(kind, chunk_rows):
    rng = np.random.default_rng(5)
    s = mx.array(rng.standard_normal((3, 7, 33)).astype(np.float32) * 4)
    t = mx.array(rng.standard_normal((3, 7, 33)).astype(np.float32) * 4)
    mask = mx.array(_mask(rng, (3, 7), 0.6))  # gaps: non-contiguous rows
    kw = {"temperature": 1.7, **PARAMS}
    v1, g1 = mx.value_and_grad(
        lambda x: testing.dense_divergence(x, t, mask, kind, chunk_rows=chunk_rows, **kw)
    )(s)
    v2, g2 = mx.value_and_grad(lambda x: testing.plain_divergence(x, t, mask, kind, **kw))(s)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-5)
    np.testing.assert_allclose(np.array(g1), np.array(g2), atol=1e-7)
    # the teacher's cotangent (for learnable aggregators) is the plain one
    h1 = mx.grad(lambda y: testing.dense_divergence(s, y, mask, kind, chunk_rows=chunk_rows, **kw))(
        t
    )
    h2 = mx.grad(lambda y: testing.plain_divergence(s, y, mask, kind, **kw))(t)
    np.testing.assert_allclose(np.array(h1), np.array(h2), atol=1e-7)


@pytest.mark.parametrize("kind", kdcore.DIVERGENCES)
@pytest.mark.parametrize("tail", testing.TAIL_POLICIES)
def test_chunked_equals_plain_sparse(kind, tail):
    rng = np.random.default_rng(6)
    s = mx.array(rng.standard_normal((2, 9, 40)).astype(np.float32) * 3)
    t = mx.array(rng.standard_normal((2, 9, 40)).astype(np.float32) * 3)
    mask = mx.array(_mask(rng, (2, 9), 0.6))
    ids, lp = kdcore.teacher_support(kdcore.TeacherSignal(vocab_size=40, logits=t), 2.0, tail, 5)
    kw = {"tail": tail, "temperature": 2.0, **PARAMS}
    v1, g1 = mx.value_and_grad(
        lambda x: testing.sparse_divergence(x, ids, lp, mask, kind, chunk_rows=4, **kw)
    )(s)
    v2, g2 = mx.value_and_grad(
        lambda x: testing.plain_sparse_divergence(x, ids, lp, mask, kind, **kw)
    )(s)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-5)
    np.testing.assert_allclose(np.array(g1), np.array(g2), atol=1e-7)
    want = reference_sparse(
        kind, np.array(s), np.array(ids), np.array(t), np.array(mask), tail, 2.0, 0.3, 0.2
    )
    assert v1.item() == pytest.approx(want, rel=1e-4)


def test_bfloat16_logits_and_empty_mask():
    rng = np.random.default_rng(7)
    s = mx.array(rng.standard_normal((2, 3, 11)).astype(np.float32)).astype(mx.bfloat16)
    t = mx.array(rng.standard_normal((2, 3, 11)).astype(np.float32))
    mask = mx.ones((2, 3))
    v1, g1 = mx.value_and_grad(lambda x: testing.dense_divergence(x, t, mask, "reverse_kl"))(s)
    v2 = testing.plain_divergence(s, t, mask, "reverse_kl")
    assert g1.dtype == mx.bfloat16
    assert v1.item() == pytest.approx(v2.item(), rel=1e-5)
    v0, g0 = mx.value_and_grad(lambda x: testing.dense_divergence(x, t, mx.zeros((2, 3)), "gjsd"))(
        s
    )
    assert v0.item() == 0.0 and not np.any(np.array(g0.astype(mx.float32)))


# ---------------------------------------------------------------- sparse approximations


@settings(PROFILE)
@given(testing.logit_pairs(bound=10.0, min_vocab=3), st.sampled_from(kdcore.DIVERGENCES), st.data())
def test_tail_bucket_is_a_lower_bound_and_exact_at_k_equal_v(arrays, kind, data):
    s, t, mask = arrays
    V = s.shape[-1]
    k = data.draw(st.integers(1, V - 1))
    sig = kdcore.TeacherSignal(vocab_size=V, logits=mx.array(t))
    full = testing.dense_divergence(mx.array(s), mx.array(t), mx.array(mask), kind, **PARAMS).item()
    ids, lp = kdcore.teacher_support(sig, 1.0, "tail-bucket", k)
    bucket = testing.sparse_divergence(
        mx.array(s), ids, lp, mx.array(mask), kind, tail="tail-bucket", **PARAMS
    ).item()
    assert bucket <= full + 1e-5 * max(1.0, full)  # data-processing inequality
    for tail in testing.TAIL_POLICIES:  # k = V through a top-k signal: both policies are exact
        lpv = np.array(kdcore.log_softmax(mx.array(t)))
        order = np.argsort(-lpv, -1).astype(np.int32)
        cache = kdcore.TeacherSignal(
            vocab_size=V,
            topk_ids=mx.array(order),
            topk_logprobs=mx.array(np.take_along_axis(lpv, order, -1)),
            tail_logmass=mx.full(mask.shape, -np.inf),
        )
        exact = kdcore.token_divergence(
            mx.array(s), cache, mx.array(mask), kind, tail=tail, **PARAMS
        ).item()
        assert exact == pytest.approx(full, rel=1e-4, abs=2e-5)


def test_retempering_a_cache_matches_the_dense_teacher():
    """Log-probs stored at capture temperature 1 and used at T = 3 (k = V)."""
    rng = np.random.default_rng(8)
    s = mx.array(rng.standard_normal((2, 5, 12)).astype(np.float32) * 3)
    t = rng.standard_normal((2, 5, 12)).astype(np.float32) * 3
    lp = np.array(kdcore.log_softmax(mx.array(t)))
    cache = kdcore.TeacherSignal(
        vocab_size=12,
        topk_ids=mx.array(np.argsort(-lp, -1).astype(np.int32)),
        topk_logprobs=mx.array(np.sort(lp, -1)[..., ::-1].copy()),
        tail_logmass=mx.full((2, 5), -np.inf),
        capture_temperature=1.0,
    )
    mask = mx.ones((2, 5))
    for kind in ("reverse_kl", "gjsd"):
        got = kdcore.token_divergence(s, cache, mask, kind, temperature=3.0, **PARAMS).item()
        want = reference(kind, np.array(s), t, np.ones((2, 5)), 3.0, 0.3, 0.2)
        assert got == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", ["reverse_kl", "gjsd"])
def test_distilling_with_the_loss_lowers_it(teacher_dir, spec_for, tmp_path, name):
    spec = spec_for([{"name": name}], steps=25, teachers=[{"path": str(teacher_dir)}])
    app.distill(spec, output=tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    values = [r[f"loss/{name}"] for r in lines if f"loss/{name}" in r]
    assert len(values) == 25
    assert np.mean(values[-5:]) < 0.7 * np.mean(values[:3])


def test_kd_explain_gjsd_states_the_jump_at_the_endpoints(capsys):
    """The endpoints are special-cased (forward KL at beta = 0, reverse KL at 1) while the
    mixture formula tends to 0 there: the loss jumps, and ``kd explain`` says so."""
    assert testing.run_kd("explain", "gjsd") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "jumps" in text and "beta = 0" in text and "beta = 1" in text, text
    # ... and that is what the numbers do: about beta * KL(p || q) just above 0.
    rng = np.random.default_rng(0)
    s = mx.array(rng.standard_normal((2, 3, 11)).astype(np.float32))
    t = mx.array(rng.standard_normal((2, 3, 11)).astype(np.float32))
    mask = mx.ones((2, 3))
    forward = kdcore.token_divergence(s, t, mask, "forward_kl").item()
    at_zero = kdcore.token_divergence(s, t, mask, "gjsd", beta=0.0).item()
    near_zero = kdcore.token_divergence(s, t, mask, "gjsd", beta=1e-3).item()
    assert at_zero == pytest.approx(forward, rel=1e-5)
    assert near_zero == pytest.approx(1e-3 * forward, rel=0.05)


def test_tvd_is_half_the_l1_distance_in_float64_and_its_gradient_matches():
    """tvd against the float64 definition, and its kernel gradient against autodiff of the
    plain whole-array form (the chunked kernel computes the subgradient in closed form)."""
    rng = np.random.default_rng(3)
    s = rng.standard_normal((2, 5, 40)).astype(np.float32) * 3
    t = rng.standard_normal((2, 5, 40)).astype(np.float32) * 3
    mask = _mask(rng, (2, 5))
    args = (mx.array(t), mx.array(mask))
    for T in (1.0, 2.0):
        value = testing.dense_divergence(mx.array(s), *args, "tvd", temperature=T).item()
        assert value == pytest.approx(reference("tvd", s, t, mask, T), rel=1e-5)
        assert 0.0 <= value <= 1.0

        def kernel(x, T=T):
            return testing.dense_divergence(x, *args, "tvd", temperature=T)

        def plain(x, T=T):
            return testing.plain_divergence(x, *args, "tvd", temperature=T)

        g_kernel = np.array(mx.grad(kernel)(mx.array(s)))
        g_plain = np.array(mx.grad(plain)(mx.array(s)))
        assert np.allclose(g_kernel, g_plain, atol=1e-6)
        assert np.abs(g_kernel).max() > 0
