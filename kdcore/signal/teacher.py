"""One teacher-signal type for live logits, top-k caches and mixtures of teachers.

Losses ask a signal for log-probabilities at a temperature; they do not need to know
whether it came from a live teacher, an offline cache or an aggregator.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import mlx.core as mx


def stable_log_softmax(z: mx.array, axis: int = -1) -> mx.array:
    """``log softmax(z)`` along ``axis``, the row maximum subtracted first.

    ``z - logsumexp(z)`` loses the difference of two numbers near ``max(z)``: at logits near
    1e4 float32 keeps ~1e-3 of it, and probabilities summed to 1.000465. Shifted, the large
    entries are near 0 and the log-sum is at most ``log V``. The shift carries no gradient,
    which is exact (log-softmax ignores a constant shift)."""
    z = z - mx.stop_gradient(mx.max(z, axis=axis, keepdims=True))
    return z - mx.logsumexp(z, axis=axis, keepdims=True)


@attrs.frozen(eq=False)
class TeacherSignal:
    """What a teacher tells the student about one batch.

    Exactly one of the three forms is set:

    - dense: ``logits`` [B, L, V] at temperature 1, or ``final_hidden`` [B, L, D] and
      ``head`` (``[..., D] -> [..., V]``), from which ``logits`` are made on first use: the
      engine's fused path reads ``final_hidden`` and ``head`` chunk by chunk instead, so a
      live teacher's ``[B, L, V]`` logits never exist unless something asks for them;
    - sparse: ``topk_ids`` / ``topk_logprobs`` [B, L, K] (log-probabilities at
      ``capture_temperature``) and ``tail_logmass`` [B, L] (log of the mass outside the top-k);
    - mixture: ``members`` (signals) and ``weights`` ([B, M] or [B, L, M], rows sum to 1);
      the mixture's distribution at temperature T is ``sum_m w_m softmax(z_m / T)``.

    ``hidden_states`` and ``attentions`` are per-layer tuples when a component required them.
    """

    vocab_size: int
    _logits: mx.array | None = attrs.field(default=None, alias="logits")
    topk_ids: mx.array | None = None
    topk_logprobs: mx.array | None = None
    tail_logmass: mx.array | None = None
    capture_temperature: float = 1.0
    members: tuple[TeacherSignal, ...] | None = None
    weights: mx.array | None = None
    hidden_states: tuple[mx.array, ...] | None = None
    attentions: tuple[mx.array, ...] | None = None
    final_hidden: mx.array | None = None
    head: Callable[[mx.array], mx.array] | None = None

    def __attrs_post_init__(self) -> None:
        dense = self._logits is not None or (
            self.final_hidden is not None and self.head is not None
        )
        forms = [dense, self.topk_ids is not None, self.members is not None]
        if sum(forms) != 1:
            raise ValueError("a TeacherSignal is exactly one of: dense, sparse, mixture")

    @property
    def logits(self) -> mx.array | None:
        """[B, L, V] for a dense signal (made once from ``head(final_hidden)`` when only
        those were given), None otherwise."""
        if self._logits is None and self.head is not None and self.final_hidden is not None:
            object.__setattr__(self, "_logits", self.head(self.final_hidden))
        return self._logits

    def with_logits(self, logits: mx.array, **changes) -> TeacherSignal:
        """This signal with new dense ``logits`` (an aligner's output): the hidden states
        and head that made the old ones no longer describe it and are dropped."""
        return attrs.evolve(self, logits=logits, final_hidden=None, head=None, **changes)

    @property
    def has_logits(self) -> bool:
        """Whether ``[B, L, V]`` logits exist already (the fused path avoids making them)."""
        return self._logits is not None

    @property
    def is_dense(self) -> bool:
        return self._logits is not None or self.final_hidden is not None

    @property
    def is_sparse(self) -> bool:
        if self.members is not None:
            return any(m.is_sparse for m in self.members)
        return self.topk_ids is not None

    @property
    def shape(self) -> tuple[int, int]:
        """(batch, length) of the token positions."""
        if self._logits is not None:
            return tuple(self._logits.shape[:2])
        if self.final_hidden is not None:
            return tuple(self.final_hidden.shape[:2])
        if self.topk_ids is not None:
            return tuple(self.topk_ids.shape[:2])
        return self.members[0].shape

    def log_probs(self, temperature: float | mx.array = 1.0) -> mx.array:
        """Dense log-probabilities [B, L, V] at ``temperature`` (float32)."""
        if self.logits is not None:
            return stable_log_softmax(self.logits.astype(mx.float32) / temperature)
        if self.members is not None:
            weights = self.weights
            if weights.ndim == 2:  # per instance -> per token
                weights = weights[:, None, :]
            stacked = mx.stack([m.log_probs(temperature) for m in self.members], axis=-1)
            return mx.logsumexp(stacked + mx.log(mx.maximum(weights, 1e-30))[..., None, :], -1)
        raise ValueError(
            "this teacher signal is a top-k cache: use sparse_log_probs(), or a loss that "
            "declares 'sparse_ok'"
        )

    def sparse_log_probs(
        self, temperature: float | mx.array = 1.0, tail: str = "renormalize"
    ) -> tuple[mx.array, mx.array]:
        """Top-k ids and log-probabilities re-tempered to ``temperature``.

        The stored values are ``log p_i = z_i / Tc - log Z`` at the capture temperature Tc,
        so ``z_i / T = (log p_i + log Z) * Tc / T``; the unknown ``log Z`` cancels when the
        result is normalised. ``tail="renormalize"`` returns [B, L, K] normalised over the
        top-k. ``tail="tail-bucket"`` returns [B, L, K+1] with the tail mass as a (k+1)-th
        class, re-tempered as if it were one token (exact at T = Tc).
        """
        if self.topk_ids is None:
            raise ValueError("sparse_log_probs() needs a top-k signal")
        scale = self.capture_temperature / temperature
        logp = self.topk_logprobs.astype(mx.float32)
        if tail == "tail-bucket":
            logp = mx.concatenate([logp, self.tail_logmass.astype(mx.float32)[..., None]], -1)
        elif tail != "renormalize":
            raise ValueError(f"unknown tail policy {tail!r}: 'renormalize' or 'tail-bucket'")
        return self.topk_ids, stable_log_softmax(logp * scale)


def dense_signal(logits: mx.array, **extra) -> TeacherSignal:
    return TeacherSignal(vocab_size=logits.shape[-1], logits=logits, **extra)


def output_signal(out, cls: type[TeacherSignal] = TeacherSignal, **extra) -> TeacherSignal:
    """A frozen teacher's signal from its ``ModelOutput``: hidden states and head when the
    model gives them (logits made only on demand), else its logits; all without gradient.
    ``extra`` are further fields (``position_mask`` of an :class:`AlignedSignal`)."""
    sg = mx.stop_gradient
    common = dict(
        hidden_states=tuple(sg(h) for h in out.hidden_states) if out.hidden_states else None,
        attentions=tuple(sg(a) for a in out.attentions) if out.attentions else None,
    )
    common.update(extra)
    if not out.has_logits and out.final_hidden is not None and out.head is not None:
        head = out.head
        return cls(
            vocab_size=out.vocab_size,
            final_hidden=sg(out.final_hidden),
            head=lambda x: sg(head(x)),
            **common,
        )
    return cls(vocab_size=out.logits.shape[-1], logits=sg(out.logits), **common)
