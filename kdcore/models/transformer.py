"""A small decoder-only transformer (RMSNorm, RoPE, grouped-query attention, SwiGLU).

Sized for the bundled examples and the tests; the shape follows mlx-lm's llama.
Hidden states and attention maps are returned only when asked for, so the plain
forward uses the fused attention kernel. For decoding, ``make_cache`` and ``step`` run one
new token at a time against cached keys and values (:class:`KVCache`, the protocol
``kdcore.models.sampling.generate`` uses).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import mlx.core as mx
import mlx.nn as nn

from kdcore.models import ops
from kdcore.models.checkpoint import checkpointed
from kdcore.models.output import ModelOutput, plain_head
from kdcore.spec.validators import number, positive

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


# A size: > 0, and a plain number (a model's shape cannot follow a schedule).
_size = [number, positive]


@attrs.define
class TransformerConfig:
    # Validators run before __attrs_post_init__, whose divisibility checks need heads > 0.
    vocab_size: int = attrs.field(default=256, validator=_size)
    dim: int = attrs.field(default=128, validator=_size)
    layers: int = attrs.field(default=4, validator=_size)
    heads: int = attrs.field(default=4, validator=_size)
    kv_heads: int | None = attrs.field(default=None, validator=_size)
    # default: 4 * dim * 2/3 rounded to a multiple of 16
    hidden_dim: int | None = attrs.field(default=None, validator=_size)
    max_seq_len: int = attrs.field(default=512, validator=_size)
    rope_theta: float = attrs.field(default=10000.0, validator=_size)
    norm_eps: float = attrs.field(default=1e-5, validator=_size)
    tie_embeddings: bool = True
    # Weights and activations; the losses compute in float32 whatever this is.
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def __attrs_post_init__(self) -> None:
        if self.kv_heads is None:
            self.kv_heads = self.heads
        if self.hidden_dim is None:
            self.hidden_dim = max(16, int(8 * self.dim / 3) // 16 * 16)
        problems = []
        if self.dim % self.heads:
            problems.append(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            problems.append(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}")
        if (self.dim // self.heads) % 2:
            problems.append(f"head size {self.dim // self.heads} must be even for RoPE")
        if problems:
            raise ValueError("; ".join(problems))


class KVCache:
    """Keys and values of every layer for left-to-right decoding of a batch.

    Rows may be left-padded to a common length (``left_padding[b]`` pad positions first):
    the pads are masked out of attention and each row's RoPE positions start at 0 on its
    first real token, so a row decodes as it would alone. Buffers grow in blocks of
    ``STEP`` positions and are written in place (as mlx-lm's cache does), so a step does
    not copy the whole history.
    """

    STEP = 256

    def __init__(self, layers: int, left_padding: Sequence[int]):
        self.layers = [LayerKV(self) for _ in range(layers)]
        self.length = 0  # positions held, pads included
        pads = [int(p) for p in left_padding]
        # None when no row is padded: then the masks are the plain causal ones
        self.left_padding = mx.array(pads, dtype=mx.int32) if any(pads) else None

    @property
    def rope_offset(self) -> int | mx.array:
        """Position of the next token: an int, or one per row [B] when rows are padded."""
        return self.length if self.left_padding is None else self.length - self.left_padding

    def mask(self, L: int, dtype: mx.Dtype, explicit: bool = False) -> mx.array | None:
        """The additive mask for ``L`` new positions against the ``length + L`` held after
        them; None for one unpadded position (it sees everything) unless ``explicit``."""
        if self.left_padding is None:
            if L == 1 and not explicit:
                return None
            if self.length == 0:  # the same mask as the plain forward
                return nn.MultiHeadAttention.create_additive_causal_mask(L).astype(dtype)
        q = mx.arange(self.length, self.length + L)[:, None]
        k = mx.arange(self.length + L)[None]
        allowed = q >= k
        if self.left_padding is not None:
            # A pad query sees itself only: a row of all-masked scores is never formed.
            real_key = k[None] >= self.left_padding[:, None, None]
            allowed = ((allowed[None] & real_key) | (q == k)[None])[:, None]  # [B, 1, L, S]
        return mx.where(allowed, 0.0, mx.finfo(dtype).min).astype(dtype)


class LayerKV:
    """One layer's view of a :class:`KVCache`."""

    def __init__(self, owner: KVCache):
        self.owner = owner
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def rope_offset(self) -> int | mx.array:
        return self.owner.rope_offset

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append ``keys``/``values`` [B, H, L, d] and return everything held so far."""
        start = self.owner.length
        end = start + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            blocks = (end + KVCache.STEP - 1) // KVCache.STEP
            B, H, _, d = keys.shape
            grown_k = mx.zeros((B, H, blocks * KVCache.STEP, d), keys.dtype)
            grown_v = mx.zeros((B, H, blocks * KVCache.STEP, values.shape[3]), values.dtype)
            if self.keys is not None:
                grown_k[..., :start, :] = self.keys[..., :start, :]
                grown_v[..., :start, :] = self.values[..., :start, :]
            self.keys, self.values = grown_k, grown_v
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        return self.keys[..., :end, :], self.values[..., :end, :]


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.heads, self.kv_heads = config.heads, config.kv_heads
        self.head_dim = config.dim // config.heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.dim, config.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.heads * self.head_dim, config.dim, bias=False)
        self.rope = nn.RoPE(self.head_dim, base=config.rope_theta)

    def __call__(
        self,
        x: mx.array,
        mask: mx.array,
        return_weights: bool = False,
        cache: LayerKV | None = None,
    ):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.kv_heads, -1).transpose(0, 2, 1, 3)
        if cache is None:
            q, k = self.rope(q), self.rope(k)
        else:
            offset = cache.rope_offset
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
            k, v = cache.update(k, v)
        weights = None
        if return_weights:
            # Explicit attention: the fused kernel does not expose the weights.
            repeat = self.heads // self.kv_heads
            k_full = mx.repeat(k, repeat, axis=1) if repeat > 1 else k
            v_full = mx.repeat(v, repeat, axis=1) if repeat > 1 else v
            scores = (q * self.scale) @ k_full.transpose(0, 1, 3, 2) + mask
            weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)
            out = weights @ v_full
        else:
            out = ops.attention(q, k, v, self.scale, mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out), weights


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)

    def __call__(
        self,
        x: mx.array,
        mask: mx.array,
        return_weights: bool = False,
        cache: LayerKV | None = None,
    ):
        h, weights = self.attention(self.attention_norm(x), mask, return_weights, cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), weights


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = [Block(config) for _ in range(config.layers)]
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.dtype != "float32":
            self.set_dtype(DTYPES[config.dtype])
        # Set by the engine (train.checkpoint_layers): recompute each block in the backward.
        self.checkpoint_layers = False

    def __call__(
        self,
        input_ids: mx.array,
        capture: frozenset[str] = frozenset(),
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """The forward of ``input_ids`` [B, L]; with ``cache``, of L new positions after
        those the cache holds (which it then holds too)."""
        want_hidden = "hidden_states" in capture
        want_attn = "attentions" in capture
        x = self.embed(input_ids)
        L = input_ids.shape[1]
        if cache is None and not want_attn:
            mask = "causal"  # the attention kernels' own causal mask (kdcore.models.ops)
        elif cache is None:
            mask = nn.MultiHeadAttention.create_additive_causal_mask(L).astype(x.dtype)
        else:
            mask = cache.mask(L, x.dtype, explicit=want_attn)
        hidden = [x] if want_hidden else None
        attentions = [] if want_attn else None
        layer_caches = [None] * len(self.blocks) if cache is None else cache.layers
        recompute = self.checkpoint_layers and cache is None and not want_attn
        for block, layer_cache in zip(self.blocks, layer_caches):
            if recompute:
                x = checkpointed(block, lambda h, b=block: b(h, mask)[0], x)
                weights = None
            else:
                x, weights = block(x, mask, want_attn, layer_cache)
            if want_hidden:
                hidden.append(x)
            if want_attn:
                attentions.append(weights)
        if cache is not None:
            cache.length += L
        return ModelOutput(
            final_hidden=self.norm(x),
            head=self.output_head,
            head_weight=plain_head(self.embed if self.config.tie_embeddings else self.lm_head)[0],
            vocab=self.config.vocab_size,
            hidden_states=tuple(hidden) if want_hidden else None,
            attentions=tuple(attentions) if want_attn else None,
        )

    def output_head(self, hidden: mx.array) -> mx.array:
        """Final hidden states [..., D] -> logits [..., V] (tied or untied)."""
        return self.embed.as_linear(hidden) if self.config.tie_embeddings else self.lm_head(hidden)

    def make_cache(self, left_padding: Sequence[int]) -> KVCache:
        """An empty cache for a batch whose row ``b`` starts with ``left_padding[b]`` pads."""
        return KVCache(len(self.blocks), left_padding)

    def step(self, input_ids: mx.array, cache: KVCache) -> mx.array:
        """Run the new tokens ``input_ids`` [B, L] on ``cache``: the logits [B, V] after
        the last one (the head runs on that position only)."""
        return self.output_head(self(input_ids, cache=cache).final_hidden[:, -1, :])
