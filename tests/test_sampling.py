"""The sampler (kdcore.models.sampling.generate): the KV-cache path against the full
recompute, prompts of different lengths in one batch, stop tokens, top-p, temperature 0."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from kdcore.app import Transformer, TransformerConfig, generate
from kdcore.errors import KdError
from kdcore.models.mlxlm import MlxLmModel, create_mlxlm_dir, load_mlxlm

MLXLM = {
    "llama": dict(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=256,
        tie_word_embeddings=False,
    ),
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        vocab_size=256,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
}


def transformer(tied: bool = True, seed: int = 0) -> Transformer:
    mx.random.seed(seed)
    model = Transformer(
        TransformerConfig(
            vocab_size=256, dim=32, layers=2, heads=4, kv_heads=2, tie_embeddings=tied
        )
    )
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def mlxlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlxlm")
    return {
        name: create_mlxlm_dir(root / name, cfg, seed=i)
        for i, (name, cfg) in enumerate(MLXLM.items())
    }


def mlxlm(dirs, family: str) -> MlxLmModel:
    lm, config = load_mlxlm(dirs[family])
    return MlxLmModel(lm, config, dirs[family])


def models(dirs):
    return {
        "transformer-tied": transformer(True),
        "transformer-untied": transformer(False, seed=1),
        "llama": mlxlm(dirs, "llama"),
        "qwen3": mlxlm(dirs, "qwen3"),
    }


KINDS = ["transformer-tied", "transformer-untied", "llama", "qwen3"]


def prompts(batch: int, length: int, seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(0, 256, (batch, length)).astype(np.int32))


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_greedy_tokens_equal_the_full_recompute(mlxlm_dirs, kind):
    model = models(mlxlm_dirs)[kind]
    ids = prompts(3, 6)
    cached, cached_mask = generate(model, ids, 20, temperature=0.0)
    plain, plain_mask = generate(model, ids, 20, temperature=0.0, cache=False)
    np.testing.assert_array_equal(np.array(cached), np.array(plain))
    np.testing.assert_array_equal(np.array(cached_mask), np.array(plain_mask))
    assert cached.shape == (3, 26)
    assert np.array(cached_mask[:, :6]).sum() == 0 and np.array(cached_mask[:, 6:]).min() == 1


@pytest.mark.parametrize("kind", KINDS)
def test_cached_step_logits_match_the_full_forward(mlxlm_dirs, kind):
    """Per position, the incremental logits are the full forward's (to float rounding)."""
    model = models(mlxlm_dirs)[kind]
    ids = prompts(2, 12, seed=3)
    full = model(ids).logits
    cache = model.make_cache([0, 0])
    got = [model.step(ids[:, :5], cache)]
    got += [model.step(ids[:, t : t + 1], cache) for t in range(5, 12)]
    np.testing.assert_allclose(
        np.array(mx.stack(got, axis=1)), np.array(full[:, 4:]), atol=2e-5, rtol=1e-4
    )


@pytest.mark.parametrize("kind", KINDS)
def test_a_prompt_gives_the_same_tokens_alone_and_in_a_mixed_length_batch(mlxlm_dirs, kind):
    model = models(mlxlm_dirs)[kind]
    rng = np.random.default_rng(7)
    rows = [rng.integers(0, 256, n).tolist() for n in (3, 11, 6)]
    tokens, mask = generate(model, rows, 15, temperature=0.0, pad_id=0)
    width = max(len(r) for r in rows)
    assert tokens.shape == (3, width + 15)
    for i, row in enumerate(rows):
        alone, alone_mask = generate(model, mx.array([row]), 15, temperature=0.0)
        # left-padded: the prompt ends where the batch's longest does
        np.testing.assert_array_equal(np.array(tokens[i, width - len(row) : width]), row)
        np.testing.assert_array_equal(np.array(tokens[i, : width - len(row)]), 0)
        np.testing.assert_array_equal(np.array(tokens[i, width:]), np.array(alone[0, len(row) :]))
        np.testing.assert_array_equal(np.array(mask[i, :width]), 0)
        np.testing.assert_array_equal(
            np.array(mask[i, width:]), np.array(alone_mask[0, len(row) :])
        )
    # the no-cache path takes mixed lengths too (one group per length) and agrees
    plain, plain_mask = generate(model, rows, 15, temperature=0.0, cache=False)
    np.testing.assert_array_equal(np.array(plain), np.array(tokens))
    np.testing.assert_array_equal(np.array(plain_mask), np.array(mask))


@pytest.mark.parametrize("cache", [True, False])
def test_several_stop_tokens_end_each_row_and_then_the_batch(cache):
    model = transformer()
    ids = prompts(2, 4, seed=5)
    free, _ = generate(model, ids, 12, temperature=0.0)
    gen = np.array(free[:, 4:])
    # row 0 stops at its 3rd new token, row 1 at its 6th (first occurrences)
    a, b = int(gen[0, 2]), int(gen[1, 5])
    first0 = next(i for i, t in enumerate(gen[0]) if t in (a, b))
    first1 = next(i for i, t in enumerate(gen[1]) if t in (a, b))
    tokens, mask = generate(model, ids, 12, temperature=0.0, stop_token=[a, b], cache=cache)
    made = np.array(mask[:, 4:])
    np.testing.assert_array_equal(made[0], [1] * (first0 + 1) + [0] * (made.shape[1] - first0 - 1))
    np.testing.assert_array_equal(made[1], [1] * (first1 + 1) + [0] * (made.shape[1] - first1 - 1))
    # the batch ends once every row has stopped
    assert tokens.shape[1] == 4 + max(first0, first1) + 1
    np.testing.assert_array_equal(np.array(tokens[:, 4:]), gen[:, : tokens.shape[1] - 4])
    # one stop token as a plain int, as before
    _, one = generate(model, ids, 12, temperature=0.0, stop_token=a, cache=cache)
    assert np.array(one[0, 4:]).sum() == gen[0].tolist().index(a) + 1


class FixedLogits:
    """A model of the cache protocol whose next-token distribution never changes."""

    def __init__(self, probs: list[float]):
        self.logits = mx.log(mx.array(probs))

    def make_cache(self, left_padding):
        return {"rows": len(left_padding)}

    def step(self, tokens, cache):
        return mx.broadcast_to(self.logits, (tokens.shape[0], self.logits.shape[0]))

    def __call__(self, ids):  # the full-recompute interface (for cache=False)
        raise AssertionError("the cache protocol should be used")


def test_top_p_samples_only_from_the_nucleus():
    model = FixedLogits([0.05, 0.5, 0.3, 0.15])
    mx.random.seed(0)
    tokens, _ = generate(model, mx.zeros((64, 1), dtype=mx.int32), 8, top_p=0.7)
    seen = set(np.array(tokens[:, 1:]).ravel().tolist())
    assert seen == {1, 2}  # 0.5 + 0.3 covers 0.7; 0.15 and 0.05 never drawn
    mx.random.seed(0)
    tokens, _ = generate(model, mx.zeros((64, 1), dtype=mx.int32), 8, top_p=1.0)
    assert set(np.array(tokens[:, 1:]).ravel().tolist()) == {0, 1, 2, 3}


def test_temperature_zero_is_greedy_and_sampling_follows_the_seed():
    model = FixedLogits([0.2, 0.1, 0.4, 0.3])
    tokens, _ = generate(model, mx.zeros((5, 2), dtype=mx.int32), 6, temperature=0.0)
    np.testing.assert_array_equal(np.array(tokens[:, 2:]), 2)
    # at temperature > 0 the cached and the full-recompute sampler draw the same tokens
    # from the same seed (same random calls in the same order)
    real, ids = transformer(), prompts(3, 5)
    mx.random.seed(11)
    a, _ = generate(real, ids, 16, temperature=1.0, top_p=0.9)
    mx.random.seed(11)
    b, _ = generate(real, ids, 16, temperature=1.0, top_p=0.9, cache=False)
    np.testing.assert_array_equal(np.array(a), np.array(b))


def test_until_is_asked_every_check_every_tokens():
    model = transformer()
    ids = prompts(2, 3)
    calls = []

    def until(tokens, mask):
        calls.append(tokens.shape[1] - 3)
        return len(calls) == 2

    tokens, mask = generate(model, ids, 20, temperature=0.0, until=until, check_every=4)
    assert calls == [4, 8] and tokens.shape == (2, 3 + 8) and mask.shape == tokens.shape


def test_max_context_keeps_the_old_truncating_recompute():
    model = transformer()
    ids = prompts(2, 6)
    a, _ = generate(model, ids, 10, temperature=0.0, max_context=8)
    b, _ = generate(model, ids, 10, temperature=0.0, max_context=8, cache=False)
    np.testing.assert_array_equal(np.array(a), np.array(b))


def test_bad_prompts_are_a_clear_error():
    model = transformer()
    with pytest.raises(KdError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(KdError, match="no prompts"):
        generate(model, [], 4)
    with pytest.raises(KdError, match="token ids"):
        generate(model, [[1, 2], [0.5]], 4)


def test_zero_new_tokens_returns_the_prompts():
    model = transformer()
    ids = prompts(2, 3)
    tokens, mask = generate(model, ids, 0)
    np.testing.assert_array_equal(np.array(tokens), np.array(ids))
    assert mask.shape == (2, 3) and np.array(mask).sum() == 0


def test_the_no_cache_forward_is_unchanged_by_the_cache_argument():
    model = transformer()
    ids = prompts(2, 9)
    out = model(ids)
    assert mx.array_equal(out.logits, model(ids, cache=None).logits).item()
    assert out.final_hidden.shape == (2, 9, 32)


def test_a_cached_step_captures_the_full_forwards_attention_row():
    """Attention maps from a cached step: the last row of the full forward's, and
    nothing on a padded row's pads."""
    model = transformer()
    ids, longer = prompts(1, 7), prompts(1, 9, seed=1)
    want = [a[0, :, -1] for a in model(ids, capture=frozenset({"attentions"})).attentions]
    attention = frozenset({"attentions"})
    alone = model.make_cache([0])
    model(ids[:, :-1], cache=alone)
    got = model(ids[:, -1:], cache=alone, capture=attention).attentions
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.array(g[0, :, -1]), np.array(w), atol=1e-5)
    batch = mx.concatenate([mx.concatenate([mx.zeros((1, 2), ids.dtype), ids], 1), longer])
    padded = model.make_cache([2, 0])
    model(batch[:, :-1], cache=padded)
    got = model(batch[:, -1:], cache=padded, capture=attention).attentions
    for w, g in zip(want, got):
        np.testing.assert_array_equal(np.array(g[0, :, -1, :2]), 0)
        np.testing.assert_allclose(np.array(g[0, :, -1, 2:]), np.array(w), atol=1e-5)
