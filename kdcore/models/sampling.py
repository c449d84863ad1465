"""Sampling continuations from a model: temperature, top-p, greedy; no KV cache (the
built-in models are small and sequences short, so a full forward per token is simple and
exact)."""

from __future__ import annotations

import mlx.core as mx


def top_p_filter(logits: mx.array, top_p: float) -> mx.array:
    """Set logits outside the smallest set with cumulative probability >= top_p to -inf."""
    if top_p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    cumulative = mx.cumsum(probs, axis=-1)
    keep_sorted = (cumulative - probs) < top_p  # always keeps the most likely token
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, -mx.inf)


def sample_next(logits: mx.array, temperature: float = 1.0, top_p: float = 1.0) -> mx.array:
    """One token id per row of ``logits`` [B, V]; temperature 0 is greedy."""
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    logits = top_p_filter(logits.astype(mx.float32) / temperature, top_p)
    return mx.random.categorical(logits, axis=-1)


def generate(
    model,
    prompts: mx.array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_token: int | None = None,
    max_context: int | None = None,
) -> tuple[mx.array, mx.array]:
    """Continue each prompt row (equal lengths, [B, P]).

    Returns (tokens [B, P + N], generated mask [B, P + N]: 1 on generated tokens up to and
    including ``stop_token``, 0 on the prompt and after the stop).
    """
    tokens = prompts
    B = prompts.shape[0]
    alive = mx.ones((B,), dtype=mx.bool_)
    made = []
    for _ in range(max_new_tokens):
        context = tokens if max_context is None else tokens[:, -max_context:]
        logits = model(context).logits[:, -1, :]
        nxt = sample_next(logits, temperature, top_p)
        made.append(alive)
        tokens = mx.concatenate([tokens, nxt[:, None].astype(tokens.dtype)], axis=1)
        if stop_token is not None:
            alive = mx.logical_and(alive, nxt != stop_token)
        mx.eval(tokens, alive)
        if stop_token is not None and not alive.any().item():
            break
    gen_mask = mx.stack(made, axis=1).astype(mx.float32) if made else mx.zeros((B, 0))
    prompt_mask = mx.zeros(prompts.shape, dtype=mx.float32)
    return tokens, mx.concatenate([prompt_mask, gen_mask], axis=1)
