"""bild and bidirectional_kl: conformance, float64 reference, gradients, caches, end to end."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kd_bild import bild_divergence, plain_bild

import kdcore
from kdcore import ModelOutput, app, testing

PROFILE = settings.get_profile(testing.PROFILE)


# ---------------------------------------------------------------- float64 reference


def log_softmax64(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def ld64(t_sel, s_sel, T):
    """KL(softmax(teacher pair differences) || softmax(student pair differences))."""
    k = t_sel.shape[-1]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    dt = np.stack([t_sel[..., i] - t_sel[..., j] for i, j in pairs], -1) / T
    ds = np.stack([s_sel[..., i] - s_sel[..., j] for i, j in pairs], -1) / T
    lt, ls = log_softmax64(dt), log_softmax64(ds)
    return (np.exp(lt) * (lt - ls)).sum(-1)


def bild64(s, t, mask, k=8, T=3.0, t_at=None):
    """t-LD + s-LD; ``t_at(ids)`` gives the teacher values at the student's ids (default:
    the dense teacher)."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    k = min(k, s.shape[-1])
    if k < 2:
        return 0.0
    ids_t = np.argsort(-t, -1, kind="stable")[..., :k]
    ids_s = np.argsort(-s, -1, kind="stable")[..., :k]
    take = np.take_along_axis
    t_follow = take(t, ids_s, -1) if t_at is None else t_at(ids_s)
    rows = ld64(take(t, ids_t, -1), take(s, ids_t, -1), T) + ld64(t_follow, take(s, ids_s, -1), T)
    mask = np.asarray(mask, np.float64)
    return float((rows * mask).sum() / max(mask.sum(), 1.0))


def distinct(x):
    return (x + np.arange(x.shape[-1], dtype=np.float32) * 1e-2).astype(np.float32)


def run(name, s, teacher, mask, **params):
    if isinstance(teacher, np.ndarray):
        teacher = kdcore.TeacherSignal(vocab_size=teacher.shape[-1], logits=mx.array(teacher))
    loss = testing.build_loss(name, **params)
    inputs = kdcore.LossInputs(
        student=ModelOutput(logits=mx.array(s) if isinstance(s, np.ndarray) else s),
        teacher=teacher,
        batch={"mask": mx.array(mask)},
        params=app.make_config("loss", name, **params),
    )
    return loss(inputs)


def cache_of(t, k, capture=1.0):
    """A top-k teacher signal (log-probs at the capture temperature) from dense logits."""
    lp = np.array(kdcore.log_softmax(mx.array(t), capture))
    order = np.argsort(-lp, -1, kind="stable")[..., :k].astype(np.int32)
    top = np.take_along_axis(lp, order, -1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.maximum(1 - np.exp(top).sum(-1), 0))
    return kdcore.TeacherSignal(
        vocab_size=t.shape[-1],
        topk_ids=mx.array(order),
        topk_logprobs=mx.array(top),
        tail_logmass=mx.array(tail),
        capture_temperature=capture,
    )


# ---------------------------------------------------------------- conformance


@st.composite
def separated_logit_pairs(draw, bound: float = 30.0, **shape_kwargs):
    """kdcore.testing.logit_pairs with the values of each row at least 0.01 apart.

    BiLD orders each row's top-k by value, so it is discontinuous where two logits tie;
    the kit's constant-shift check adds +/-50 in float32, which turns near-ties such as
    (0, 1e-12) into exact ties. Separating the values keeps every other check intact.
    """
    student, teacher, mask = draw(ORIGINAL_PAIRS(bound=bound, **shape_kwargs))

    def separate(x):
        rank = np.argsort(np.argsort(x, -1, kind="stable"), -1, kind="stable")
        return (x + 0.01 * rank).astype(np.float32)

    return separate(student), separate(teacher), mask


ORIGINAL_PAIRS = testing.logit_pairs


@pytest.fixture
def tie_free(monkeypatch):
    monkeypatch.setattr(testing, "logit_pairs", separated_logit_pairs)


@pytest.mark.usefixtures("tie_free")
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"top_k": 3, "temperature": 1.0},
        {"temperature": {"schedule": "linear", "start": 4.0, "end": 1.0}},
    ],
)
def test_bild_conforms(params):
    testing.check_loss("bild", **params)


@pytest.mark.parametrize(
    "params", [{}, {"forward_weight": 0.2, "reverse_weight": 1.0, "temperature": 1.0}]
)
def test_bidirectional_kl_conforms(params):
    testing.check_loss("bidirectional_kl", **params)


# ---------------------------------------------------------------- values and gradients


@settings(PROFILE)
@given(testing.logit_pairs(bound=20.0), st.sampled_from([1, 2, 3, 8]), st.sampled_from([1.0, 3.0]))
def test_bild_matches_the_float64_reference(arrays, k, T):
    s, t, mask = arrays
    s, t = distinct(s), distinct(t)
    value, _ = run("bild", s, t, mask, top_k=k, temperature=T)
    assert value.item() == pytest.approx(bild64(s, t, mask, k, T), rel=1e-4, abs=1e-5)
    assert value.item() >= -1e-6


def test_bild_matches_the_official_defaults():
    assert app.make_config("loss", "bild").top_k == 8
    assert app.make_config("loss", "bild").temperature == 3.0


def _finite_difference(f, x, eps=1e-5):
    g = np.zeros(x.shape)
    for i in np.ndindex(x.shape):
        up, down = x.astype(np.float64), x.astype(np.float64)
        up[i] += eps
        down[i] -= eps
        g[i] = (f(up) - f(down)) / (2 * eps)
    return g


def test_bild_offers_the_official_prompt_token_kl(capsys):
    """The official trainer adds KL(p || q) at T = 1 on the prompt tokens (label < 0 inside
    the attention mask) to every loss, BiLD included; ``prompt_kl`` is its weight (off by
    default, the paper's loss), and ``kd explain bild`` says so."""
    assert testing.run_kd("explain", "bild") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "prompt" in text and "official" in text and "prompt_kl" in text, text
    rng = np.random.default_rng(5)
    B, L, V = 2, 7, 12
    s = distinct(rng.standard_normal((B, L, V)).astype(np.float32) * 2)
    t = distinct(rng.standard_normal((B, L, V)).astype(np.float32) * 2)
    # row 0: 3 prompt positions, 3 response, 1 padding; row 1: 1 prompt, 6 response
    mask = np.array([[0, 0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]], np.float32)
    plain, metrics = run("bild", s, t, mask)
    assert plain.item() == pytest.approx(bild64(s, t, mask), rel=1e-4)
    assert metrics == {}
    value, metrics = run("bild", s, t, mask, prompt_kl=0.5)
    prompt = np.array([[1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]], np.float64)
    lp, lq = log_softmax64(t), log_softmax64(s)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    prompt_kl = float((kl * prompt).sum() / prompt.sum())
    assert metrics["prompt_kl"].item() == pytest.approx(prompt_kl, rel=1e-4)
    assert value.item() == pytest.approx(bild64(s, t, mask) + 0.5 * prompt_kl, rel=1e-4)
    with pytest.raises(kdcore.SpecError, match="prompt_kl"):
        app.make_config("loss", "bild", prompt_kl=-1.0)


@pytest.mark.parametrize("k,T", [(3, 1.0), (4, 3.0)])
def test_bild_gradient_matches_finite_differences(k, T):
    rng = np.random.default_rng(0)
    s = distinct(rng.standard_normal((1, 3, 7)).astype(np.float32) * 2)
    t = distinct(rng.standard_normal((1, 3, 7)).astype(np.float32) * 2)
    mask = np.array([[1.0, 0.0, 1.0]], np.float32)
    grad = mx.grad(lambda x: bild_divergence(x, mx.array(t), mx.array(mask), k, T))(mx.array(s))
    fd = _finite_difference(lambda x: bild64(x, t, mask, k, T), s)
    np.testing.assert_allclose(np.array(grad), fd, atol=3e-5)


def test_bild_rows_equal_the_plain_transcription():
    rng = np.random.default_rng(1)
    s = mx.array(distinct(rng.standard_normal((3, 7, 60)).astype(np.float32) * 3))
    t = mx.array(distinct(rng.standard_normal((3, 7, 60)).astype(np.float32) * 3))
    mask = mx.array((rng.random((3, 7)) < 0.6).astype(np.float32))
    v1, g1 = mx.value_and_grad(lambda x: bild_divergence(x, t, mask, 8, 3.0))(s)
    v2, g2 = mx.value_and_grad(lambda x: plain_bild(x, t, mask, 8, 3.0))(s)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-5)
    np.testing.assert_allclose(np.array(g1), np.array(g2), atol=1e-7)


# ---------------------------------------------------------------- from a top-k cache


def test_bild_from_a_full_cache_is_exact_at_any_capture_temperature():
    rng = np.random.default_rng(2)
    s = distinct(rng.standard_normal((2, 5, 16)).astype(np.float32) * 2)
    t = distinct(rng.standard_normal((2, 5, 16)).astype(np.float32) * 2)
    mask = np.ones((2, 5), np.float32)
    dense, _ = run("bild", s, t, mask)
    for capture in (1.0, 2.0):
        cached, _ = run("bild", s, cache_of(t, 16, capture), mask)
        assert cached.item() == pytest.approx(dense.item(), rel=1e-4)


def test_bild_from_a_partial_cache_uses_the_documented_estimate():
    rng = np.random.default_rng(3)
    V, K = 40, 10
    s = distinct(rng.standard_normal((2, 6, V)).astype(np.float32) * 3)
    t = distinct(rng.standard_normal((2, 6, V)).astype(np.float32) * 3)
    mask = np.ones((2, 6), np.float32)
    cache = cache_of(t, K)
    lp = log_softmax64(t)
    cached_ids = np.argsort(-t, -1, kind="stable")[..., :K]
    top = np.take_along_axis(lp, cached_ids, -1)
    rest = np.minimum(np.log(1 - np.exp(top).sum(-1)) - np.log(V - K), top.min(-1))

    def t_at(ids):  # cached tokens exactly, the others at the estimate
        inside = (ids[..., :, None] == cached_ids[..., None, :]).any(-1)
        return np.where(inside, np.take_along_axis(lp, ids, -1), rest[..., None])

    got, _ = run("bild", s, cache, mask)
    assert got.item() == pytest.approx(bild64(s, lp, mask, t_at=t_at), rel=1e-4)
    # t-LD alone is exact from the cache: a student whose top-k lies in the cache gives the
    # dense value
    s_in = np.where((np.arange(V) == cached_ids[..., :, None]).any(-2), s + 50.0, s)
    dense, _ = run("bild", s_in.astype(np.float32), t, mask)
    cached, _ = run("bild", s_in.astype(np.float32), cache, mask)
    assert cached.item() == pytest.approx(dense.item(), rel=1e-4)


def test_bild_refuses_a_cache_smaller_than_its_k():
    rng = np.random.default_rng(4)
    t = rng.standard_normal((1, 2, 20)).astype(np.float32)
    s = rng.standard_normal((1, 2, 20)).astype(np.float32)
    with pytest.raises(ValueError, match="k >= 8"):
        run("bild", s, cache_of(t, 4), np.ones((1, 2), np.float32))


# ---------------------------------------------------------------- bidirectional_kl


def test_bidirectional_kl_is_weighted_forward_plus_reverse_times_t_squared():
    rng = np.random.default_rng(5)
    s = rng.standard_normal((2, 4, 12)).astype(np.float32) * 2
    t = rng.standard_normal((2, 4, 12)).astype(np.float32) * 2
    mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], np.float32)
    value, metrics = run(
        "bidirectional_kl", s, t, mask, temperature=2.0, forward_weight=0.3, reverse_weight=0.9
    )
    p, q = np.exp(log_softmax64(t / 2)), np.exp(log_softmax64(s / 2))
    fwd = ((p * (np.log(p) - np.log(q))).sum(-1) * mask).sum() / mask.sum()
    rev = ((q * (np.log(q) - np.log(p))).sum(-1) * mask).sum() / mask.sum()
    assert metrics["forward_kl"].item() == pytest.approx(fwd, rel=1e-4)
    assert metrics["reverse_kl"].item() == pytest.approx(rev, rel=1e-4)
    assert value.item() == pytest.approx(4 * (0.3 * fwd + 0.9 * rev), rel=1e-4)
    assert value.item() != pytest.approx(run("bild", s, t, mask)[0].item(), rel=1e-2)


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", ["bild", "bidirectional_kl"])
def test_distilling_a_tiny_student_lowers_the_loss(teacher_dir, spec_for, tmp_path, name):
    spec = spec_for([{"name": name}], steps=25, teachers=[{"path": str(teacher_dir)}])
    app.distill(spec, output=tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    values = [r[f"loss/{name}"] for r in lines if f"loss/{name}" in r]
    assert len(values) == 25
    assert np.mean(values[-5:]) < 0.7 * np.mean(values[:3])
