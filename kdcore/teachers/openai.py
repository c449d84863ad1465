"""OpenAI-style completions with prompt log-probs, as vLLM, llama.cpp's servers and
``kd serve`` answer them: the request a served teacher sends and the parser of the reply.

Each row of a ``[B, L]`` batch is sent as a list of token ids with one more token after it
(any: a causal model reads it last, so it changes nothing before it), ``echo`` on and
``logprobs = k``. Entry ``i`` of the echoed ``top_logprobs`` is the distribution of prompt
token ``i`` given those before it (entry 0 is null), so entries ``1 .. L`` are the
distributions after each of the row's ``L`` tokens: what a teacher's logits give.
``max_tokens`` is 1, its token ignored (llama-cpp-python reads 0 as "until the context is
full").

Keys of ``top_logprobs`` are ``"token_id:N"`` when the server honours vLLM's
``return_tokens_as_token_ids`` (``kd serve`` does), else token strings, looked up in the
run's tokenizer. OpenAI-style servers give no tail mass: it is ``log(1 - sum of the top-k
probabilities)``, exact when the server's log-probs are over its whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FLOOR = -1.0e4  # as kdcore.cache.format.FLOOR: exp(FLOOR) == 0 in float32 and float64
ID_PREFIX = "token_id:"


def completions_request(ids: np.ndarray, k: int, model: str | None = None) -> dict:
    """The ``/v1/completions`` request body for the ``[B, L]`` batch ``ids``."""
    body = {
        "prompt": [[int(t) for t in row] + [int(row[-1])] for row in np.asarray(ids)],
        "max_tokens": 1,
        "temperature": 0.0,
        "echo": True,
        "logprobs": int(k),
        "return_tokens_as_token_ids": True,
    }
    if model:
        body["model"] = model
    return body


def token_id(key: str, lookup: Callable[[str], int | None] | None) -> int | None:
    """The id of a ``top_logprobs`` key (None: unknown)."""
    if key.startswith(ID_PREFIX):
        try:
            return int(key[len(ID_PREFIX) :])
        except ValueError:
            return None
    return lookup(key) if lookup is not None else None


def tail_logmass(logprobs: np.ndarray) -> np.ndarray:
    """``log(1 - sum exp(logprobs))`` over the last axis, in float64, floored at FLOOR."""
    mass = np.exp(logprobs.astype(np.float64)).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.log1p(-np.minimum(mass, 1.0))
    return np.maximum(np.nan_to_num(tail, nan=FLOOR, neginf=FLOOR), FLOOR).astype(np.float32)


def parse_completions(
    reply: dict,
    ids: np.ndarray,
    k: int,
    lookup: Callable[[str], int | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top-k ids int32 [B, L, k], log-probs float32 [B, L, k], tail float32 [B, L]) from a
    reply to :func:`completions_request`; ``ValueError`` saying what does not fit."""
    ids = np.asarray(ids)
    B, L = ids.shape
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or len(choices) != B:
        got = len(choices) if isinstance(choices, list) else "no"
        raise ValueError(f"{got} choices for a batch of {B} rows")
    choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
    out_ids = np.empty((B, L, k), np.int32)
    out_lp = np.empty((B, L, k), np.float32)
    for b, choice in enumerate(choices):
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        top = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
        if not isinstance(top, list) or len(top) < L + 1:
            have = len(top) if isinstance(top, list) else "no"
            raise ValueError(
                f"row {b}: {have} echoed top_logprobs for a prompt of {L + 1} tokens "
                "(does the server echo prompt log-probs?)"
            )
        _check_echo(logprobs.get("tokens"), ids[b], b, lookup)
        for t in range(L):
            entry = top[t + 1]
            if not isinstance(entry, dict) or len(entry) < k:
                n = len(entry) if isinstance(entry, dict) else 0
                raise ValueError(
                    f"row {b}, position {t}: {n} log-probs where top_k = {k} were asked "
                    "(many servers give at most 20)"
                )
            pairs = []
            for key, value in entry.items():
                tid = token_id(str(key), lookup)
                if tid is None:
                    raise ValueError(
                        f"row {b}, position {t}: token {key!r} is not in the vocabulary"
                    )
                pairs.append((float(value), tid))
            pairs.sort(key=lambda p: -p[0])
            out_lp[b, t] = [p[0] for p in pairs[:k]]
            out_ids[b, t] = [p[1] for p in pairs[:k]]
    if not np.all(np.isfinite(out_lp) | (out_lp == -np.inf)) or np.any(out_lp > 1e-4):
        raise ValueError("log-probs that are NaN or above 0")
    out_lp = np.maximum(out_lp, FLOOR)
    return out_ids, out_lp, tail_logmass(out_lp)


def _check_echo(tokens, row: np.ndarray, b: int, lookup=None) -> None:
    """The echoed prompt must be the one sent (a server that adds a BOS token shifts it)."""
    if not isinstance(tokens, list):
        return
    sent = [int(t) for t in row]
    echoed = [token_id(str(t), lookup) for t in tokens[: len(sent)]]
    if None in echoed:  # a token string the run's vocabulary does not hold: not comparable
        return
    if echoed != sent:
        diffs = [i for i, (a, e) in enumerate(zip(sent, echoed, strict=False)) if a != e]
        first = diffs[0] if diffs else min(len(sent), len(echoed))
        raise ValueError(
            f"row {b}: the echoed prompt differs from the ids sent from position {first} "
            "on (does the server add a BOS token?)"
        )
