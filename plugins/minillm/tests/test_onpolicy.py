"""The ``minillm`` loss: conformance, float64 NumPy references of both branches, the policy
gradient against exact reverse-KL gradients by enumeration, the sampler's importance weights
and batch layout inside a real run, the on-policy share ``lmbda``, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from kd_minillm.onpolicy import (
    SAMPLE_MASK,
    SAMPLE_TARGETS,
    SAMPLE_WEIGHTS,
    normalised_returns,
    whiten,
)

import kdcore
from kdcore import IGNORE_INDEX, LossInputs, ModelOutput, TeacherSignal, app, testing

Z_LIMIT = 4.5  # sampling tolerance in standard errors (chance of a false alarm ~ 1e-5 each)


# ---------------------------------------------------------------- helpers


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def call(loss, student: np.ndarray | mx.array, teacher: np.ndarray, batch: dict, params=None):
    logits = student if isinstance(student, mx.array) else mx.array(student.astype(np.float32))
    inputs = LossInputs(
        student=ModelOutput(logits=logits),
        teacher=TeacherSignal(
            vocab_size=teacher.shape[-1], logits=mx.array(teacher.astype(np.float32))
        ),
        batch={k: mx.array(v) for k, v in batch.items()},
        params=params,
    )
    return loss(inputs)


def sampled_batch(B, L, V, mask, rng) -> dict:
    """Every row is both a data row and a sample row, so one mask governs all terms."""
    batch = testing.default_batch(B, L, V, mask, rng)
    targets = rng.integers(0, V, size=(B, L))
    batch[SAMPLE_TARGETS] = np.where(mask > 0, targets, IGNORE_INDEX).astype(np.int32)
    batch[SAMPLE_MASK] = mask.astype(np.float32)
    batch[SAMPLE_WEIGHTS] = rng.uniform(0.5, 1.5, size=(B, L)).astype(np.float32)
    return batch


def np_returns(r, m, gamma, length_norm, returns_from):
    """Loop-by-loop reference of the normalised reward-to-go."""
    out = np.zeros_like(r)
    first = 0 if returns_from == "current" else 1
    for b in range(r.shape[0]):
        for t in range(r.shape[1]):
            if not m[b, t]:
                continue
            total, count = 0.0, 0
            for u in range(t + first, r.shape[1]):
                total += gamma ** (u - t - first) * r[b, u] * m[b, u]
                count += m[b, u]
            out[b, t] = total / max(count, 1) if length_norm else total
    return out


def np_whiten(x, m):
    sel = x[m > 0]
    return np.where(m > 0, (x - sel.mean()) / np.sqrt(sel.var() + 1e-8), 0.0)


# ---------------------------------------------------------------- conformance


def test_conforms_off_policy_path():
    # The default batch has no samples: the loss takes its off-policy branch.
    testing.check_loss("minillm", lm_weight=0.5)
    testing.check_loss("minillm", temperature=2.0, reg_weight=0.3)


def test_conforms_on_policy_path():
    # Whitened advantages divide by the rewards' spread (+1e-8): when the kit's student and
    # teacher rows nearly agree, the float32 rounding of shifted logits (~|shift| * 6e-8)
    # is scaled up by as much as 1e4, so the shift check gets a wider tolerance here.
    testing.check_loss("minillm", extra_batch=sampled_batch, lm_weight=0.5, atol=1e-3)
    testing.check_loss(
        "minillm",
        extra_batch=sampled_batch,
        returns_from="current",
        whiten=False,
        temperature=0.7,
        cliprange=0.1,
    )


@pytest.mark.parametrize("on_policy", [False, True])
def test_zero_loss_and_gradient_when_student_equals_teacher(on_policy):
    rng = np.random.default_rng(1)
    B, L, V = 3, 6, 9
    logits = rng.normal(size=(B, L, V)).astype(np.float32) * 3
    mask = (rng.random((B, L)) < 0.7).astype(np.float32)
    mask[0, 0] = 1
    batch = (sampled_batch if on_policy else testing.default_batch)(B, L, V, mask, rng)
    loss = testing.build_loss("minillm", whiten=False)

    def f(z):
        return call(loss, z, logits, batch)[0]

    value, grad = mx.value_and_grad(f)(mx.array(logits))
    assert abs(value.item()) < 1e-5
    assert np.abs(np.array(grad)).max() < 1e-5


# ---------------------------------------------------------------- NumPy references


def test_off_policy_branch_matches_numpy():
    rng = np.random.default_rng(2)
    B, L, V, T = 3, 7, 11, 1.7
    s = rng.normal(size=(B, L, V)) * 2
    t = rng.normal(size=(B, L, V)) * 2
    mask = (rng.random((B, L)) < 0.6).astype(np.float32)
    mask[0, 0] = 1
    batch = testing.default_batch(B, L, V, mask, rng)
    loss = testing.build_loss("minillm", temperature=T, reg_weight=0.7, lm_weight=0.3)
    value, metrics = call(loss, s, t, batch)

    lq, lp = np_log_softmax(s / T), np_log_softmax(t / T)
    kl = (np.exp(lq) * (lq - lp)).sum(-1)
    labels = np.where(batch["labels"] == IGNORE_INDEX, 0, batch["labels"])
    nll = -np.take_along_axis(np_log_softmax(s), labels[..., None], -1)[..., 0]
    reg, lm = (kl * mask).sum() / mask.sum(), (nll * mask).sum() / mask.sum()
    assert metrics["on_policy"].item() == 0.0
    np.testing.assert_allclose(metrics["reg"].item(), reg, rtol=1e-5)
    np.testing.assert_allclose(metrics["lm"].item(), lm, rtol=1e-5)
    np.testing.assert_allclose(value.item(), 0.7 * reg + 0.3 * lm, rtol=1e-5)


@pytest.mark.parametrize("returns_from", ["next", "current"])
@pytest.mark.parametrize("gamma", [1.0, 0.95, 0.0])
@pytest.mark.parametrize("length_norm", [True, False])
def test_returns_match_numpy(returns_from, gamma, length_norm):
    rng = np.random.default_rng(3)
    B, L = 4, 9
    r = rng.normal(size=(B, L))
    lengths = [9, 5, 1, 0]  # full, stopped early, one token, no tokens
    m = (np.arange(L)[None, :] < np.array(lengths)[:, None]).astype(np.float64)
    m[1, 7] = 1.0  # a hole: a masked position inside a row must not count
    got = normalised_returns(
        mx.array(r.astype(np.float32)),
        mx.array(m.astype(np.float32)),
        gamma,
        length_norm,
        returns_from,
    )
    want = np_returns(r, m, gamma, length_norm, returns_from)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)
    w = whiten(got, mx.array(m.astype(np.float32)))
    np.testing.assert_allclose(np.array(w), np_whiten(want, m), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        {},  # defaults: returns from the next token, whitened, rewards / 0.5
        {"returns_from": "current", "whiten": False, "gamma": 0.9, "reward_scaling": 1.0},
        {"temperature": 1.5, "cliprange": 0.05, "reward_clip": 1.0, "lm_weight": 0.4},
    ],
)
def test_on_policy_branch_matches_numpy(params):
    """Value, every metric, and the gradient of the policy-gradient term, in float64."""
    rng = np.random.default_rng(4)
    B, L, V = 3, 8, 6
    s = rng.normal(size=(B, L, V)) * 2
    t = rng.normal(size=(B, L, V)) * 2
    mask = (np.arange(L)[None, :] < np.array([[8], [5], [3]])).astype(np.float32)
    batch = sampled_batch(B, L, V, mask, rng)
    batch[SAMPLE_WEIGHTS] = rng.uniform(0.3, 2.0, size=(B, L)).astype(np.float32)
    config = app.make_config("loss", "minillm", **params)
    loss = testing.build_loss("minillm", **params)
    value, metrics = call(loss, s, t, batch)

    T, m = config.temperature, batch[SAMPLE_MASK].astype(np.float64)
    y = np.where(batch[SAMPLE_TARGETS] == IGNORE_INDEX, 0, batch[SAMPLE_TARGETS])
    lq, lp_T, lp_1 = np_log_softmax(s / T), np_log_softmax(t / T), np_log_softmax(t)
    pick = lambda a: np.take_along_axis(a, y[..., None], -1)[..., 0]  # noqa: E731
    raw = (pick(lp_1) - pick(lq)) * m
    r = np.clip(raw / config.reward_scaling, -config.reward_clip, config.reward_clip) * m
    ret = np_returns(r, m, config.gamma, config.length_norm, config.returns_from)
    adv = np_whiten(ret, m) if config.whiten else ret
    w, eps = batch[SAMPLE_WEIGHTS].astype(np.float64), config.cliprange
    surrogate = np.maximum(-adv * w, -adv * np.clip(w, 1 - eps, 1 + eps))
    n = m.sum()
    pg = (surrogate * m).sum() / n
    reg = ((np.exp(lq) * (lq - lp_T)).sum(-1) * m).sum() / n
    labels = np.where(batch["labels"] == IGNORE_INDEX, 0, batch["labels"])
    nll = -np.take_along_axis(np_log_softmax(s), labels[..., None], -1)[..., 0]
    lm = (nll * mask).sum() / mask.sum()

    np.testing.assert_allclose(metrics["pg"].item(), pg, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["reg"].item(), reg, rtol=1e-5)
    np.testing.assert_allclose(metrics["lm"].item(), lm, rtol=1e-5)
    np.testing.assert_allclose(metrics["reward"].item(), raw.sum() / n, rtol=1e-5)
    np.testing.assert_allclose(metrics["return"].item(), ret.sum() / n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["sample_length"].item(), n / B)
    np.testing.assert_allclose(metrics["importance_weight"].item(), (w * m).sum() / n, rtol=1e-5)
    assert metrics["on_policy"].item() == 1.0
    np.testing.assert_allclose(value.item(), pg + reg + config.lm_weight * lm, rtol=1e-4, atol=1e-6)

    # gradient of the pg term: -A w dlog q/ds where the unclipped branch is the larger, else 0
    active = (w >= 1 - eps) & (w <= 1 + eps) | (-adv * w > -adv * np.clip(w, 1 - eps, 1 + eps))
    coeff = np.where(active, -adv * w, 0.0) * m / n
    onehot = np.eye(V)[y]
    want = coeff[..., None] * (onehot - np.exp(lq)) / T
    pg_only = testing.build_loss("minillm", **{**params, "reg_weight": 0.0, "lm_weight": 0.0})
    got = mx.grad(lambda z: call(pg_only, z, t, batch)[0])(mx.array(s.astype(np.float32)))
    np.testing.assert_allclose(np.array(got), want, atol=1e-5)
    assert (~active & (m > 0)).any(), "the case must exercise the clip"


# ---------------------------------------------------------------- the gradient estimator


def kl_grad(z: np.ndarray, log_p: np.ndarray) -> np.ndarray:
    """d KL(softmax(z) || p) / dz = q (log q - log p - KL), along the last axis."""
    lq = np_log_softmax(z)
    q = np.exp(lq)
    kl = (q * (lq - log_p)).sum(-1, keepdims=True)
    return q * (lq - log_p - kl)


def assert_unbiased(estimate: np.ndarray, per_sample: np.ndarray, exact: np.ndarray) -> None:
    """``estimate`` is the mean of ``per_sample`` and lies within Z_LIMIT standard errors
    (from the sample variance) of ``exact``; the test has power (the gradient is many SEs)."""
    n = per_sample.shape[0]
    mean = per_sample.mean(0)
    # float32 sums over many rows: agree to ~1e-3 of the gradient's scale (<< one SE)
    np.testing.assert_allclose(estimate, mean, atol=2e-3 * np.abs(mean).max())
    se = per_sample.std(0, ddof=1) / math.sqrt(n) + 1e-7
    z = np.abs(estimate - exact) / se
    assert z.max() < Z_LIMIT, f"estimate {estimate} vs exact {exact}: z = {z}"
    assert np.abs(exact).max() > 20 * se.max()


def test_policy_gradient_matches_exact_reverse_kl_gradient_single_step():
    """One sampled token, V = 5: E_y~q[-r(y) grad log q(y)] = grad KL(q || p) exactly."""
    rng = np.random.default_rng(5)
    V, N = 5, 40_000
    theta, teacher = rng.normal(size=V), rng.normal(size=V) * 1.5
    log_q, log_p = np_log_softmax(theta), np_log_softmax(teacher)
    y = rng.choice(V, size=N, p=np.exp(log_q))
    batch = {
        "input_ids": np.zeros((N, 1), np.int32),
        "labels": np.full((N, 1), IGNORE_INDEX, np.int32),
        "mask": np.zeros((N, 1), np.float32),
        SAMPLE_TARGETS: y[:, None].astype(np.int32),
        SAMPLE_MASK: np.ones((N, 1), np.float32),
        SAMPLE_WEIGHTS: np.ones((N, 1), np.float32),
    }
    loss = testing.build_loss(
        "minillm",
        returns_from="current",
        whiten=False,
        reward_scaling=1.0,
        reg_weight=0.0,
        lm_weight=0.0,
    )
    teacher_logits = np.broadcast_to(teacher, (N, 1, V))

    def f(th):
        return call(loss, mx.broadcast_to(th, (N, 1, V)), teacher_logits, batch)[0]

    estimate = np.array(mx.grad(f)(mx.array(theta.astype(np.float32))))
    reward = (log_p - log_q)[y]
    per_sample = -reward[:, None] * (np.eye(V)[y] - np.exp(log_q))
    assert_unbiased(estimate, per_sample, kl_grad(theta, log_p))


def two_step_case(rng, V, N):
    th1, th2 = rng.normal(size=V), rng.normal(size=(V, V))
    te1, te2 = rng.normal(size=V) * 1.5, rng.normal(size=(V, V)) * 1.5
    lq1, lq2 = np_log_softmax(th1), np_log_softmax(th2)
    lp1, lp2 = np_log_softmax(te1), np_log_softmax(te2)
    y1 = rng.choice(V, size=N, p=np.exp(lq1))
    cum = np.exp(lq2[y1]).cumsum(-1)
    y2 = np.minimum((rng.random((N, 1)) > cum).sum(-1), V - 1)
    return th1, th2, te1, te2, lq1, lq2, lp1, lp2, y1, y2


@pytest.mark.parametrize(
    "variant",
    [
        "paper: pg from next token + single-step",
        "pg from current token alone",
        "official code: pg from current token + single-step",
    ],
)
def test_two_step_gradient_against_enumeration(variant):
    """Two sampled tokens, V = 4: the exact sequence reverse KL
    sum_y1 q(y1) [log q/p (y1) + KL(q(.|y1) || p(.|y1))] differentiated by enumeration,
    against the loss's estimator (x2: the loss averages over the 2 tokens of each row).
    The paper's decomposition and the plain reward-to-go are unbiased; adding the single-step
    term to returns that already include r_t (as the official code does) is not."""
    rng = np.random.default_rng(6)
    V, N = 4, 40_000
    th1, th2, te1, te2, lq1, lq2, lp1, lp2, y1, y2 = two_step_case(rng, V, N)
    from_next = variant.startswith("paper")
    with_reg = "single-step" in variant
    loss = testing.build_loss(
        "minillm",
        returns_from="next" if from_next else "current",
        whiten=False,
        gamma=1.0,
        length_norm=False,
        reward_scaling=1.0,
        reg_weight=1.0 if with_reg else 0.0,
        lm_weight=0.0,
    )
    batch = {
        "input_ids": np.stack([np.zeros(N), y1], 1).astype(np.int32),
        "labels": np.full((N, 2), IGNORE_INDEX, np.int32),
        "mask": np.zeros((N, 2), np.float32),
        SAMPLE_TARGETS: np.stack([y1, y2], 1).astype(np.int32),
        SAMPLE_MASK: np.ones((N, 2), np.float32),
        SAMPLE_WEIGHTS: np.ones((N, 2), np.float32),
    }
    teacher = np.stack([np.broadcast_to(te1, (N, V)), te2[y1]], 1)
    idx = mx.array(y1.astype(np.int32))

    def f(a, b):
        logits = mx.stack([mx.broadcast_to(a, (N, V)), b[idx]], axis=1)
        return call(loss, logits, teacher, batch)[0]

    g1, g2 = mx.grad(f, argnums=(0, 1))(
        mx.array(th1.astype(np.float32)), mx.array(th2.astype(np.float32))
    )
    estimate = 2 * np.concatenate([np.array(g1), np.array(g2).ravel()])

    # exact gradient of the sequence reverse KL
    q1 = np.exp(lq1)
    kl2 = (np.exp(lq2) * (lq2 - lp2)).sum(-1)  # [V]: KL of step 2 after each y1
    exact1 = kl_grad(th1, lp1) + q1 * (kl2 - (q1 * kl2).sum())
    exact2 = q1[:, None] * kl_grad(th2, lp2)
    exact = np.concatenate([exact1, exact2.ravel()])

    # per-sample gradients of the estimator
    r1, r2 = (lp1 - lq1)[y1], (lp2 - lq2)[y1, y2]
    dlog1 = np.eye(V)[y1] - q1
    dlog2 = np.eye(V)[y2] - np.exp(lq2[y1])
    R1 = r2 if from_next else r1 + r2
    R2 = np.zeros(N) if from_next else r2
    per1 = -R1[:, None] * dlog1
    per2_rows = -R2[:, None] * dlog2
    if with_reg:
        per1 = per1 + kl_grad(th1, lp1)
        per2_rows = per2_rows + kl_grad(th2[y1], lp2[y1])
    per2 = np.zeros((N, V, V))
    per2[np.arange(N), y1] = per2_rows
    per_sample = np.concatenate([per1, per2.reshape(N, -1)], 1)

    if variant.startswith("official"):
        mean = per_sample.mean(0)
        np.testing.assert_allclose(estimate, mean, atol=2e-3 * np.abs(mean).max())
        se = per_sample.std(0, ddof=1) / math.sqrt(N) + 1e-7
        assert (np.abs(estimate - exact) / se).max() > 20  # biased: counts r_t twice
    else:
        assert_unbiased(estimate, per_sample, exact)


# ---------------------------------------------------------------- inside a real run


def minillm_spec(spec_for, teacher_dir, steps=8, **params) -> dict:
    return spec_for(
        [{"name": "minillm", "params": params}, {"name": "ce"}],
        steps=steps,
        teachers=[{"path": str(teacher_dir)}],
    )


def test_samples_layout_and_importance_weights(spec_for, teacher_dir):
    P, N, T, top_p, alpha = 6, 10, 0.8, 0.9, 0.3
    spec = minillm_spec(
        spec_for,
        teacher_dir,
        prompt_length=P,
        max_new_tokens=N,
        temperature=T,
        top_p=top_p,
        teacher_mix_alpha=alpha,
    )
    run = testing.build_run(spec)
    assert isinstance(run.losses[0].loss, kdcore.PreparesBatch)
    data = run.dataset.batch(0, 4)
    B, L = data["input_ids"].shape
    mx.random.seed(11)
    batch = {k: np.array(v) for k, v in testing.prepare_batch(run, data, 0).items()}
    mx.random.seed(11)
    again = testing.prepare_batch(run, data, 0)
    for key, value in batch.items():
        np.testing.assert_array_equal(value, np.array(again[key]), err_msg=key)

    length = max(L, P + N - 1)
    assert batch["input_ids"].shape == (2 * B, length)
    np.testing.assert_array_equal(batch["input_ids"][:B, :L], data["input_ids"])
    np.testing.assert_array_equal(batch["labels"][:B, :L], data["labels"])
    np.testing.assert_array_equal(batch["mask"][:B, :L], data["mask"])
    assert batch["mask"][B:].sum() == 0 and (batch["labels"][B:] == IGNORE_INDEX).all()
    assert batch[SAMPLE_MASK][:B].sum() == 0
    np.testing.assert_array_equal(batch["example_index"], np.r_[data["example_index"], [0] * B])
    samples = batch["input_ids"][B:]
    np.testing.assert_array_equal(samples[:, :P], data["input_ids"][:, :P])
    expected_mask = np.zeros((B, length))
    expected_mask[:, P - 1 : P + N - 1] = 1
    np.testing.assert_array_equal(batch[SAMPLE_MASK][B:], expected_mask)
    targets = batch[SAMPLE_TARGETS][B:]
    np.testing.assert_array_equal(targets[:, P - 1 : P + N - 2], samples[:, P : P + N - 1])

    # w = q_T(y) / ((1 - alpha) top_p(q_T)(y) + alpha top_p(p_T)(y)), from one batched forward
    ids = mx.array(samples)
    s = np.array(run.student(ids).logits, dtype=np.float64) / T
    t = np.array(run.teachers[0].model(ids).logits, dtype=np.float64) / T

    def top_p_probs(z):
        filtered = app.top_p_filter(mx.array(z.astype(np.float32)), top_p)
        return np.exp(np_log_softmax(np.array(filtered, dtype=np.float64)))

    q, behaviour = np.exp(np_log_softmax(s)), (1 - alpha) * top_p_probs(s) + alpha * top_p_probs(t)
    y = np.where(targets == IGNORE_INDEX, 0, targets)[..., None]
    sel = expected_mask > 0
    want = np.take_along_axis(q, y, -1)[sel] / np.take_along_axis(behaviour, y, -1)[sel]
    got = batch[SAMPLE_WEIGHTS][B:]
    np.testing.assert_allclose(got[sel], want[:, 0], rtol=2e-3)
    assert (got[~sel] == 1).all()


def test_lmbda_is_the_share_of_on_policy_batches(spec_for, teacher_dir):
    flags = {}
    for lmbda in (0.0, 0.5, 1.0):
        spec = minillm_spec(spec_for, teacher_dir, lmbda=lmbda, max_new_tokens=1)
        run = testing.build_run(spec)
        data = run.dataset.batch(0, 2)
        mx.random.seed(0)
        flags[lmbda] = [SAMPLE_MASK in testing.prepare_batch(run, data, s) for s in range(80)]
    assert not any(flags[0.0]) and all(flags[1.0])
    share = np.mean(flags[0.5])
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / 80), share
    # the same random state gives the same on/off sequence
    run = testing.build_run(minillm_spec(spec_for, teacher_dir, lmbda=0.5, max_new_tokens=1))
    mx.random.seed(0)
    again = [SAMPLE_MASK in testing.prepare_batch(run, data, s) for s in range(80)]
    assert again == flags[0.5]


def test_end_to_end_run_logs_metrics_and_reduces_reverse_kl(tmp_path, spec_for, teacher_dir):
    spec = minillm_spec(
        spec_for,
        teacher_dir,
        steps=24,
        lmbda=0.75,
        prompt_length=8,
        max_new_tokens=8,
        teacher_mix_alpha=0.2,
    )
    summary = app.distill(app.load_spec(spec), output=tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [r for r in records if "eval" not in r]
    assert len(train) == 24
    flags = [r["minillm/on_policy"] for r in train]
    assert set(flags) == {0.0, 1.0}
    on = [r for r in train if r["minillm/on_policy"] == 1.0]
    for r in train:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
    for r in on:
        assert r["minillm/sample_length"] == 8.0
        for key in ("reward", "return", "pg", "reg", "importance_weight"):
            assert f"minillm/{key}" in r
    # the single-step reverse KL on the student's own samples falls as it learns
    first = np.mean([r["minillm/reg"] for r in on[:3]])
    last = np.mean([r["minillm/reg"] for r in on[-3:]])
    assert last < 0.8 * first, (first, last)
    assert math.isfinite(summary["eval"]["kl_teacher_student"])
