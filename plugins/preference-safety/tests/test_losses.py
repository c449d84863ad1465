"""Each loss against a NumPy reference, and the conformance kit for every loss."""

from __future__ import annotations

import attrs
import mlx.core as mx
import numpy as np
import pytest

import kdcore
from kdcore import (
    IGNORE_INDEX,
    LossInputs,
    ModelOutput,
    StepContext,
    TeacherSignal,
    app,
    mixture,
    testing,
)
from kdcore.app import load_model

# ---------------------------------------------------------------- NumPy reference


def np_log_softmax(z, T=1.0):
    z = z.astype(np.float64) / T
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_row_ll(logits, labels, mask, normalize=True):
    lp = np_log_softmax(logits)
    safe = np.where(labels == IGNORE_INDEX, 0, labels)
    picked = np.take_along_axis(lp, safe[..., None], -1)[..., 0] * mask
    total = picked.sum(-1)
    return total / np.maximum(mask.sum(-1), 1) if normalize else total


def np_pairs(batch):
    """{pair: (chosen row, rejected row)} for pairs with one row of each."""
    out = {}
    for p in set(batch["pair_id"].tolist()) - {-1}:
        rows = np.flatnonzero(batch["pair_id"] == p)
        c = [r for r in rows if batch["pair_chosen"][r] == 1]
        r_ = [r for r in rows if batch["pair_chosen"][r] == 0]
        if len(c) == 1 and len(r_) == 1:
            out[p] = (c[0], r_[0])
    return out


def np_margins(logits, batch, normalize=True):
    ll = np_row_ll(logits, batch["labels"], batch["mask"], normalize)
    pairs = np_pairs(batch)
    return {p: ll[c] - ll[r] for p, (c, r) in pairs.items()}


# ---------------------------------------------------------------- inputs


def pair_batch(B, L, V, mask, rng, safety_share=0.5):
    """A check_loss-compatible batch: rows paired at random, an odd row left unpaired."""
    batch = testing.default_batch(B, L, V, mask, rng)
    order = rng.permutation(B)
    pair_id = np.full(B, -1, np.int32)
    chosen = np.ones(B, np.float32)
    safety = np.zeros(B, np.float32)
    for p in range(B // 2):
        c, r = order[2 * p], order[2 * p + 1]
        pair_id[[c, r]] = p
        chosen[r] = 0.0
        flag = 1.0 if p == 0 else float(rng.random() < safety_share)
        safety[[c, r]] = flag
    batch.update(pair_id=pair_id, pair_chosen=chosen, safety=safety)
    return batch


def make_case(seed=0, B=6, L=7, V=11):
    rng = np.random.default_rng(seed)
    mask = (rng.random((B, L)) < 0.7).astype(np.float32)
    mask[:, 0] = 1.0
    batch = pair_batch(B, L, V, mask, rng)
    student = rng.standard_normal((B, L, V)).astype(np.float32) * 2
    teacher = rng.standard_normal((B, L, V)).astype(np.float32) * 2
    return student, teacher, batch


def call(name, student, teacher, batch, setup=None, **params):
    loss = testing.build_loss(name, setup, **params)
    config = app.make_config("loss", name, **params)
    signal = (
        teacher
        if isinstance(teacher, TeacherSignal)
        else TeacherSignal(vocab_size=teacher.shape[-1], logits=mx.array(teacher))
    )
    inputs = LossInputs(
        student=ModelOutput(logits=mx.array(student)),
        teacher=signal,
        batch={k: mx.array(v) for k, v in batch.items()},
        params=config,
    )
    value, metrics = loss(inputs)
    return value.item(), {k: v.item() for k, v in metrics.items()}


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("T,rw", [(1.0, 1.0), (2.0, 0.5)])
def test_preference_kd_matches_numpy(T, rw):
    s, t, batch = make_case(1)
    value, metrics = call("preference_kd", s, t, batch, temperature=T, rejected_weight=rw)
    lt, ls = np_log_softmax(t, T), np_log_softmax(s, T)
    kl = (np.exp(lt) * (lt - ls)).sum(-1) * T * T
    w = batch["mask"] * np.where(batch["pair_chosen"] == 1, 1.0, rw)[:, None]
    assert value == pytest.approx((kl * w).sum() / w.sum(), rel=1e-4)
    chosen = batch["mask"] * (batch["pair_chosen"] == 1)[:, None]
    assert metrics["kl_chosen"] == pytest.approx((kl * chosen).sum() / chosen.sum(), rel=1e-4)


def test_ranking_preservation_matches_numpy():
    s, t, batch = make_case(2)
    value, metrics = call("ranking_preservation", s, t, batch)
    ms, mt = np_margins(s, batch), np_margins(t, batch)
    diffs = [(ms[p] - mt[p]) ** 2 for p in ms]
    assert len(diffs) == 3
    assert value == pytest.approx(np.mean(diffs), rel=1e-4)
    assert metrics["agreement"] == pytest.approx(
        np.mean([np.sign(ms[p]) == np.sign(mt[p]) for p in ms])
    )
    raw, _ = call("ranking_preservation", s, t, batch, normalize=False)
    ms, mt = np_margins(s, batch, False), np_margins(t, batch, False)
    assert raw == pytest.approx(np.mean([(ms[p] - mt[p]) ** 2 for p in ms]), rel=1e-4)


@pytest.mark.parametrize("beta", [0.5, 3.0])
def test_dpkd_matches_numpy(beta):
    s, t, batch = make_case(3)
    value, _ = call("dpkd", s, t, batch, beta=beta)
    ms, mt = np_margins(s, batch), np_margins(t, batch)
    ref = np.mean([np.log1p(np.exp(-beta * (ms[p] - mt[p]))) for p in ms])
    assert value == pytest.approx(ref, rel=1e-4)
    same, _ = call("dpkd", s, s, batch, beta=beta)
    assert same == pytest.approx(np.log(2.0), rel=1e-5)


@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_safety_alignment_matches_numpy(margin):
    s, t, batch = make_case(4)
    value, metrics = call("safety_alignment", s, t, batch, margin=margin)
    ms, mt = np_margins(s, batch), np_margins(t, batch)
    pairs = np_pairs(batch)
    safe = [p for p, (c, _) in pairs.items() if batch["safety"][c] == 1]
    assert 0 < len(safe) < len(pairs)  # the case mixes safety and other pairs
    ref = np.mean([max(mt[p] + margin - ms[p], 0.0) for p in safe])
    assert value == pytest.approx(ref, rel=1e-4, abs=1e-7)
    assert metrics["safety_pairs"] == len(safe)


def test_safety_alignment_is_zero_without_safety_pairs():
    s, t, batch = make_case(5)
    batch["safety"][:] = 0
    assert call("safety_alignment", s, t, batch)[0] == 0.0


def test_dpo_matches_numpy_with_the_teacher_as_reference():
    s, ref, batch = make_case(6)
    beta = 0.2
    value, metrics = call("dpo", s, ref, batch, beta=beta)
    pi = np_row_ll(s, batch["labels"], batch["mask"], normalize=False)
    rl = np_row_ll(ref, batch["labels"], batch["mask"], normalize=False)
    z = {p: beta * ((pi[c] - rl[c]) - (pi[r] - rl[r])) for p, (c, r) in np_pairs(batch).items()}
    assert value == pytest.approx(np.mean([np.log1p(np.exp(-v)) for v in z.values()]), rel=1e-4)
    assert metrics["reward_accuracy"] == pytest.approx(np.mean([v > 0 for v in z.values()]))


def test_dpo_chosen_nll_adds_the_chosen_per_token_nll():
    s, ref, batch = make_case(13)
    plain, _ = call("dpo", s, ref, batch, beta=0.2)
    value, metrics = call("dpo", s, ref, batch, beta=0.2, chosen_nll=0.5)
    ll = np_row_ll(s, batch["labels"], batch["mask"], normalize=True)
    nll = np.mean([-ll[c] for c, _ in np_pairs(batch).values()])
    assert metrics["chosen_nll"] == pytest.approx(nll, rel=1e-4)
    assert value == pytest.approx(plain + 0.5 * nll, rel=1e-4)


def test_dpo_reference_from_a_path_equals_that_model_as_teacher(random_model_dir):
    model, _, _ = load_model(random_model_dir)
    _, _, batch = make_case(7, V=256)
    ref_logits = np.array(model(mx.array(batch["input_ids"])).logits)
    s = np.random.default_rng(0).standard_normal(ref_logits.shape).astype(np.float32)
    setup = kdcore.Setup(base_dir=random_model_dir.parent)
    by_path, _ = call("dpo", s, ref_logits * 0 + 1.0, batch, setup, reference="model")
    as_teacher, _ = call("dpo", s, ref_logits, batch)
    assert by_path == pytest.approx(as_teacher, rel=1e-5)
    # prepare_batch computes the reference outside autodiff; the value is unchanged
    dpo = app.build("loss", "dpo", setup, reference="model")
    assert isinstance(dpo, kdcore.PreparesBatch)
    context = StepContext(step=0, total_steps=1, seed=0, student=model)
    prepared = dpo.prepare_batch({k: mx.array(v) for k, v in batch.items()}, context)
    assert prepared["reference_ll"].shape == (batch["input_ids"].shape[0],)
    value, _ = dpo(
        LossInputs(
            student=ModelOutput(logits=mx.array(s)), teacher=None, batch=prepared, params=dpo.config
        )
    )
    assert value.item() == pytest.approx(as_teacher, rel=1e-5)


def test_dpo_without_reference_or_teacher_is_a_spec_error():
    spec = app.load_spec(
        {"data": {"name": "text", "params": {"path": "x"}}, "losses": [{"name": "dpo"}]}
    )
    with pytest.raises(kdcore.SpecError, match="reference"):
        testing.build_loss("dpo", kdcore.Setup(spec=spec))


def test_several_teachers_combine_margins_with_the_aggregator_weights():
    s, t1, batch = make_case(8)
    t2 = np.random.default_rng(9).standard_normal(t1.shape).astype(np.float32) * 2
    R = t1.shape[0]
    w = np.random.default_rng(10).dirichlet([1.0, 1.0], size=R).astype(np.float32)
    signal = mixture(
        [TeacherSignal(vocab_size=t1.shape[-1], logits=mx.array(t)) for t in (t1, t2)], mx.array(w)
    )
    value, metrics = call("ranking_preservation", s, signal, batch)
    ms, m1, m2 = (np_margins(x, batch) for x in (s, t1, t2))
    pairs = np_pairs(batch)
    mt = {p: ((w[c] + w[r]) / 2 * np.array([m1[p], m2[p]])).sum() for p, (c, r) in pairs.items()}
    assert value == pytest.approx(np.mean([(ms[p] - mt[p]) ** 2 for p in ms]), rel=1e-4)
    assert metrics["teacher_margin"] == pytest.approx(np.mean(list(mt.values())), rel=1e-4)
    # per-token weights [R, L, K] reduce to the mean over each row's response tokens
    wt = np.repeat(w[:, None, :], t1.shape[1], axis=1)
    signal = attrs.evolve(signal, weights=mx.array(wt))
    assert call("ranking_preservation", s, signal, batch)[0] == pytest.approx(value, rel=1e-5)


def test_a_batch_without_pairs_is_an_error_naming_the_dataset():
    s, t, batch = make_case(11)
    del batch["pair_id"]
    with pytest.raises(ValueError, match="'pairs' dataset"):
        call("dpkd", s, t, batch)


def test_margin_losses_refuse_a_topk_cache():
    s, t, batch = make_case(12)
    ids = np.argsort(-t, -1)[..., :3].astype(np.int32)
    sparse = TeacherSignal(
        vocab_size=t.shape[-1],
        topk_ids=mx.array(ids),
        topk_logprobs=mx.array(np.full(ids.shape, -1.0, np.float32)),
        tail_logmass=mx.array(np.full(ids.shape[:2], -1.0, np.float32)),
    )
    with pytest.raises(ValueError, match="top-k cache"):
        call("ranking_preservation", s, sparse, batch)


# ---------------------------------------------------------------- conformance


@pytest.mark.parametrize(
    "name,params",
    [
        ("preference_kd", {"temperature": 2.0}),
        ("ranking_preservation", {}),
        ("dpkd", {"beta": 2.0}),
        ("safety_alignment", {}),
        ("dpo", {"beta": 0.5}),
        ("dpo", {"beta": 0.5, "normalize": True, "chosen_nll": 1.0}),
    ],
)
def test_conformance(name, params):
    testing.check_loss(name, extra_batch=pair_batch, **params)


def test_conformance_dpo_with_a_reference_model(random_model_dir):
    testing.check_loss(
        "dpo",
        extra_batch=pair_batch,
        max_examples=5,
        setup=kdcore.Setup(base_dir=random_model_dir.parent),
        reference="model",
    )
