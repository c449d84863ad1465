"""Sampling continuations from a model: temperature, top-p, greedy, stop tokens.

One sampler for every caller (``kd generate``, evaluation, on-policy training). A model
that implements the cache protocol (:class:`Decodes`: the built-in transformer and the
mlx-lm models do) is decoded with a KV cache: the prompt runs once, then each new token
is a single-position forward. Prompts may have different lengths: they are left-padded
to a common length and the cache masks the pads and starts each row's positions at its
first real token, so a row gets the tokens it would get alone. Any other model, or
``cache=False``, takes the full recompute (one forward of the whole context per token),
which is also the reference the cached path is tested against.

The decode loop follows mlx-lm's ``generate_step``: the next step's graph is built and
handed to ``mx.async_eval`` before the current token is read, so building the graph in
Python overlaps the computation.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx
import numpy as np

from kdcore.errors import KdError


@runtime_checkable
class Decodes(Protocol):
    """What the cached sampler calls on a model."""

    def make_cache(self, left_padding: Sequence[int]) -> Any:
        """An empty cache for a batch whose row ``b`` starts with ``left_padding[b]`` pads."""

    def step(self, input_ids: mx.array, cache: Any) -> mx.array:
        """Run new tokens [B, L] after those ``cache`` holds (adding them to it): the
        logits [B, V] after the last one."""


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


Until = Callable[[mx.array, mx.array], bool]


def generate(
    model,
    prompts: mx.array | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_token: int | Collection[int] | None = None,
    max_context: int | None = None,
    *,
    cache: bool = True,
    pad_id: int = 0,
    until: Until | None = None,
    check_every: int = 16,
) -> tuple[mx.array, mx.array]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    ``prompts``: an array [B, P] (rows of one length), or a list of token-id rows of any
    lengths, which are left-padded with ``pad_id`` to the longest. ``stop_token``: one
    id or several; a row ends at the first it samples, and the call ends when every row
    has. ``until(tokens, mask)`` (optional) is asked after every ``check_every`` new
    tokens and ends the call when it returns True. ``cache=False`` recomputes the whole
    context for every token (as does a model without ``make_cache``/``step``, and a call
    whose context would outgrow ``max_context``, which is cut to its last
    ``max_context`` tokens).

    Returns (tokens [B, P + N], generated mask [B, P + N]: 1 on generated tokens up to and
    including the row's stop token, 0 on pads, prompts and after the stop). Tokens
    after a row's stop are still sampled (they are masked out).
    """
    ids, pads = _prompt_array(prompts, pad_id)
    stops = _stop_ids(stop_token)
    if check_every < 1:
        raise KdError(f"generate: check_every must be >= 1, got {check_every}")
    fits = max_context is None or ids.shape[1] + max_new_tokens <= max_context
    if max_new_tokens <= 0:
        return ids, mx.zeros(ids.shape, dtype=mx.float32)
    if cache and fits and isinstance(model, Decodes):
        return _cached(
            model, ids, pads, max_new_tokens, temperature, top_p, stops, until, check_every
        )
    if not any(pads):
        return _recompute(
            model, ids, max_new_tokens, temperature, top_p, stops, max_context, until, check_every
        )
    # No mask to hide pads from a plain forward: each prompt length is its own batch.
    return _by_length(
        model,
        ids,
        pads,
        max_new_tokens,
        temperature,
        top_p,
        stops,
        max_context,
        until,
        check_every,
        pad_id,
    )


def _prompt_array(prompts, pad_id: int) -> tuple[mx.array, list[int]]:
    """(left-padded ids [B, P], pads per row) from an array or a list of rows."""
    if isinstance(prompts, mx.array):
        if prompts.ndim != 2 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
            raise KdError(
                f"generate: prompts must be token ids [batch, length], got shape {prompts.shape}"
            )
        if not mx.issubdtype(prompts.dtype, mx.integer):
            raise KdError(f"generate: prompts must be token ids, got {prompts.dtype}")
        return prompts, [0] * prompts.shape[0]
    rows = [np.asarray(row) for row in prompts]
    if not rows:
        raise KdError("generate: no prompts")
    for i, row in enumerate(rows):
        if row.ndim != 1:
            raise KdError(f"generate: prompt {i} must be a flat list of token ids")
        if row.size == 0:
            raise KdError(f"generate: prompt {i} is empty")
        if not np.issubdtype(row.dtype, np.integer):
            raise KdError(f"generate: prompt {i} must hold token ids (integers), not {row.dtype}")
    width = max(row.size for row in rows)
    out = np.full((len(rows), width), pad_id, dtype=np.int32)
    for i, row in enumerate(rows):
        out[i, width - row.size :] = row
    return mx.array(out), [width - row.size for row in rows]


def _stop_ids(stop_token) -> mx.array | None:
    if stop_token is None:
        return None
    ids = [stop_token] if isinstance(stop_token, int | np.integer) else list(stop_token)
    if not ids:
        return None
    if not all(isinstance(t, int | np.integer) for t in ids):
        raise KdError(f"generate: stop tokens must be token ids, got {stop_token!r}")
    return mx.array([int(t) for t in ids], dtype=mx.int32)


def _is_stop(tokens: mx.array, stops: mx.array) -> mx.array:
    return (tokens[:, None].astype(mx.int32) == stops[None, :]).any(axis=1)


def _assemble(ids: mx.array, made: list[mx.array], alive: list[mx.array]):
    tokens = mx.concatenate([ids, mx.stack(made, axis=1).astype(ids.dtype)], axis=1)
    gen = mx.stack(alive, axis=1).astype(mx.float32)
    mask = mx.concatenate([mx.zeros(ids.shape, dtype=mx.float32), gen], axis=1)
    return tokens, mask


def _cached(model, ids, pads, max_new, temperature, top_p, stops, until, check_every):
    B = ids.shape[0]
    kv = model.make_cache(pads)
    y = sample_next(model.step(ids, kv), temperature, top_p)
    mx.async_eval(y)
    alive = mx.ones((B,), dtype=mx.bool_)
    made: list[mx.array] = []
    masks: list[mx.array] = []

    def queue(current: mx.array) -> mx.array:
        following = sample_next(model.step(current[:, None], kv), temperature, top_p)
        mx.async_eval(following)
        return following

    for n in range(max_new):
        last = n + 1 == max_new
        checking = until is not None and (n + 1) % check_every == 0 and not last
        # The next token's graph is queued before this one is read. Not before asking
        # ``until``: a call it ends then draws no extra random key, so the random stream
        # after it is the full recompute's.
        if not last and not checking:
            following = queue(y)
        made.append(y)
        masks.append(alive)
        if stops is not None:
            alive = mx.logical_and(alive, mx.logical_not(_is_stop(y, stops)))
            if not alive.any().item():
                break
        if checking:
            tokens, mask = _assemble(ids, made, masks)
            mx.eval(tokens, mask)
            if until(tokens, mask):
                break
            following = queue(y)
        if not last:
            y = following
    tokens, mask = _assemble(ids, made, masks)
    mx.eval(tokens, mask)
    return tokens, mask


def _recompute(model, ids, max_new, temperature, top_p, stops, max_context, until, check_every):
    """The full recompute: one forward of the whole context per new token."""
    tokens = ids
    B = ids.shape[0]
    alive = mx.ones((B,), dtype=mx.bool_)
    made = []
    for n in range(max_new):
        context = tokens if max_context is None else tokens[:, -max_context:]
        logits = model(context).logits[:, -1, :]
        nxt = sample_next(logits, temperature, top_p)
        made.append(alive)
        tokens = mx.concatenate([tokens, nxt[:, None].astype(tokens.dtype)], axis=1)
        if stops is not None:
            alive = mx.logical_and(alive, mx.logical_not(_is_stop(nxt, stops)))
        mx.eval(tokens, alive)
        if stops is not None and not alive.any().item():
            break
        if until is not None and (n + 1) % check_every == 0 and n + 1 < max_new:
            if until(tokens, _recompute_mask(ids, made)):
                break
    return tokens, _recompute_mask(ids, made)


def _recompute_mask(ids: mx.array, made: list[mx.array]) -> mx.array:
    gen = mx.stack(made, axis=1).astype(mx.float32)
    return mx.concatenate([mx.zeros(ids.shape, dtype=mx.float32), gen], axis=1)


def _by_length(
    model, ids, pads, max_new, temperature, top_p, stops, max_context, until, check_every, pad_id
):
    """Mixed lengths without a cache: one batch per length, put back in row order and
    left-padded as the cached path returns them (``until`` is asked per batch)."""
    B, P = ids.shape
    groups: dict[int, list[int]] = {}
    for row, pad in enumerate(pads):
        groups.setdefault(pad, []).append(row)
    parts = {}
    for pad, rows in sorted(groups.items()):
        sub = ids[mx.array(rows)][:, pad:]
        parts[pad] = (
            rows,
            *_recompute(
                model, sub, max_new, temperature, top_p, stops, max_context, until, check_every
            ),
        )
    made = max(tokens.shape[1] - (P - pad) for pad, (_, tokens, _) in parts.items())
    out = np.full((B, P + made), pad_id, dtype=np.array(ids[:1, :1]).dtype)
    mask = np.zeros((B, P + made), dtype=np.float32)
    for pad, (rows, tokens, gen) in parts.items():
        width = tokens.shape[1]
        out[rows, pad : pad + width] = np.array(tokens)
        mask[rows, pad : pad + width] = np.array(gen)
    return mx.array(out), mx.array(mask)
