"""Fast decoding for ``kdcore.generate`` with the built-in transformer.

``generate`` calls ``model(context)`` with the whole context once per new token and reads
the last position's logits. :class:`IncrementalDecoder` wraps a
``kdcore.Transformer`` and keeps each layer's keys and values: when the context is the
previous one plus one token it runs only that token (mlx-lm's KV cache, in a wrapper), so
sampling N tokens costs N single-token forwards instead of N full ones. It returns logits
for the positions it has not returned before (``[B, 1, V]`` per step), which is all
``generate`` reads. Any other model is passed through unchanged (see :func:`decoder_for`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from kdcore import ModelOutput, Transformer


class IncrementalDecoder:
    """A KV-cached view of a :class:`kdcore.Transformer` for left-to-right decoding."""

    def __init__(self, model: Transformer):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        self.context: mx.array | None = None

    def __call__(self, input_ids: mx.array, capture: frozenset = frozenset()) -> ModelOutput:
        prev = self.context
        extends = (
            prev is not None
            and input_ids.shape[0] == prev.shape[0]
            and input_ids.shape[1] == prev.shape[1] + 1
            and mx.array_equal(input_ids[:, :-1], prev).item()
        )
        if not extends:
            self.reset()
            new = input_ids
        else:
            new = input_ids[:, -1:]
        logits = self._forward(new, offset=0 if not extends else prev.shape[1])
        self.context = input_ids
        return ModelOutput(logits=logits)

    def _forward(self, ids: mx.array, offset: int) -> mx.array:
        m = self.model
        B, L = ids.shape
        x = m.embed(ids)
        mask = None
        if L > 1:  # the prompt: causal among itself (nothing is cached yet, offset 0)
            mask = nn.MultiHeadAttention.create_additive_causal_mask(L).astype(x.dtype)
        for i, block in enumerate(m.blocks):
            att = block.attention
            h = block.attention_norm(x)
            q = att.q_proj(h).reshape(B, L, att.heads, -1).transpose(0, 2, 1, 3)
            k = att.k_proj(h).reshape(B, L, att.kv_heads, -1).transpose(0, 2, 1, 3)
            v = att.v_proj(h).reshape(B, L, att.kv_heads, -1).transpose(0, 2, 1, 3)
            q, k = att.rope(q, offset=offset), att.rope(k, offset=offset)
            if offset:
                k = mx.concatenate([self.keys[i], k], axis=2)
                v = mx.concatenate([self.values[i], v], axis=2)
                self.keys[i], self.values[i] = k, v
            else:
                self.keys.append(k)
                self.values.append(v)
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=att.scale, mask=mask)
            x = x + att.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
            x = x + block.mlp(block.mlp_norm(x))
        x = m.norm(x)
        return m.embed.as_linear(x) if m.config.tie_embeddings else m.lm_head(x)


def decoder_for(model):
    """An :class:`IncrementalDecoder` for the built-in transformer, else the model itself."""
    return IncrementalDecoder(model) if isinstance(model, Transformer) else model
