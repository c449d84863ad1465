"""What every model returns."""

from __future__ import annotations

import attrs
import mlx.core as mx


@attrs.frozen(eq=False)
class ModelOutput:
    """``logits`` [B, L, V]; ``hidden_states`` (embeddings then each layer, [B, L, D]) and
    ``attentions`` (each layer, [B, H, L, L]) only when the caller asked for them."""

    logits: mx.array
    hidden_states: tuple[mx.array, ...] | None = None
    attentions: tuple[mx.array, ...] | None = None
