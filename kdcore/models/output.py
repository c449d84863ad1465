"""What every model returns: logits on demand, from the final hidden states and the head."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import mlx.core as mx


@attrs.define(eq=False)
class ModelOutput:
    """One forward pass of a model.

    ``logits`` [B, L, V] are computed on first use from ``final_hidden`` [B, L, D] (after
    the final norm) and ``head`` (the output projection, ``[..., D] -> [..., V]``), so a
    loss that works token chunk by token chunk can call ``head`` on slices of
    ``final_hidden`` and the full logits never exist. A model may also pass ``logits``
    directly (then ``final_hidden`` and ``head`` may be None).

    ``head_weight`` [V, D] and ``head_bias`` [V] (or None) are the head's parameters when it
    is a plain linear map ``x @ W.T (+ b)`` (a tied embedding or an untied ``lm_head``):
    the engine's fused loss path needs them to send gradients to the head without the
    logits; a head without them (quantized, soft-capped) takes the full-logit path.

    ``hidden_states`` (embeddings then each layer, [B, L, D]) and ``attentions`` (each
    layer, [B, H, L, L]) are there only when the caller asked for them in ``capture``.
    """

    _logits: mx.array | None = attrs.field(default=None, alias="logits")
    hidden_states: tuple[mx.array, ...] | None = None
    attentions: tuple[mx.array, ...] | None = None
    final_hidden: mx.array | None = None
    head: Callable[[mx.array], mx.array] | None = None
    head_weight: mx.array | None = None
    head_bias: mx.array | None = None
    vocab: int | None = None  # the head's output width, when known without the logits

    def __attrs_post_init__(self) -> None:
        if self._logits is None and (self.final_hidden is None or self.head is None):
            raise ValueError("a ModelOutput needs logits, or final_hidden and head")

    @property
    def logits(self) -> mx.array:
        """[B, L, V]; computed once from ``head(final_hidden)`` when not given."""
        if self._logits is None:
            self._logits = self.head(self.final_hidden)
        return self._logits

    @property
    def vocab_size(self) -> int:
        if self._logits is not None:
            return self._logits.shape[-1]
        if self.vocab is not None:
            return self.vocab
        if self.head_weight is not None:
            return self.head_weight.shape[0]
        return self.logits.shape[-1]

    @property
    def has_logits(self) -> bool:
        """Whether the full logits exist already (a chunked loss can avoid making them)."""
        return self._logits is not None

    def logits_of(self, hidden: mx.array) -> mx.array:
        """Logits of some rows of ``final_hidden`` (a token chunk), through the same head."""
        if self.head is None:
            raise ValueError("this ModelOutput was given logits only: it has no head")
        return self.head(hidden)


def plain_head(layer) -> tuple[mx.array | None, mx.array | None]:
    """``(weight, bias)`` of an ``nn.Linear`` or ``nn.Embedding`` used as the output head,
    or ``(None, None)`` when it is not a plain matrix (a quantized layer keeps packed
    integers and scales: the fused path cannot differentiate through it)."""
    if "scales" in layer or "weight" not in layer:
        return None, None
    return layer["weight"], layer.get("bias")
