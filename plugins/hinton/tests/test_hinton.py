"""hinton and selective: conformance, float64 reference, gradients, top-k, memory, end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore import ModelOutput, app, testing

PROFILE = settings.get_profile(testing.PROFILE)


# ---------------------------------------------------------------- float64 reference


def log_softmax64(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def kl64(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


def masked_mean64(rows, mask):
    mask = np.asarray(mask, np.float64)
    return float((rows * mask).sum() / max(mask.sum(), 1.0))


def hinton64(s, t, mask, T, t_squared=True, top_k=0, tail="renormalize"):
    """T^2 KL(softmax(t/T) || softmax(s/T)); with top_k, on the teacher's top-k support."""
    p = np.exp(log_softmax64(np.asarray(t) / T))
    q = np.exp(log_softmax64(np.asarray(s) / T))
    if 0 < top_k < p.shape[-1]:
        ids = np.argsort(-np.asarray(t), -1, kind="stable")[..., :top_k]
        pk, qk = np.take_along_axis(p, ids, -1), np.take_along_axis(q, ids, -1)
        if tail == "renormalize":
            p, q = pk / pk.sum(-1, keepdims=True), qk / qk.sum(-1, keepdims=True)
        else:
            p = np.concatenate([pk, 1 - pk.sum(-1, keepdims=True)], -1)
            q = np.concatenate([qk, 1 - qk.sum(-1, keepdims=True)], -1)
    value = masked_mean64(kl64(p, q), mask)
    return value * T * T if t_squared else value


def inputs_for(s, teacher, mask, name, **params):
    if isinstance(teacher, np.ndarray):
        teacher = kdcore.TeacherSignal(vocab_size=teacher.shape[-1], logits=mx.array(teacher))
    return kdcore.LossInputs(
        student=ModelOutput(logits=mx.array(s) if isinstance(s, np.ndarray) else s),
        teacher=teacher,
        batch={"mask": mx.array(mask)},
        params=app.make_config("loss", name, **params),
    )


def run(name, s, teacher, mask, **params):
    loss = testing.build_loss(name, **params)
    return loss(inputs_for(s, teacher, mask, name, **params))


def distinct(x: np.ndarray) -> np.ndarray:
    """Break ties so that the top-k set is unambiguous."""
    return x + np.arange(x.shape[-1], dtype=np.float32) * 1e-3


# ---------------------------------------------------------------- conformance

ORIGINAL_PAIRS = testing.logit_pairs


@st.composite
def separated_logit_pairs(draw, bound: float = 30.0, **shape_kwargs):
    """kdcore.testing.logit_pairs with the values of each row at least 0.01 apart.

    A top-k teacher (``top_k``, ``selective``) is discontinuous where two logits tie at the
    k-th place, and the kit's constant-shift check adds +/-50 in float32, which turns
    near-ties such as (0, 1e-12) into exact ties; separated values keep every other check.
    """
    student, teacher, mask = draw(ORIGINAL_PAIRS(bound=bound, **shape_kwargs))

    def separate(x):
        rank = np.argsort(np.argsort(x, -1, kind="stable"), -1, kind="stable")
        return (x + 0.01 * rank).astype(np.float32)

    return separate(student), separate(teacher), mask


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"temperature": 1.0, "t_squared": False},
        {"temperature": {"schedule": "cosine", "start": 4.0, "end": 1.0}},
    ],
)
def test_hinton_conforms(params):
    testing.check_loss("hinton", **params)


@pytest.mark.parametrize(
    "name,params",
    [
        ("hinton", {"top_k": 3}),
        ("hinton", {"top_k": 3, "tail": "tail-bucket", "temperature": 1.5}),
        ("selective", {}),
        ("selective", {"top_k": 4, "min_entropy": 1.0, "tail": "tail-bucket"}),
    ],
)
def test_top_k_losses_conform(monkeypatch, name, params):
    monkeypatch.setattr(testing, "logit_pairs", separated_logit_pairs)
    testing.check_loss(name, **params)


def test_invalid_parameters_are_spec_errors():
    with pytest.raises(kdcore.SpecError, match="temperature"):
        app.make_config("loss", "hinton", temperature=0.0)
    with pytest.raises(kdcore.SpecError, match="tail"):
        app.make_config("loss", "hinton", tail="drop")
    with pytest.raises(kdcore.SpecError, match="top_k"):
        app.make_config("loss", "hinton", top_k=-1)


# ---------------------------------------------------------------- values


@settings(PROFILE)
@given(testing.logit_pairs(bound=20.0), st.sampled_from([0.5, 1.0, 2.0, 4.0]), st.booleans())
def test_hinton_matches_the_float64_reference(arrays, T, t_squared):
    s, t, mask = arrays
    value, _ = run("hinton", s, t, mask, temperature=T, t_squared=t_squared)
    want = hinton64(s, t, mask, T, t_squared)
    assert value.item() == pytest.approx(want, rel=1e-4, abs=2e-5 * T * T)


@settings(PROFILE)
@given(
    testing.logit_pairs(bound=10.0, min_vocab=3), st.sampled_from(testing.TAIL_POLICIES), st.data()
)
def test_top_k_tail_policies_match_the_reference(arrays, tail, data):
    s, t, mask = arrays
    t = distinct(t)
    k = data.draw(st.integers(1, s.shape[-1] - 1))
    value, _ = run("hinton", s, t, mask, temperature=2.0, top_k=k, tail=tail)
    want = hinton64(s, t, mask, 2.0, top_k=k, tail=tail)
    assert value.item() == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("tail", testing.TAIL_POLICIES)
def test_top_k_equal_to_v_is_hinton(tail):
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 4, 16)).astype(np.float32) * 3
    t = rng.standard_normal((2, 4, 16)).astype(np.float32) * 3
    mask = np.ones((2, 4), np.float32)
    full, _ = run("hinton", s, t, mask, temperature=2.0)
    at_v, _ = run("hinton", s, t, mask, temperature=2.0, top_k=16, tail=tail)
    assert at_v.item() == pytest.approx(full.item(), rel=1e-6)
    # the sparse kernel itself at k = V (every id, in teacher order) is hinton too
    sig = kdcore.TeacherSignal(vocab_size=16, logits=mx.array(t))
    ids, lp = kdcore.teacher_support(sig, 2.0, tail, top_k=16)
    sparse = testing.sparse_divergence(
        mx.array(s), ids, lp, mx.array(mask), tail=tail, temperature=2.0
    )
    assert 4.0 * sparse.item() == pytest.approx(full.item(), rel=1e-5)
    # and so is a top-k teacher signal holding all V tokens (a full cache)
    lpv = np.array(kdcore.log_softmax(mx.array(t)))
    order = np.argsort(-lpv, -1).astype(np.int32)
    cache = kdcore.TeacherSignal(
        vocab_size=16,
        topk_ids=mx.array(order),
        topk_logprobs=mx.array(np.take_along_axis(lpv, order, -1)),
        tail_logmass=mx.full((2, 4), -np.inf),
    )
    cached, _ = run("hinton", s, cache, mask, temperature=2.0, tail=tail)
    assert cached.item() == pytest.approx(full.item(), rel=1e-5)


def test_a_cache_with_more_tokens_than_top_k_keeps_the_largest():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((1, 3, 20)).astype(np.float32)
    t = distinct(rng.standard_normal((1, 3, 20)).astype(np.float32) * 2)
    mask = np.ones((1, 3), np.float32)
    lpv = np.array(kdcore.log_softmax(mx.array(t)))
    order = np.argsort(-lpv, -1)[..., :10].astype(np.int32)
    tail = np.log(1 - np.exp(np.take_along_axis(lpv, order, -1)).sum(-1))
    cache = kdcore.TeacherSignal(
        vocab_size=20,
        topk_ids=mx.array(order),
        topk_logprobs=mx.array(np.take_along_axis(lpv, order, -1)),
        tail_logmass=mx.array(tail.astype(np.float32)),
    )
    for policy in testing.TAIL_POLICIES:
        got, _ = run("hinton", s, cache, mask, temperature=1.0, top_k=4, tail=policy)
        want = hinton64(s, t, mask, 1.0, top_k=4, tail=policy)
        assert got.item() == pytest.approx(want, rel=1e-4)


def test_mixture_teacher_value_and_gradient_to_its_weights():
    rng = np.random.default_rng(2)
    s = rng.standard_normal((2, 3, 9)).astype(np.float32) * 2
    members = [rng.standard_normal((2, 3, 9)).astype(np.float32) * 2 for _ in range(2)]
    mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)

    def value_of(w_logits):
        w = mx.softmax(w_logits, -1)
        sig = kdcore.TeacherSignal(
            vocab_size=9,
            members=tuple(kdcore.TeacherSignal(vocab_size=9, logits=mx.array(m)) for m in members),
            weights=w,
        )
        return run("hinton", s, sig, mask, temperature=2.0)[0]

    w0 = mx.array([[0.3, -0.2], [1.0, 0.5]])
    w = np.array(mx.softmax(w0, -1))
    p = sum(w[:, None, None, i] * np.exp(log_softmax64(members[i] / 2.0)) for i in range(2))
    q = np.exp(log_softmax64(s / 2.0))
    assert value_of(w0).item() == pytest.approx(4 * masked_mean64(kl64(p, q), mask), rel=1e-4)
    grad = np.array(mx.grad(value_of)(w0))

    def plain(w_logits):  # same maths through whole-array autodiff
        ww = mx.softmax(w_logits, -1)
        stacked = mx.stack([kdcore.log_softmax(mx.array(m), 2.0) for m in members], -1)
        lp = mx.logsumexp(stacked + mx.log(ww)[:, None, None, :], -1)
        rows = testing.row_terms(
            "forward_kl", 0.0, kdcore.log_softmax(mx.array(s), 2.0), lp, grad=False
        )[0]
        return 4 * kdcore.masked_mean(rows, mx.array(mask))

    np.testing.assert_allclose(grad, np.array(mx.grad(plain)(w0)), atol=1e-6)
    assert np.abs(grad).max() > 1e-4  # the learnable weights do get a gradient


# ---------------------------------------------------------------- gradients


def _finite_difference(f, x, eps=1e-5):
    g = np.zeros(x.shape)
    for i in np.ndindex(x.shape):
        up, down = x.astype(np.float64), x.astype(np.float64)
        up[i] += eps
        down[i] -= eps
        g[i] = (f(up) - f(down)) / (2 * eps)
    return g


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1.0},
        {"temperature": 3.0},
        {"temperature": 2.0, "top_k": 3},
        {"temperature": 2.0, "top_k": 3, "tail": "tail-bucket"},
    ],
)
def test_hinton_gradient_matches_finite_differences(params):
    rng = np.random.default_rng(3)
    s = rng.standard_normal((1, 3, 7)).astype(np.float32) * 2
    t = distinct(rng.standard_normal((1, 3, 7)).astype(np.float32) * 2)
    mask = np.array([[1.0, 1.0, 0.0]], np.float32)
    loss = testing.build_loss("hinton", **params)
    grad = mx.grad(lambda x: loss(inputs_for(x, t, mask, "hinton", **params))[0])(mx.array(s))
    fd = _finite_difference(
        lambda x: hinton64(
            x,
            t,
            mask,
            params["temperature"],
            True,
            params.get("top_k", 0),
            params.get("tail", "renormalize"),
        ),
        s,
    )
    np.testing.assert_allclose(np.array(grad), fd, atol=5e-5)


def test_chunked_hinton_equals_plain_values_and_gradients():
    rng = np.random.default_rng(4)
    s = mx.array(rng.standard_normal((4, 9, 50)).astype(np.float32) * 4)
    t = mx.array(rng.standard_normal((4, 9, 50)).astype(np.float32) * 4)
    mask = mx.array((rng.random((4, 9)) < 0.6).astype(np.float32))
    for rows in (1, 5, 1000):
        v1, g1 = mx.value_and_grad(
            lambda x, rows=rows: testing.dense_divergence(
                x, t, mask, temperature=2.0, chunk_rows=rows
            )
        )(s)
        v2, g2 = mx.value_and_grad(lambda x: testing.plain_divergence(x, t, mask, temperature=2.0))(
            s
        )
        assert v1.item() == pytest.approx(v2.item(), rel=1e-6)
        np.testing.assert_allclose(np.array(g1), np.array(g2), atol=1e-8)


MEMORY_PROBE = """
import json, sys
import mlx.core as mx
import kdcore
from kdcore import testing
N, V = 512, 8192
s = mx.random.normal((N, V), key=mx.random.key(0)) * 3
t = mx.random.normal((N, V), key=mx.random.key(1)) * 3
mask = mx.ones((N,))
mx.eval(s, t, mask)
if sys.argv[1] == "plain":
    f = lambda x: testing.plain_divergence(x, t, mask, "forward_kl")
else:
    f = lambda x: testing.dense_divergence(x, t, mask, "forward_kl", chunk_rows=32)
base = mx.get_active_memory()
mx.reset_peak_memory()
v, g = mx.value_and_grad(f)(s)
mx.eval(v, g)
print(json.dumps({"extra": mx.get_peak_memory() - base - g.nbytes, "value": v.item()}))
"""


def test_the_kernel_keeps_only_a_chunk_of_temporaries():
    """Peak memory beyond the inputs and the gradient, measured in fresh processes."""
    out = {}
    for variant in ("plain", "chunked"):
        proc = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, variant],
            check=True,
            capture_output=True,
            text=True,
        )
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["chunked"]["value"] == pytest.approx(out["plain"]["value"], rel=1e-5)
    one_array = 512 * 8192 * 4
    assert out["plain"]["extra"] >= 2 * one_array  # whole [N, V] temporaries
    assert out["chunked"]["extra"] <= 0.25 * out["plain"]["extra"]
    one_chunk = 32 * 8192 * 4  # a [chunk_rows, V] float32 temporary
    assert out["chunked"]["extra"] <= 16 * one_chunk


# ---------------------------------------------------------------- selective


def entropy64(t):
    lp = log_softmax64(t)
    return -(np.exp(lp) * lp).sum(-1)


def test_selective_keeps_high_entropy_positions_only():
    rng = np.random.default_rng(5)
    s = rng.standard_normal((2, 6, 12)).astype(np.float32)
    t = rng.standard_normal((2, 6, 12)).astype(np.float32)
    t[0, :3] *= 20.0  # three confident (low-entropy) positions
    t = distinct(t)
    mask = np.ones((2, 6), np.float32)
    mask[1, 5] = 0.0
    threshold = 1.0
    value, metrics = run("selective", s, t, mask, top_k=5, min_entropy=threshold, temperature=2.0)
    keep = (entropy64(t) > threshold).astype(np.float32) * mask
    assert 0 < keep.sum() < mask.sum()
    assert metrics["kept"].item() == pytest.approx(keep.sum() / mask.sum(), rel=1e-6)
    assert value.item() == pytest.approx(hinton64(s, t, keep, 2.0, top_k=5), rel=1e-4)
    # the student's logits at dropped positions do not matter
    s2 = s.copy()
    s2[keep == 0] += rng.standard_normal(s2[keep == 0].shape).astype(np.float32) * 5
    value2, _ = run("selective", s2, t, mask, top_k=5, min_entropy=threshold, temperature=2.0)
    assert value2.item() == pytest.approx(value.item(), rel=1e-6)


def test_selective_without_selection_is_hinton():
    rng = np.random.default_rng(6)
    s = rng.standard_normal((2, 4, 10)).astype(np.float32)
    t = rng.standard_normal((2, 4, 10)).astype(np.float32)
    mask = np.ones((2, 4), np.float32)
    value, metrics = run("selective", s, t, mask, top_k=10, min_entropy=-1.0, temperature=2.0)
    assert metrics["kept"].item() == 1.0
    assert value.item() == pytest.approx(
        run("hinton", s, t, mask, temperature=2.0)[0].item(), rel=1e-6
    )


# ---------------------------------------------------------------- end to end


def _term(out, label):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[f"loss/{label}"] for r in lines if f"loss/{label}" in r]


@pytest.mark.parametrize(
    "loss",
    [
        {"name": "hinton", "params": {"temperature": 2.0}},
        {"name": "selective", "params": {"top_k": 16, "min_entropy": 0.5}},
    ],
)
def test_distilling_a_tiny_student_lowers_the_loss(teacher_dir, spec_for, tmp_path, loss):
    spec = spec_for([loss], steps=25, teachers=[{"path": str(teacher_dir)}])
    summary = app.distill(spec, output=tmp_path / "run", progress=False)
    values = _term(tmp_path / "run", loss["name"])
    assert len(values) == 25
    assert np.mean(values[-5:]) < 0.7 * np.mean(values[:3])
    assert np.isfinite(summary["eval"]["val_loss"])
