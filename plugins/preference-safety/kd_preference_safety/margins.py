"""Response log-likelihoods and preference margins of a batch of chosen/rejected rows.

For a row r with response mask m and next-token targets y, the (length-normalised) response
log-likelihood is ``ll_r = sum_t m_t log p(y_t | y_<t) / max(sum_t m_t, 1)``; without
normalisation the division is dropped. A pair's margin is ``ll_chosen - ll_rejected``.

Pairs are found through the batch arrays ``pair_id`` (row -> pair, -1 = none) and
``pair_chosen`` (1 chosen, 0 rejected), so any row order works and an unpaired row is
ignored. The pair matrix ``S`` [P, R] has +1 at a pair's chosen row and -1 at its rejected
row; then ``margins = S @ ll``. A pair is valid when it has exactly one chosen and one
rejected row.
"""

from __future__ import annotations

import mlx.core as mx

from kdcore import IGNORE_INDEX, TeacherSignal, token_cross_entropy

PAIR_KEYS = ("pair_chosen", "pair_id")


def require_pairs(batch: dict, name: str) -> None:
    missing = [k for k in PAIR_KEYS if k not in batch]
    if missing:
        raise ValueError(
            f"loss {name!r} needs preference pairs in the batch (missing {missing}); "
            "use the 'pairs' dataset"
        )


def pair_matrix(batch: dict) -> tuple[mx.array, mx.array]:
    """(S [P, R] with +1 chosen / -1 rejected, valid [P] float) with P = max(R // 2, 1)."""
    pair_id = batch["pair_id"].astype(mx.int32)
    chosen = batch["pair_chosen"].astype(mx.float32)
    rows = pair_id.shape[0]
    count = max(rows // 2, 1)
    member = (pair_id[None, :] == mx.arange(count)[:, None]).astype(mx.float32)
    n_chosen = (member * chosen[None, :]).sum(-1)
    n_rejected = (member * (1.0 - chosen[None, :])).sum(-1)
    valid = ((n_chosen == 1) & (n_rejected == 1)).astype(mx.float32)
    return member * (2.0 * chosen[None, :] - 1.0), valid


def pair_flag(batch: dict, key: str, S: mx.array) -> mx.array:
    """A per-row 0/1 array (``safety``) as a per-pair one [P]: 1 if any row of the pair has it."""
    return (mx.abs(S) * batch[key].astype(mx.float32)[None, :]).max(-1)


def _reduce(token_ll: mx.array, mask: mx.array, normalize: bool) -> mx.array:
    mask = mask.astype(mx.float32)
    total = (token_ll * mask).sum(-1)
    return total / mx.maximum(mask.sum(-1), 1.0) if normalize else total


def logits_response_ll(
    logits: mx.array, labels: mx.array, mask: mx.array, normalize: bool = True
) -> mx.array:
    """Response log-likelihood per row [R] from logits [R, L, V] (float32)."""
    return _reduce(-token_cross_entropy(logits, labels), mask, normalize)


def logprobs_response_ll(
    log_probs: mx.array, labels: mx.array, mask: mx.array, normalize: bool = True
) -> mx.array:
    """Response log-likelihood per row [R] from log-probabilities [R, L, V]."""
    safe = mx.where(labels == IGNORE_INDEX, 0, labels)
    picked = mx.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return _reduce(mx.where(labels == IGNORE_INDEX, 0.0, picked), mask, normalize)


def signal_response_ll(
    signal: TeacherSignal, labels: mx.array, mask: mx.array, normalize: bool = True
) -> mx.array:
    """Response log-likelihood per row [R] under a dense or mixture teacher signal."""
    if signal.logits is not None:
        return logits_response_ll(signal.logits, labels, mask, normalize)
    if signal.members is not None:
        return logprobs_response_ll(signal.log_probs(1.0), labels, mask, normalize)
    raise ValueError(
        "preference margins need the teacher's probability of every response token; a top-k "
        "cache does not have it: use a live teacher"
    )


def row_weights(weights: mx.array, mask: mx.array) -> mx.array:
    """Mixture weights [R, K] per row from [R, K] or per-token [R, L, K] (mean over the
    response tokens; over all tokens where a row has none)."""
    if weights.ndim == 2:
        return weights.astype(mx.float32)
    mask = mask.astype(mx.float32)
    has = (mask.sum(-1, keepdims=True) > 0).astype(mx.float32)
    m = has * mask + (1.0 - has) * mx.ones_like(mask)
    return (weights * m[..., None]).sum(1) / m.sum(-1, keepdims=True)


def teacher_margins(
    signal: TeacherSignal, batch: dict, S: mx.array, normalize: bool = True
) -> mx.array:
    """Teacher margins [P].

    One teacher: ``S @ ll_teacher``. A mixture of K teachers: each member's margin
    ``mu_k = S @ ll_k``, combined with the aggregator's weights for the pair (the mean of its
    two rows' weights): ``margin = sum_k w_pk mu_pk``. Margins of the members, not the
    margin of the mixture distribution: a preference is a property of each teacher.
    """
    labels, mask = batch["labels"], batch["mask"]
    if signal.members is None:
        return S @ signal_response_ll(signal, labels, mask, normalize)
    member_margins = mx.stack(
        [teacher_margins(m, batch, S, normalize) for m in signal.members], axis=-1
    )
    w = row_weights(signal.weights, mask)
    absS = mx.abs(S)
    w_pair = (absS @ w) / mx.maximum(absS.sum(-1, keepdims=True), 1.0)
    return (member_margins * w_pair).sum(-1)


def pair_mean(values: mx.array, valid: mx.array) -> mx.array:
    """Mean of ``values`` [P] over valid pairs; 0 when there are none."""
    return (values * valid).sum() / mx.maximum(valid.sum(), 1.0)
