"""Properties of the AMTML components, checked against plain NumPy references."""

from __future__ import annotations

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kd_amtml.aggregator import REGULARIZER_KEY
from kd_amtml.losses import align_heads, linear_cka, uniform_pairs

import kdcore
from kdcore import ModelOutput, Setup, app, mixture, testing
from kdcore.app import TransformerConfig

RNG = np.random.default_rng(7)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_soft_target_loss(student, teachers, weights, mask, T):
    """T^2 * masked mean over tokens of KL(sum_k w_k softmax(z_k/T) || softmax(s/T))."""
    p = sum(w[:, None, None] * np.exp(np_log_softmax(z / T)) for w, z in zip(weights.T, teachers))
    kl = (p * (np.log(p) - np_log_softmax(student / T))).sum(-1)
    return T * T * (kl * mask).sum() / mask.sum()


def signal(logits, hidden=None, attentions=None):
    return kdcore.TeacherSignal(
        vocab_size=logits.shape[-1],
        logits=mx.array(logits),
        hidden_states=hidden,
        attentions=attentions,
    )


def inputs_for(student_logits, teacher, mask, hidden=None, params=None, extras=None):
    batch = {"mask": mx.array(mask), "labels": mx.zeros(mask.shape, dtype=mx.int32)}
    return kdcore.LossInputs(
        student=ModelOutput(logits=mx.array(student_logits), hidden_states=hidden),
        teacher=teacher,
        batch=batch,
        params=params,
        extras=extras or {},
    )


def random_case(B=3, L=5, V=11, K=3):
    student = RNG.standard_normal((B, L, V)).astype(np.float32) * 3
    teachers = [RNG.standard_normal((B, L, V)).astype(np.float32) * 3 for _ in range(K)]
    mask = (RNG.random((B, L)) > 0.3).astype(np.float32)
    mask[0, 0] = 1.0
    return student, teachers, mask


def hidden_states(B, L, D, layers=3, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(
        mx.array(rng.standard_normal((B, L, D)).astype(np.float32)) for _ in range(layers + 1)
    )


# ---------------------------------------------------------------- amtml loss


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_one_teacher_amtml_is_hinton(T):
    """With one teacher the amtml aggregator passes the signal through and the loss is
    Hinton's T^2 KL(p_T || q_T) (NumPy reference; and the hinton plugin when installed)."""
    student, (teacher,), mask = random_case(K=1)
    aggregate = app.build("teacher_aggregator", "amtml", Setup(num_teachers=1), input_dim=8)
    base = inputs_for(student, None, mask, hidden=hidden_states(3, 5, 8))
    merged = aggregate([signal(teacher)], base)
    assert merged.members is None and merged.weights is None
    loss = testing.build_loss("amtml", temperature=T, l2=0.0)
    value, _ = loss(
        inputs_for(
            student, merged, mask, params=app.make_config("loss", "amtml", temperature=T, l2=0.0)
        )
    )
    expected = np_soft_target_loss(student, [teacher], np.ones((3, 1)), mask, T)
    assert value.item() == pytest.approx(expected, rel=1e-4)
    if "hinton" in app.get_registry().names("loss"):
        hinton = testing.build_loss("hinton", temperature=T)
        h_value, _ = hinton(
            inputs_for(
                student, merged, mask, params=app.make_config("loss", "hinton", temperature=T)
            )
        )
        assert value.item() == pytest.approx(h_value.item(), rel=1e-4)


def test_amtml_loss_matches_reference_for_a_weighted_mixture():
    student, teachers, mask = random_case()
    weights = RNG.dirichlet(np.ones(3), size=3).astype(np.float32)
    merged = mixture([signal(z) for z in teachers], mx.array(weights))
    params = app.make_config("loss", "amtml", temperature=2.0)
    value, metrics = testing.build_loss("amtml", temperature=2.0)(
        inputs_for(student, merged, mask, params=params)
    )
    expected = np_soft_target_loss(student, teachers, weights, mask, 2.0)
    assert value.item() == pytest.approx(expected, rel=1e-4)
    entropy = -(weights * np.log(weights)).sum(-1).mean()
    assert metrics["weight_entropy"].item() == pytest.approx(entropy, rel=1e-4)


def test_amtml_loss_adds_the_aggregator_regulariser():
    student, teachers, mask = random_case()
    aggregate = app.build("teacher_aggregator", "amtml", Setup(num_teachers=3), input_dim=8)
    base = inputs_for(student, None, mask, hidden=hidden_states(3, 5, 8))
    merged = aggregate([signal(z) for z in teachers], base)
    reg = base.extras[REGULARIZER_KEY].item()
    manual = float((np.array(aggregate.theta) ** 2).sum() + (np.array(aggregate.w) ** 2).sum())
    assert reg == pytest.approx(manual, rel=1e-5) and reg > 0
    loss = testing.build_loss("amtml", l2=0.5)
    with_reg, m = loss(
        kdcore.LossInputs(
            student=base.student,
            teacher=merged,
            batch=base.batch,
            extras=base.extras,
            params=app.make_config("loss", "amtml", l2=0.5),
        )
    )
    without, _ = loss(
        kdcore.LossInputs(
            student=base.student,
            teacher=merged,
            batch=base.batch,
            params=app.make_config("loss", "amtml", l2=0.5),
        )
    )
    assert with_reg.item() == pytest.approx(without.item() + 0.5 * reg, rel=1e-5)
    assert m["regularizer"].item() == pytest.approx(reg, rel=1e-5)


# ---------------------------------------------------------------- aggregator


@pytest.mark.parametrize("scorer", ["latent", "attention"])
def test_weights_are_a_distribution_per_instance(scorer):
    student, teachers, mask = random_case(B=6)
    aggregate = app.build(
        "teacher_aggregator",
        "amtml",
        Setup(num_teachers=3),
        scorer=scorer,
        heads=2 if scorer == "attention" else 1,
        input_dim=8,
        init_scale=3.0,
    )
    out = aggregate(
        [signal(z) for z in teachers],
        inputs_for(student, None, mask, hidden=hidden_states(6, 5, 8)),
    )
    w = np.array(out.weights)
    assert w.shape == (6, 3)
    assert np.all(w > 0) and np.allclose(w.sum(-1), 1.0, atol=1e-6)
    # Instance-dependent: different inputs get different weights.
    assert np.abs(w - w.mean(0)).max() > 1e-3


@pytest.mark.parametrize("scorer", ["latent", "attention"])
def test_equal_latents_give_equal_weights(scorer):
    student, teachers, mask = random_case(B=4)
    aggregate = app.build(
        "teacher_aggregator", "amtml", Setup(num_teachers=3), scorer=scorer, input_dim=8
    )
    aggregate.theta = mx.broadcast_to(aggregate.theta[:1], aggregate.theta.shape)
    out = aggregate(
        [signal(z) for z in teachers],
        inputs_for(student, None, mask, hidden=hidden_states(4, 5, 8)),
    )
    assert np.allclose(np.array(out.weights), 1.0 / 3.0, atol=1e-6)


def test_latent_scorer_matches_the_official_formula():
    """score_k = (e * theta_k) . W with e the encoded, RMS-normalised, mean-pooled state."""
    student, teachers, mask = random_case(B=4)
    aggregate = app.build(
        "teacher_aggregator",
        "amtml",
        Setup(num_teachers=3),
        input_dim=8,
        layer=2,
        standardize=False,
    )
    hidden = hidden_states(4, 5, 8)
    out = aggregate([signal(z) for z in teachers], inputs_for(student, None, mask, hidden=hidden))
    h = np.array(hidden[2])
    pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    x = pooled / np.sqrt((pooled**2).mean(-1, keepdims=True) + 1e-6)
    e = x @ np.array(aggregate.encoder.weight).T + np.array(aggregate.encoder.bias)
    score = (e[:, None, :] * np.array(aggregate.theta)[None]) @ np.array(aggregate.w)
    mu = np.exp(score - score.max(-1, keepdims=True))
    mu /= mu.sum(-1, keepdims=True)
    assert np.allclose(np.array(out.weights), mu, atol=1e-5)


def test_aggregator_reads_its_width_from_the_run_and_declares_requirements():
    config = TransformerConfig(vocab_size=256, dim=16, layers=2, heads=2)
    agg = app.build(
        "teacher_aggregator",
        "amtml",
        Setup(num_teachers=2, student_config=config, teacher_configs=[config] * 2),
    )
    assert agg.encoder.weight.shape == (32, 16)
    assert agg.requires == frozenset({"hidden_states"})
    assert isinstance(agg, kdcore.HasRequirements)  # how the engine reads it
    with pytest.raises(ValueError, match="input_dim"):
        app.build("teacher_aggregator", "amtml", Setup(num_teachers=2))


def test_aggregator_gradients_reach_its_parameters_only_when_it_should():
    student, teachers, mask = random_case(B=4)
    hidden = hidden_states(4, 5, 8)
    signals = [signal(z) for z in teachers]
    aggregate = app.build("teacher_aggregator", "amtml", Setup(num_teachers=3), input_dim=8)
    loss = testing.build_loss("amtml")
    params = app.make_config("loss", "amtml")

    def objective(module, h):
        base = inputs_for(student, None, mask, hidden=(*hidden[:-1], h))
        merged = module(signals, base)
        value, _ = loss(
            kdcore.LossInputs(
                student=base.student,
                teacher=merged,
                batch=base.batch,
                extras=base.extras,
                params=params,
            )
        )
        return value

    grads = nn.value_and_grad(aggregate, lambda m: objective(m, hidden[-1]))(aggregate)[1]
    assert float(mx.abs(grads["theta"]).sum()) > 0 and float(mx.abs(grads["w"]).sum()) > 0
    # detach = True (default): no gradient flows back into the student's hidden states.
    g_hidden = mx.grad(lambda h: objective(aggregate, h))(hidden[-1])
    assert float(mx.abs(g_hidden).sum()) == 0.0


# ---------------------------------------------------------------- hints


def test_hint_is_zero_when_projected_features_match():
    B, L, Ds, Dt = 2, 4, 6, 10
    mask = np.ones((B, L), np.float32)
    student_h = hidden_states(B, L, Ds, layers=2, seed=1)
    loss = testing.build_loss(
        "hint",
        student_dim=Ds,
        teacher_dims=[Dt],
        student_layers=[2],
        teacher_layers=[1],
        normalize=False,
    )
    proj = loss.loss.proj[0]
    teacher_h = (mx.zeros((B, L, Dt)), proj(student_h[2]), mx.zeros((B, L, Dt)))
    teacher = signal(RNG.standard_normal((B, L, 5)).astype(np.float32), hidden=teacher_h)
    value, _ = loss(inputs_for(np.zeros((B, L, 5), np.float32), teacher, mask, hidden=student_h))
    assert abs(value.item()) < 1e-10
    # ... and not zero when they differ
    teacher_h = (teacher_h[0], teacher_h[1] + 0.5, teacher_h[2])
    teacher = signal(RNG.standard_normal((B, L, 5)).astype(np.float32), hidden=teacher_h)
    value, _ = loss(inputs_for(np.zeros((B, L, 5), np.float32), teacher, mask, hidden=student_h))
    assert value.item() == pytest.approx(0.25 * Dt, rel=1e-5)


def test_normalised_hint_compares_unit_vectors():
    B, L, D = 2, 3, 4
    mask = np.ones((B, L), np.float32)
    student_h = hidden_states(B, L, D, layers=1, seed=2)
    loss = testing.build_loss(
        "hint", student_dim=D, teacher_dims=[D], student_layers=[1], teacher_layers=[1]
    )
    loss.loss.proj[0].weight = mx.eye(D)
    # The teacher's features are the student's, rescaled per token: zero after normalising.
    scale = mx.array(RNG.uniform(0.5, 3.0, size=(B, L, 1)).astype(np.float32))
    teacher = signal(np.zeros((B, L, 5), np.float32), hidden=(student_h[0], student_h[1] * scale))
    value, _ = loss(inputs_for(np.zeros((B, L, 5), np.float32), teacher, mask, hidden=student_h))
    assert abs(value.item()) < 1e-8


def _three_teacher_hint_case(**params):
    B, L, Ds = 2, 4, 6
    dims = [4, 5, 7]
    mask = np.ones((B, L), np.float32)
    student_h = hidden_states(B, L, Ds, layers=3, seed=3)
    members = [
        signal(
            RNG.standard_normal((B, L, 5)).astype(np.float32),
            hidden=hidden_states(B, L, d, layers=2, seed=10 + j),
        )
        for j, d in enumerate(dims)
    ]
    loss = app.build("loss", "hint", student_dim=Ds, teacher_dims=dims, **params)
    return loss, student_h, members, mask


def _term(proj, s, t):
    s, t = np.array(s), np.array(t)
    s = s / np.sqrt((s**2).sum(-1, keepdims=True))
    t = t / np.sqrt((t**2).sum(-1, keepdims=True))
    return (((s @ np.array(proj.weight).T) - t) ** 2).sum(-1)


def test_multi_group_hint_teacher_j_supervises_group_j():
    loss, student_h, members, mask = _three_teacher_hint_case(
        strategy="groups", student_layers=[1, 2, 3]
    )
    merged = mixture(members, mx.full((2, 3), 1 / 3))
    value, metrics = loss(
        inputs_for(np.zeros((2, 4, 5), np.float32), merged, mask, hidden=student_h)
    )
    terms = [
        _term(loss.proj[j], student_h[j + 1], members[j].hidden_states[-1]).mean() for j in range(3)
    ]
    assert value.item() == pytest.approx(np.mean(terms), rel=1e-5)
    assert metrics["teacher2"].item() == pytest.approx(terms[2], rel=1e-5)


def test_instance_weighted_hint_follows_the_weights():
    loss, student_h, members, mask = _three_teacher_hint_case(
        strategy="groups", student_layers=[1, 2, 3], instance_weighted=True
    )
    # Instance 0 belongs to teacher 1, instance 1 to teacher 2.
    weights = mx.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    value, _ = loss(
        inputs_for(
            np.zeros((2, 4, 5), np.float32), mixture(members, weights), mask, hidden=student_h
        )
    )
    t1 = _term(loss.proj[1], student_h[2], members[1].hidden_states[-1])[0].sum()
    t2 = _term(loss.proj[2], student_h[3], members[2].hidden_states[-1])[1].sum()
    assert value.item() == pytest.approx((t1 + t2) / 8, rel=1e-5)


def test_all_teachers_uniform_map_and_groups_need_the_run_layout():
    config = TransformerConfig(vocab_size=256, dim=8, layers=3, heads=2)
    teacher_configs = [TransformerConfig(vocab_size=256, dim=d, layers=2, heads=2) for d in (4, 8)]
    setup = Setup(num_teachers=2, student_config=config, teacher_configs=teacher_configs)
    hint = app.build("loss", "hint", setup, strategy="all")
    assert [p.weight.shape for p in hint.proj] == [(4, 8), (8, 8)] * 3
    groups = app.build("loss", "hint", setup, strategy="groups")
    assert groups.group_layers == (2, 3)  # the last block of each of two groups
    assert uniform_pairs(3, 2) == [(1, 1), (2, 1), (3, 2)]
    assert uniform_pairs(2, 4) == [(1, 2), (2, 4)]


def test_hint_projections_are_trainable_parameters():
    loss, student_h, members, mask = _three_teacher_hint_case(
        strategy="all", student_layers=[1, 2, 3], teacher_layers=[1, 1, 2]
    )
    merged = mixture(members, mx.full((2, 3), 1 / 3))

    def objective(module):
        return module(inputs_for(np.zeros((2, 4, 5), np.float32), merged, mask, hidden=student_h))[
            0
        ]

    _, grads = nn.value_and_grad(loss, objective)(loss)
    from mlx.utils import tree_flatten

    flat = dict(tree_flatten(grads))
    assert len(flat) == 9  # 3 student blocks x 3 teachers
    assert all(float(mx.abs(g).sum()) > 0 for g in flat.values())


# ---------------------------------------------------------------- attention transfer


def test_align_heads_groups_and_repeats():
    t = mx.array(RNG.random((1, 4, 3, 3)).astype(np.float32))
    grouped = np.array(align_heads(t, 2))
    assert np.allclose(grouped[0, 0], np.array(t)[0, :2].mean(0))
    assert np.allclose(grouped[0, 1], np.array(t)[0, 2:].mean(0))
    repeated = np.array(align_heads(t[:, :2], 4))
    assert np.allclose(repeated[0, 1], np.array(t)[0, 0]) and np.allclose(
        repeated[0, 2], np.array(t)[0, 1]
    )
    assert align_heads(t, 3).shape == (1, 3, 3, 3)


def test_attention_transfer_matches_reference_with_head_grouping():
    B, L = 2, 4
    causal = np.triu(np.full((L, L), -1e9), 1)

    def maps(heads, seed):
        r = np.random.default_rng(seed)
        z = r.standard_normal((B, heads, L, L)) + causal
        p = np.exp(z - z.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)).astype(np.float32)

    s, t = maps(2, 1), maps(4, 2)
    mask = np.ones((B, L), np.float32)
    teacher = signal(np.zeros((B, L, 3), np.float32), attentions=(mx.array(t),))
    inputs = kdcore.LossInputs(
        student=ModelOutput(logits=mx.zeros((B, L, 3)), attentions=(mx.array(s),)),
        teacher=teacher,
        batch={"mask": mx.array(mask)},
    )
    value, _ = testing.build_loss("attention_transfer")(inputs)
    tg = t.reshape(B, 2, 2, L, L).mean(2)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(tg > 0, tg * (np.log(tg) - np.log(s)), 0.0).sum(-1)
    assert value.item() == pytest.approx(kl.mean(), rel=1e-4)


# ---------------------------------------------------------------- CKA


def np_cka(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_linear_cka_matches_reference_and_its_invariances():
    x = RNG.standard_normal((40, 6)).astype(np.float32)
    y = (x @ RNG.standard_normal((6, 9)) + 0.5 * RNG.standard_normal((40, 9))).astype(np.float32)
    ones = mx.ones((40,))
    value = linear_cka(mx.array(x), mx.array(y), ones).item()
    assert value == pytest.approx(np_cka(x, y), rel=1e-4)
    q, _ = np.linalg.qr(RNG.standard_normal((9, 9)))
    rotated = (3.0 * y @ q + 7.0).astype(np.float32)  # orthogonal map, scale and offset
    assert linear_cka(mx.array(x), mx.array(rotated), ones).item() == pytest.approx(value, rel=1e-4)
    # Rows of weight 0 do not count.
    w = np.ones(40, np.float32)
    w[:10] = 0
    masked = linear_cka(mx.array(x), mx.array(y), mx.array(w)).item()
    assert masked == pytest.approx(np_cka(x[10:], y[10:]), rel=1e-4)


@pytest.mark.parametrize("scale", [1e-6, 1e-4, 1e-3, 1e-2, 1.0, 1e2, 1e4])
def test_linear_cka_matches_kornblith_at_every_scale(scale):
    """Once biased towards 1 at small scales (+1e-6 in the numerator, 0.01 * rows * D in the
    normaliser): 0.77 for 0.58 at std 0.01, and exactly 1.0 without a gradient at 1e-3."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((64, 8))
    y = x @ rng.standard_normal((8, 12)) + 2.0 * rng.standard_normal((64, 12))
    reference = np_cka(x, y)
    assert 0.2 < reference < 0.9
    xs, ys = mx.array((scale * x).astype(np.float32)), mx.array((scale * y).astype(np.float32))
    ones = mx.ones((64,))
    assert linear_cka(xs, ys, ones).item() == pytest.approx(reference, rel=1e-4)
    # A scale-free function has a gradient that scales as 1/scale: the same direction and a
    # finite, non-zero size at every scale.
    grad = np.array(mx.grad(lambda a: linear_cka(a, ys, ones))(xs))
    unit = np.array(mx.grad(lambda a: linear_cka(a, ys, ones))(mx.array(x.astype(np.float32))))
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    np.testing.assert_allclose(grad * scale, unit, rtol=1e-3, atol=1e-4 * np.abs(unit).max())


def test_linear_cka_of_constant_features():
    """Constant features (up to rounding) have no similarity to copy: two constant sides are
    identical (1, so the loss stays zero at identity), one constant side gives 0."""
    rng = np.random.default_rng(12)
    ones = mx.ones((32,))
    varied = mx.array(rng.standard_normal((32, 6)).astype(np.float32))
    offset = rng.standard_normal((1, 6)).astype(np.float32) * 100
    flat = mx.array(np.repeat(offset, 32, axis=0))
    assert linear_cka(flat, flat * 3.0 + 1.0, ones).item() == 1.0
    assert linear_cka(varied, flat, ones).item() == 0.0
    assert linear_cka(mx.zeros((32, 6)), varied, ones).item() == 0.0
    grad = np.array(mx.grad(lambda a: linear_cka(a, flat, ones))(varied))
    assert np.all(np.isfinite(grad))
    # a single weighted row is constant too
    w = np.zeros(32, np.float32)
    w[3] = 1.0
    assert linear_cka(varied, varied, mx.array(w)).item() == 1.0


def test_cka_loss_between_different_widths():
    B, L = 3, 8
    s_h = hidden_states(B, L, 5, layers=2, seed=4)
    q, _ = np.linalg.qr(RNG.standard_normal((12, 12)))
    rows = mx.array(q[:5].astype(np.float32))  # orthonormal rows: inner products kept
    t_h = tuple(2.0 * h @ rows + 1.0 for h in s_h)
    mask = np.ones((B, L), np.float32)
    teacher = signal(np.zeros((B, L, 3), np.float32), hidden=t_h)
    loss = testing.build_loss("cka")
    value, _ = loss(inputs_for(np.zeros((B, L, 3), np.float32), teacher, mask, hidden=s_h))
    assert abs(value.item()) < 1e-4  # an isometry, scale and offset keep CKA at 1
    other = signal(np.zeros((B, L, 3), np.float32), hidden=hidden_states(B, L, 12, 2, seed=9))
    value, _ = loss(inputs_for(np.zeros((B, L, 3), np.float32), other, mask, hidden=s_h))
    assert value.item() > 0.2


# ---------------------------------------------------------------- mixture dataset


def test_mixture_dataset_tags_domains_and_balances(domains):
    data = app.build(
        "dataset",
        "mixture",
        Setup(seed=0),
        paths=[str(domains["shakespeare"]), str(domains["gsm8k"])],
        names=["play", "math"],
        seq_len=32,
        val_fraction=0.2,
    )
    assert data.domain_names == ["play", "math"]
    counts = data.domain_counts("train")
    assert counts["play"] == counts["math"] > 100
    batch = data.batch(0, 16)
    assert batch["domain"].shape == (16,) and set(np.unique(batch["domain"])) <= {0, 1}
    assert len(set(np.unique(batch["domain"]))) == 2  # shuffled across domains
    # Each example really comes from its domain's file.
    text = data.tokenizer.decode(batch["input_ids"][np.argmax(batch["domain"] == 1)])
    assert text in domains["gsm8k"].read_text()
    assert data.inspect()["domains"]["val"] == data.domain_counts("val")
    # The val split alternates domains, so the first eval batch already sees both.
    first = next(data.batches(4, "val"))
    assert first["domain"].tolist() == [0, 1, 0, 1]


def test_gate_ce_adds_the_mixture_nll_and_trains_only_the_aggregator():
    student, teachers, mask = random_case()
    labels = RNG.integers(0, 11, size=mask.shape).astype(np.int32)
    labels = np.where(mask > 0, labels, -100).astype(np.int32)
    hidden = hidden_states(3, 5, 8)
    aggregate = app.build(
        "teacher_aggregator", "amtml", Setup(num_teachers=3), input_dim=8, init_scale=2.0
    )
    params = app.make_config("loss", "amtml", gate_ce=0.5, l2=0.0)
    loss = testing.build_loss("amtml", gate_ce=0.5, l2=0.0)

    def run(module, s_logits):
        base = kdcore.LossInputs(
            student=ModelOutput(logits=s_logits, hidden_states=hidden),
            teacher=None,
            batch={"mask": mx.array(mask), "labels": mx.array(labels)},
        )
        merged = module([signal(z) for z in teachers], base)
        value, metrics = loss(
            kdcore.LossInputs(student=base.student, teacher=merged, batch=base.batch, params=params)
        )
        return value, metrics, merged

    value, metrics, merged = run(aggregate, mx.array(student))
    w = np.array(merged.weights)
    p = sum(w[:, k, None, None] * np.exp(np_log_softmax(teachers[k])) for k in range(3))
    picked = np.take_along_axis(p, np.maximum(labels, 0)[..., None], -1)[..., 0]
    nll = (-np.log(picked) * mask).sum() / mask.sum()
    assert metrics["gate_nll"].item() == pytest.approx(nll, rel=1e-4)
    kd = np_soft_target_loss(student, teachers, w, mask, 1.0)
    assert value.item() == pytest.approx(kd + 0.5 * nll, rel=1e-4)
    # The extra term moves the aggregator, not the student.
    g_student_with = mx.grad(lambda s: run(aggregate, s)[0])(mx.array(student))
    plain = testing.build_loss("amtml", l2=0.0)
    plain_params = app.make_config("loss", "amtml", l2=0.0)

    def run_plain(s_logits):
        base = kdcore.LossInputs(
            student=ModelOutput(logits=s_logits, hidden_states=hidden),
            teacher=None,
            batch={"mask": mx.array(mask), "labels": mx.array(labels)},
        )
        merged = aggregate([signal(z) for z in teachers], base)
        return plain(
            kdcore.LossInputs(
                student=base.student, teacher=merged, batch=base.batch, params=plain_params
            )
        )[0]

    g_student_plain = mx.grad(run_plain)(mx.array(student))
    assert np.allclose(np.array(g_student_with), np.array(g_student_plain), atol=1e-6)
    grads = nn.value_and_grad(aggregate, lambda m: run(m, mx.array(student))[0])(aggregate)[1]
    assert float(mx.abs(grads["theta"]).sum()) > 0


def test_running_standardisation_of_the_instance_input():
    """x -> (x - m) / sqrt(v + 1e-5) with bias-corrected running moments; updated in
    training mode only, and not while the aggregator is frozen."""
    student, teachers, mask = random_case(B=5)
    mask[:] = 1.0
    signals = [signal(z) for z in teachers]
    agg = app.build("teacher_aggregator", "amtml", Setup(num_teachers=3), input_dim=8)
    plain = app.build(
        "teacher_aggregator", "amtml", Setup(num_teachers=3), input_dim=8, standardize=False
    )
    h1, h2 = hidden_states(5, 5, 8, seed=1), hidden_states(5, 5, 8, seed=2)
    raw1 = np.array(plain.instance(signals, inputs_for(student, None, mask, hidden=h1)))
    raw2 = np.array(plain.instance(signals, inputs_for(student, None, mask, hidden=h2)))
    # First update: the corrected moments are the batch's own.
    x1 = np.array(agg.instance(signals, inputs_for(student, None, mask, hidden=h1)))
    expected = (raw1 - raw1.mean(0)) / np.sqrt(raw1.var(0) + 1e-5)
    assert np.allclose(x1, expected, atol=1e-4)
    # Second update: EMA of the moments, bias-corrected.
    x2 = np.array(agg.instance(signals, inputs_for(student, None, mask, hidden=h2)))
    a = 0.05
    c = 1 - (1 - a) ** 2
    m = (a * (1 - a) * raw1.mean(0) + a * raw2.mean(0)) / c
    sq = (a * (1 - a) * (raw1**2).mean(0) + a * (raw2**2).mean(0)) / c
    assert np.allclose(x2, (raw2 - m) / np.sqrt(sq - m**2 + 1e-5), atol=1e-4)
    assert float(agg.feature_steps) == 2.0
    # Eval mode and a frozen aggregator score without updating.
    agg.eval()
    agg.instance(signals, inputs_for(student, None, mask, hidden=h1))
    agg.train()
    agg.freeze()
    agg.instance(signals, inputs_for(student, None, mask, hidden=h1))
    assert float(agg.feature_steps) == 2.0
    agg.unfreeze()
    agg.instance(signals, inputs_for(student, None, mask, hidden=h1))
    assert float(agg.feature_steps) == 3.0


def test_kd_explain_attention_transfer_says_what_it_is(capsys):
    """It matches attention probability maps, not Zagoruyko and Komodakis' activation-based
    attention maps: the name alone suggests the latter."""
    from kdcore import testing

    assert testing.run_kd("explain", "attention_transfer") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Zagoruyko" in text and "not" in text, text
    assert "attention probabilities" in text and "activation" in text, text


@pytest.mark.parametrize("mode", ["native", "pure"])
@pytest.mark.parametrize("top_k", [0, 4])
def test_a_row_loss_sends_the_learnable_aggregator_its_gradients(mode, top_k, monkeypatch):
    """hinton is written once, as rows; with a learnable aggregator the engine runs those
    rows on full logits, and the aggregator's gradient must equal the gradient of the plain
    formula KL(sum_k mu_k p_k || q) differentiated by MLX (with a top-k teacher: none
    reaches it through the support, which is taken as a constant)."""
    monkeypatch.setenv("KD_KERNELS", mode)
    student, teachers, mask = random_case(B=4)
    hidden = hidden_states(4, 5, 8)
    signals = [signal(z) for z in teachers]
    aggregate = app.build("teacher_aggregator", "amtml", Setup(num_teachers=3), input_dim=8)
    T = 2.0
    hinton = testing.build_loss("hinton", temperature=T, top_k=top_k)

    def objective(module, how):
        base = inputs_for(student, None, mask, hidden=hidden)
        merged = module(signals, base)
        if how == "rows":
            return hinton(attrs.evolve(base, teacher=merged))[0]
        lq = kdcore.log_softmax(mx.array(student), T)
        lp = merged.log_probs(T)
        kl = (mx.exp(lp) * (lp - lq)).sum(-1)
        return T * T * kdcore.masked_mean(kl, mx.array(mask))

    value, grads = nn.value_and_grad(aggregate, lambda m: objective(m, "rows"))(aggregate)
    theta, w = np.array(grads["theta"]), np.array(grads["w"])
    if top_k:
        assert np.abs(theta).sum() == 0 and np.abs(w).sum() == 0
        return
    want_value, want = nn.value_and_grad(aggregate, lambda m: objective(m, "plain"))(aggregate)
    assert value.item() == pytest.approx(want_value.item(), rel=1e-5)
    assert np.abs(theta).sum() > 0
    np.testing.assert_allclose(theta, np.array(want["theta"]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(w, np.array(want["w"]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["native", "pure"])
def test_a_mixture_of_mixtures_runs_as_rows_on_both_paths(mode, monkeypatch):
    """A mixture whose member is itself a mixture: the rows read its whole log_probs, and
    the fused path, the full-logit path and the plain formula agree."""
    monkeypatch.setenv("KD_KERNELS", mode)
    student, teachers, mask = random_case(B=2, K=3)
    inner = kdcore.TeacherSignal(
        vocab_size=teachers[0].shape[-1],
        members=(signal(teachers[0]), signal(teachers[1])),
        weights=mx.array([0.3, 0.7]),
    )
    outer = kdcore.TeacherSignal(
        vocab_size=teachers[0].shape[-1],
        members=(inner, signal(teachers[2])),
        weights=mx.array([0.6, 0.4]),
    )
    hinton = testing.build_loss("hinton", temperature=2.0)
    inputs = inputs_for(student, outer, mask)
    full = hinton(inputs)[0].item()
    fused = hinton.fused(inputs)[0].item()
    weights = np.array([[0.18, 0.42, 0.4]] * student.shape[0])
    want = np_soft_target_loss(student, teachers, weights, mask, 2.0)
    assert full == pytest.approx(want, rel=1e-4)
    assert fused == pytest.approx(want, rel=1e-4)
