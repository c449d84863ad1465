"""The fused head + divergence kernel equals the unfused path (full logits, autodiff) and
never holds [tokens, vocab]."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kdcore.kernels.divergence import dense_divergence, plain_divergence
from kdcore.kernels.fused import (
    IGNORE_INDEX,
    Head,
    Term,
    cross_entropy_rows,
    divergence_rows,
    fused_token_mean,
    fused_token_terms,
)
from kdcore.kernels.kinds import KINDS
from kdcore.losses.tokens import masked_mean, token_cross_entropy
from kdcore.models.transformer import Transformer, TransformerConfig

B, L, D, DT, V = 3, 7, 16, 12, 50
OPTIONS = {"beta": 0.5, "alpha": 0.1}
READERS = ["host", "device"]


def close(got: mx.array, ref: mx.array, tol: float = 1e-5) -> None:
    """Largest error within ``tol`` of the reference's largest magnitude."""
    got = np.asarray(got.astype(mx.float32), np.float64)
    ref = np.asarray(ref.astype(mx.float32), np.float64)
    assert got.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-12)
    err = float(np.abs(got - ref).max())
    assert err <= tol * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def inputs(seed: int = 0, bias: bool = True):
    rng = np.random.default_rng(seed)

    def f(*shape, s=1.0):
        return mx.array((rng.standard_normal(shape) * s).astype(np.float32))

    h, w, ht, wt = f(B, L, D), f(V, D, s=0.5), f(B, L, DT), f(V, DT, s=0.5)
    b = f(V, s=0.3) if bias else None
    bt = f(V, s=0.3) if bias else None
    mask = np.ones((B, L), np.float32)
    mask[0, 5:] = 0  # padding
    mask[1, :2] = 0  # a prompt
    mask[2, 3] = 0
    return h, Head(w, b), ht, Head(wt, bt), mx.array(mask)


def fused_vg(rows_fn, h, head, ht, t_head, mask, **kw):
    def f(h, w, *b):
        return fused_token_mean(rows_fn, h, Head(w, *b), ht, t_head, mask, **kw)

    args = [h, head.weight] + ([head.bias] if head.bias is not None else [])
    return mx.value_and_grad(f, argnums=tuple(range(len(args))))(*args)


def plain_vg(kind, temperature, h, head, ht, t_head, mask):
    def f(h, w, *b):
        s = Head(w, *b)(h)
        t = t_head(ht)
        return plain_divergence(s, t, mask, kind, temperature=temperature, **OPTIONS)

    args = [h, head.weight] + ([head.bias] if head.bias is not None else [])
    return mx.value_and_grad(f, argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_full_logits(kind, temperature, reader):
    h, head, ht, t_head, mask = inputs()
    rows = divergence_rows(kind, temperature=temperature, **OPTIONS)
    value, grads = fused_vg(rows, h, head, ht, t_head, mask, chunk_rows=4, reader=reader)
    ref_value, ref_grads = plain_vg(kind, temperature, h, head, ht, t_head, mask)
    close(value, ref_value)
    assert len(grads) == len(ref_grads) == 3
    for got, ref in zip(grads, ref_grads):
        close(got, ref)
    # rows whose mask is 0 get no gradient
    assert float(mx.abs(grads[0][0, 5:]).max()) == 0.0


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
def test_bias_and_chunk_sizes(bias, chunk_rows, reader):
    h, head, ht, t_head, mask = inputs(1, bias=bias)
    rows = divergence_rows("gjsd", temperature=2.0, **OPTIONS)
    value, grads = fused_vg(rows, h, head, ht, t_head, mask, chunk_rows=chunk_rows, reader=reader)
    ref_value, ref_grads = plain_vg("gjsd", 2.0, h, head, ht, t_head, mask)
    close(value, ref_value)
    assert len(grads) == (3 if bias else 2)
    for got, ref in zip(grads, ref_grads):
        close(got, ref)


@pytest.mark.parametrize("reader", READERS)
def test_also_equals_the_chunked_logits_kernel_and_teacher_logits(reader):
    """Against ``dense_divergence`` on full logits, with the teacher given as logits."""
    h, head, ht, t_head, mask = inputs(2)
    t_logits = t_head(ht)
    rows = divergence_rows("reverse_kl", temperature=2.0)
    value, grads = fused_vg(rows, h, head, t_logits, None, mask, chunk_rows=3, reader=reader)

    def ref(h, w, b):
        return dense_divergence(Head(w, b)(h), t_logits, mask, "reverse_kl", temperature=2.0)

    ref_value, ref_grads = mx.value_and_grad(ref, argnums=(0, 1, 2))(h, head.weight, head.bias)
    close(value, ref_value)
    for got, want in zip(grads, ref_grads):
        close(got, want)


def test_an_empty_mask_gives_zero_and_no_gradient():
    h, head, ht, t_head, mask = inputs()
    for reader in READERS:
        value, grads = fused_vg(
            divergence_rows(), h, head, ht, t_head, mx.zeros_like(mask), reader=reader
        )
        assert float(value) == 0.0
        assert all(float(mx.abs(g).max()) == 0.0 for g in grads)


@pytest.mark.parametrize("reader", READERS)
def test_several_terms_share_one_pass(reader):
    """The total and its gradient are the weighted sum of single-term passes; the values
    are each term's own mean."""
    h, head, ht, t_head, mask = inputs(3)
    rng = np.random.default_rng(3)
    labels = rng.integers(0, V, (B, L)).astype(np.int32)
    labels[0, 0] = labels[2, 6] = IGNORE_INDEX
    labels = mx.array(labels)
    parts = [
        (divergence_rows("forward_kl", temperature=2.0), 4.0, ("teacher",)),
        (divergence_rows("skew_reverse_kl", alpha=0.3), 0.5, ("teacher",)),
        (cross_entropy_rows(), 0.25, ("labels",)),
    ]
    terms = [Term(r, w, i) for r, w, i in parts]
    args = (h, head.weight, head.bias)

    def fused(h, w, b, terms=terms):
        total, values = fused_token_terms(
            terms,
            h,
            Head(w, b),
            ht,
            t_head,
            mask,
            extras={"labels": labels},
            chunk_rows=6,
            reader=reader,
        )
        fused.values = values
        return total

    total, grads = mx.value_and_grad(fused, argnums=(0, 1, 2))(*args)
    values = fused.values
    assert len(values) == 3
    want_total, want_grads = 0.0, [mx.zeros_like(a) for a in args]
    for (r, w, i), value in zip(parts, values):
        single = [Term(r, 1.0, i)]
        one, one_grads = mx.value_and_grad(
            lambda *a, t=single: fused(*a, terms=t), argnums=(0, 1, 2)
        )(*args)
        close(value, one)
        want_total = want_total + w * one
        want_grads = [g + w * x for g, x in zip(want_grads, one_grads)]
    close(total, want_total)
    for got, want in zip(grads, want_grads):
        close(got, want)


@pytest.mark.parametrize("reader", READERS)
def test_cross_entropy_rows_equal_token_cross_entropy(reader):
    h, head, _, _, mask = inputs(4)
    rng = np.random.default_rng(4)
    labels = rng.integers(0, V, (B, L)).astype(np.int32)
    labels[1, 3] = labels[0, 6] = IGNORE_INDEX
    labels = mx.array(labels)

    def fused(h, w, b):
        total, _ = fused_token_terms(
            [Term(cross_entropy_rows(), 1.0, ("labels",))],
            h,
            Head(w, b),
            None,
            None,
            mask,
            extras={"labels": labels},
            chunk_rows=4,
            reader=reader,
        )
        return total

    def ref(h, w, b):
        return masked_mean(token_cross_entropy(Head(w, b)(h), labels), mask)

    args = (h, head.weight, head.bias)
    value, grads = mx.value_and_grad(fused, argnums=(0, 1, 2))(*args)
    ref_value, ref_grads = mx.value_and_grad(ref, argnums=(0, 1, 2))(*args)
    close(value, ref_value)
    for got, want in zip(grads, ref_grads):
        close(got, want)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_model_heads(tied, reader):
    """Through a real model: every parameter's gradient (a tied embedding's from both its
    uses) equals the full-logits path's."""
    config = TransformerConfig(vocab_size=V, dim=16, layers=1, heads=2, tie_embeddings=tied)
    mx.random.seed(5)
    model, teacher = Transformer(config), Transformer(config)
    mx.eval(model.parameters(), teacher.parameters())
    ids = mx.array(np.random.default_rng(5).integers(0, V, (B, L)).astype(np.int32))
    mask = inputs()[4]
    t_out = teacher(ids)
    t_hidden = t_out.final_hidden
    t_head = Head.of(teacher.embed if tied else teacher.lm_head)
    rows = divergence_rows("forward_kl", temperature=2.0)

    def fused(m):
        out = m(ids)
        head = Head.of(m.embed if tied else m.lm_head)
        return fused_token_mean(
            rows, out.final_hidden, head, t_hidden, t_head, mask, chunk_rows=5, reader=reader
        )

    def ref(m):
        return plain_divergence(m(ids).logits, t_out.logits, mask, temperature=2.0)

    value, grads = nn.value_and_grad(model, fused)(model)
    ref_value, ref_grads = nn.value_and_grad(model, ref)(model)
    close(value, ref_value)
    got, want = dict(tree_flatten(grads)), dict(tree_flatten(ref_grads))
    assert got.keys() == want.keys()
    for name in want:
        close(got[name], want[name], 2e-5)


def test_bf16_inputs_match_float32_on_the_same_values():
    """Half-precision hidden states and head are cast to float32 per chunk: same result as
    float32 inputs holding the same (rounded) numbers; gradients come back in bf16."""
    h, head, ht, t_head, mask = inputs(6)
    hb, wb, bb = (x.astype(mx.bfloat16) for x in (h, head.weight, head.bias))
    rows = divergence_rows("forward_kl")
    for reader in READERS:
        value, grads = fused_vg(rows, hb, Head(wb, bb), ht, t_head, mask, reader=reader)
        ref_value, ref_grads = fused_vg(
            rows,
            hb.astype(mx.float32),
            Head(wb.astype(mx.float32), bb.astype(mx.float32)),
            ht,
            t_head,
            mask,
            reader=reader,
        )
        close(value, ref_value)
        for got, want in zip(grads, ref_grads):
            assert got.dtype == mx.bfloat16
            close(got, want.astype(mx.bfloat16), 1e-2)


def test_grad_false_and_frozen_head():
    h, head, ht, t_head, mask = inputs(7)
    rows = divergence_rows("reverse_kl")
    ref_value, ref_grads = plain_vg("reverse_kl", 1.0, h, head, ht, t_head, mask)
    total, _ = fused_token_terms([(rows, 1.0)], h, head, ht, t_head, mask, grad=False)
    close(total, ref_value)
    with pytest.raises(RuntimeError, match="no gradient"):
        mx.grad(
            lambda x: fused_token_terms([(rows, 1.0)], x, head, ht, t_head, mask, grad=False)[0]
        )(h)
    value, grads = fused_vg(rows, h, head, ht, t_head, mask, head_grad=False)
    close(grads[0], ref_grads[0])
    assert float(mx.abs(grads[1]).max()) == 0.0


def test_bad_shapes_are_named():
    h, head, ht, t_head, mask = inputs()
    rows = divergence_rows()
    with pytest.raises(ValueError, match="align the vocabularies"):
        fused_token_mean(rows, h, head, ht, Head(t_head.weight[:-1]), mask)
    with pytest.raises(ValueError, match="do not match the mask"):
        fused_token_mean(rows, h[:, :-1], head, ht, t_head, mask)
    with pytest.raises(ValueError, match=r"not \[V, D\]"):
        fused_token_mean(rows, h, Head(head.weight.T), ht, t_head, mask)
    with pytest.raises(ValueError, match="no teacher"):
        fused_token_mean(rows, h, head, None, None, mask)
    with pytest.raises(ValueError, match="'labels'"):
        fused_token_terms([Term(cross_entropy_rows(), 1.0, ("labels",))], h, head, None, None, mask)
    with pytest.raises(ValueError, match="unknown reader"):
        fused_token_mean(rows, h, head, ht, t_head, mask, reader="gpu")


# ---------------------------------------------------------------- memory

# Small enough for a shared CPU (each pass ~1-2 s); a [N, V] float32 array is 32 MiB here.
MN, MD, MV, CHUNK = 1024, 64, 8192, 32


def _peak(fn, *args) -> float:
    """MiB above what was live before, for value and gradient."""
    mx.eval(*args)
    mx.synchronize()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn(*args)
    mx.eval(out)
    peak = (mx.get_peak_memory() - before) / 2**20
    del out
    mx.clear_cache()
    return peak


def _memory_inputs(n: int, seed: int = 0):
    k1, k2, k3, k4 = mx.random.split(mx.random.key(seed), 4)
    h = mx.random.normal((n, MD), key=k1)
    w = mx.random.normal((MV, MD), key=k2) * 0.1
    ht = mx.random.normal((n, MD), key=k3)
    wt = mx.random.normal((MV, MD), key=k4) * 0.1
    return h, w, ht, wt, mx.ones((n,))


def _fused_fn(reader: str):
    rows = divergence_rows("forward_kl", temperature=2.0)

    def run(h, w, ht, wt, mask):
        def f(h, w):
            return fused_token_mean(
                rows, h, Head(w), ht, Head(wt), mask, chunk_rows=CHUNK, reader=reader
            )

        return mx.value_and_grad(f, argnums=(0, 1))(h, w)

    return run


def _full(h, w, ht, wt, mask):
    def f(h, w):
        return dense_divergence(h @ w.T, ht @ wt.T, mask, temperature=2.0, chunk_rows=CHUNK)

    return mx.value_and_grad(f, argnums=(0, 1))(h, w)


@pytest.fixture(scope="module")
def full_peaks() -> tuple[float, float]:
    return _peak(_full, *_memory_inputs(MN)), _peak(_full, *_memory_inputs(2 * MN))


@pytest.mark.parametrize("reader", READERS)
def test_memory_grows_with_rows_times_dim_not_vocab(reader, full_peaks):
    """Value and gradient through the fused kernel vs full logits into the chunked logits
    kernel, both with 32-row chunks. Measured on CPU (MLX 0.32): full 105 / 201 MiB at
    N = 1024 / 2048 (three [N, V] arrays: both models' logits and their gradient), fused
    19.5 / 19.8 MiB ([V, D] head copies and gradient, [chunk, V] temporaries, [N, D] rows).
    At N = 2048 / 4096, V = 32768, default chunks: full 916 / 1684 MiB, fused 213 / 213 MiB
    (128-row chunks; 78 / 78 MiB with 32-row chunks)."""
    full, full_2n = full_peaks
    fused = _peak(_fused_fn(reader), *_memory_inputs(MN))
    fused_2n = _peak(_fused_fn(reader), *_memory_inputs(2 * MN))
    nv = MN * MV * 4 / 2**20  # one more [N, V] float32 array per extra N rows
    assert full_2n - full > 2 * nv, (full, full_2n)
    assert fused * 3.5 < full, (fused, full)  # measured 5.4
    assert fused_2n * 6 < full_2n, (fused_2n, full_2n)  # measured 10
    # N more rows add a few [N, D] float32 buffers (0.25 MiB each), not [N, V] (32 MiB)
    assert fused_2n - fused < 0.25 * nv, (fused, fused_2n)
