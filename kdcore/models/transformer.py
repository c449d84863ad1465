"""A small decoder-only transformer (RMSNorm, RoPE, grouped-query attention, SwiGLU).

Sized for the bundled examples and the tests; the shape follows mlx-lm's llama.
Hidden states and attention maps are returned only when asked for, so the plain
forward uses the fused attention kernel.
"""

from __future__ import annotations

import attrs
import mlx.core as mx
import mlx.nn as nn

from kdcore.models.output import ModelOutput
from kdcore.spec.schedules import Schedule
from kdcore.spec.schema import positive


def _size(instance, attribute, value) -> None:
    """A size: > 0, and a plain number (a model's shape cannot follow a schedule)."""
    if isinstance(value, Schedule):
        raise ValueError(f"{attribute.name} must be a number, not a schedule")
    positive(instance, attribute, value)


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

    def __call__(self, x: mx.array, mask: mx.array, return_weights: bool = False):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.rope(q), self.rope(k)
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
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out), weights


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array, mask: mx.array, return_weights: bool = False):
        h, weights = self.attention(self.attention_norm(x), mask, return_weights)
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

    def __call__(self, input_ids: mx.array, capture: frozenset[str] = frozenset()) -> ModelOutput:
        want_hidden = "hidden_states" in capture
        want_attn = "attentions" in capture
        x = self.embed(input_ids)
        L = input_ids.shape[1]
        mask = nn.MultiHeadAttention.create_additive_causal_mask(L).astype(x.dtype)
        hidden = [x] if want_hidden else None
        attentions = [] if want_attn else None
        for block in self.blocks:
            x, weights = block(x, mask, want_attn)
            if want_hidden:
                hidden.append(x)
            if want_attn:
                attentions.append(weights)
        return ModelOutput(
            final_hidden=self.norm(x),
            head=self.output_head,
            hidden_states=tuple(hidden) if want_hidden else None,
            attentions=tuple(attentions) if want_attn else None,
        )

    def output_head(self, hidden: mx.array) -> mx.array:
        """Final hidden states [..., D] -> logits [..., V] (tied or untied)."""
        return self.embed.as_linear(hidden) if self.config.tie_embeddings else self.lm_head(hidden)
