"""OpenAI-style completions with prompt log-probs, as vLLM and ``kd serve`` answer them:
the requests a served teacher sends and the parsers of the replies. Checked against real
servers (examples/served): llama.cpp's ``llama-server`` refuses ``echo``, and
llama-cpp-python's server takes text only, one prompt a request, and pairs each echoed
token with the distribution after it, which this module refuses (:func:`_check_count`).

Token ids in (``prompt = "ids"``, what vLLM and ``kd serve`` take): each row of a
``[B, L]`` batch is sent as its list of ids with one more token after it (any: a causal
model reads it last, so it changes nothing before it). Entry ``i`` of the prompt's
log-probs is the distribution of prompt token ``i`` given those before it (entry 0 is
null), so entries ``1 .. L`` are the distributions after each of the row's ``L`` tokens:
what a teacher's logits give. ``max_tokens`` is 1 (llama-cpp-python reads 0 as "until the
context is full").

Text in (``prompt = "text"``, for a server that takes no ids): each row is sent as the
run tokenizer's text of it, and the distribution after its last token is the one of the
generated token (``max_tokens`` 1). The server's ``/tokenize`` is checked against the run's
tokenizer first (:func:`tokenize_request`, :func:`parse_tokenize`), and special tokens the
server puts before the text (a BOS) are skipped.

Two reply forms: ``echo`` + ``logprobs`` (``choices[i].logprobs.tokens``/``top_logprobs``,
the prompt's then the generated token's; OpenAI's legacy form, vLLM) and vLLM's
``prompt_logprobs`` (``choices[i].prompt_logprobs``, one
``{"ID": {"logprob", "rank", "decoded_token"}}`` per prompt token, holding the top-k and
the prompt token itself; the generated token's in ``logprobs``).

Keys of ``top_logprobs`` are ``"token_id:N"`` when the server honours vLLM's
``return_tokens_as_token_ids`` (``kd serve`` does), else token text, looked up in the run's
tokenizer. OpenAI-style servers give no tail mass: it is ``log(1 - sum of the top-k
probabilities)``, exact when the server's log-probs are over its whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FLOOR = -1.0e4  # as kdcore.cache.format.FLOOR: exp(FLOOR) == 0 in float32 and float64
ID_PREFIX = "token_id:"
TOKENIZE_PATH = "/tokenize"
# llama-cpp-python's server has no /tokenize: its tokenizer answers at /extras/tokenize
# ({"input"} in, {"tokens": [ids]} out). Tried in this order, the next on a 404.
TOKENIZE_PATHS = (TOKENIZE_PATH, "/extras/tokenize")
# Text whose tokens the server's /tokenize must give as the run's tokenizer does: words,
# digits, spaces, punctuation and characters outside ASCII.
PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog.\n  Numbers 0123456789, 3.14 and -42; "
    "punctuation !?;:'\"()[]{}<>/\\|@#$%^&*_+=~`, accents café naïve, and 東京 ✓."
)
Lookup = Callable[[str], "int | None"]


def completions_request(
    ids: np.ndarray,
    k: int,
    model: str | None = None,
    form: str = "echo",
    text: list[str] | None = None,
) -> dict:
    """The ``/v1/completions`` request body for the ``[B, L]`` batch ``ids`` (``text``:
    each row's text, sent instead of its ids)."""
    if text is None:
        prompt: list = [[int(t) for t in row] + [int(row[-1])] for row in np.asarray(ids)]
    else:
        prompt = list(text)
    body = {
        "prompt": prompt,
        "max_tokens": 1,
        "temperature": 0.0,
        **({"echo": True} if form == "echo" else {"prompt_logprobs": int(k)}),
        "logprobs": int(k),
        "return_tokens_as_token_ids": True,
    }
    if text is not None:
        body["add_special_tokens"] = False  # vLLM's; llama.cpp may still add a BOS
    if model:
        body["model"] = model
    return body


def tokenize_request(text: str, model: str | None = None) -> dict:
    """A ``/tokenize`` body llama.cpp (``content``, ``add_special``), vLLM (``prompt``,
    ``add_special_tokens``) and llama-cpp-python (``input``) read: the text's tokens, no
    special ones (llama-cpp-python adds a BOS where its model does)."""
    body = {"content": text, "prompt": text, "add_special": False, "add_special_tokens": False}
    body["input"] = text
    if model:
        body["model"] = model
    return body


def parse_tokenize(reply: dict) -> list[int]:
    """The ids of a ``/tokenize`` reply: ``{"tokens": [ids]}`` (vLLM, llama.cpp) or
    ``{"tokens": [{"id", "piece"}]}`` (llama.cpp with ``with_pieces``)."""
    tokens = reply.get("tokens") if isinstance(reply, dict) else None
    if not isinstance(tokens, list):
        raise ValueError("its /tokenize reply has no list of tokens")
    ids = [t.get("id") if isinstance(t, dict) else t for t in tokens]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError("its /tokenize reply holds tokens that are not ids")
    return ids


def token_id(key: str, lookup: Lookup | None) -> int | None:
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
    lookup: Lookup | None = None,
    text: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top-k ids int32 [B, L, k], log-probs float32 [B, L, k], tail float32 [B, L]) from a
    reply to :func:`completions_request` in either form (``text``: the rows were sent as
    text); ``ValueError`` saying what does not fit."""
    ids = np.asarray(ids)
    B, L = ids.shape
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or len(choices) != B:
        got = len(choices) if isinstance(choices, list) else "no"
        raise ValueError(f"{got} choices for a batch of {B} rows")
    choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
    _check_count(reply, choices)
    out_ids = np.empty((B, L, k), np.int32)
    out_lp = np.empty((B, L, k), np.float32)
    for b, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise ValueError(f"row {b}: its choice is not an object")
        dists = _row_distributions(choice, ids[b], b, k, lookup, text)
        for t in range(L):
            entry = dists[t]
            if len(entry) < k:
                raise ValueError(
                    f"row {b}, position {t}: {len(entry)} log-probs where top_k = {k} were "
                    "asked (many servers give at most 20)"
                )
            pairs = sorted(((lp, tid) for tid, lp in entry.items()), key=lambda p: -p[0])
            out_lp[b, t] = [p[0] for p in pairs[:k]]
            out_ids[b, t] = [p[1] for p in pairs[:k]]
    if not np.all(np.isfinite(out_lp) | (out_lp == -np.inf)) or np.any(out_lp > 1e-4):
        raise ValueError("log-probs that are NaN or above 0")
    out_lp = np.maximum(out_lp, FLOOR)
    return out_ids, out_lp, tail_logmass(out_lp)


def _row_distributions(
    choice: dict, row: np.ndarray, b: int, k: int, lookup: Lookup | None, text: bool
) -> list[dict[int, float]]:
    """The ``L`` distributions after each token of ``row``, as ``{id: log-prob}``."""
    L = len(row)
    sent = L if text else L + 1  # ids go with one extra token; text gets one generated
    logprobs = choice.get("logprobs")
    top = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    # vLLM answers an echo request with its prompt_logprobs too (it makes the echo from them):
    # its top_logprobs then holds the prompt's entries already, the first one null
    echo_reply = isinstance(top, list) and bool(top) and top[0] is None
    generated_top: list = []
    if choice.get("prompt_logprobs") is not None and not echo_reply:
        prompt = choice["prompt_logprobs"]
        if not isinstance(prompt, list):
            raise ValueError(f"row {b}: prompt_logprobs is not a list")
        dists = [_vllm_entry(e, b, i, k) for i, e in enumerate(prompt)]
        echoed = choice.get("prompt_token_ids")
        echoed = [int(t) for t in echoed] if isinstance(echoed, list) else None
        skip = len(prompt) - sent
        if isinstance(logprobs, dict) and isinstance(logprobs.get("top_logprobs"), list):
            generated_top = logprobs["top_logprobs"]
        dists += [_echo_entry(e, b, i, lookup) for i, e in enumerate(generated_top)]
    else:
        if not isinstance(top, list) or len(top) < sent:
            have = len(top) if isinstance(top, list) else "no"
            raise ValueError(
                f"row {b}: {have} echoed top_logprobs for a prompt of {sent} tokens "
                "(does the server echo prompt log-probs?)"
            )
        tokens = logprobs.get("tokens")
        echoed = None
        if isinstance(tokens, list):
            named = [token_id(str(t), lookup) for t in tokens]
            echoed = None if None in named else named
        skip = _echo_skip(echoed, row, len(top), sent, b, text)
        dists = [_echo_entry(e, b, i, lookup) if i else {} for i, e in enumerate(top)]
    if skip < 0:
        raise ValueError(f"row {b}: the server scored {sent + skip} prompt tokens, {sent} sent")
    if skip and not text:
        raise ValueError(
            f"row {b}: the server scored {sent + skip} prompt tokens for the {sent} ids sent "
            "(does the server add a BOS token?)"
        )
    if echoed is not None:
        _check_echo(echoed[skip : skip + L], row, b)
    wanted = dists[skip + 1 : skip + 1 + L]
    if len(wanted) < L:
        raise ValueError(
            f"row {b}: log-probs for {len(wanted)} of its {L} positions (no generated "
            "token's log-probs for the last one?)"
        )
    return wanted


def _check_count(reply: dict, choices: list) -> None:
    """An echo reply has one log-prob entry per token its ``usage`` counts (prompt and
    generated, as vLLM and ``kd serve`` give them). Fewer: the server left some out, and
    the rest cannot be placed. llama-cpp-python's server (0.3.x) is one: it pairs each
    echoed prompt token with the distribution *after* it and leaves out the generated
    token's (and every token equal to its BOS id)."""
    usage = reply.get("usage")
    if not isinstance(usage, dict) or any("prompt_logprobs" in c for c in choices):
        return
    counted = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in counted):
        return
    entries = 0
    for choice in choices:
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        top = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
        entries += len(top) if isinstance(top, list) else 0
    if entries < sum(counted):
        raise ValueError(
            f"{entries} echoed log-prob entries for the {counted[0]} prompt and {counted[1]} "
            "generated tokens its usage counts: the server leaves entries out, so the others "
            "cannot be placed (llama-cpp-python's server pairs each echoed prompt token with "
            "the distribution after it and leaves out the generated token's, "
            "abetlen/llama-cpp-python#1983); serve the teacher with vLLM or kd serve"
        )


def _echo_skip(echoed, row, entries: int, sent: int, b: int, text: bool) -> int:
    """How many echoed tokens the server put before the row (a BOS): found by matching
    the echoed ids when they are known, else from the count (one token generated)."""
    if not text:
        return 0  # checked by _check_echo: a BOS shows as a difference at position 0
    L = len(row)
    if echoed is not None:
        sent_ids = [int(t) for t in row]
        skips = range(0, min(4, len(echoed)))
        for skip in skips:
            if echoed[skip : skip + L] == sent_ids:
                return skip
        # no match: where the row seems to start, for _check_echo to report the difference
        return next((skip for skip in skips if echoed[skip] == sent_ids[0]), 0)
    return entries - 1 - sent


def _vllm_entry(entry, b: int, i: int, k: int) -> dict[int, float]:
    """One ``prompt_logprobs`` entry: ``{"ID": {"logprob", "rank", "decoded_token"}}`` (or
    ``{"ID": logprob}``); entry 0 is null. The prompt token itself is there too: kept only
    when its ``rank`` is within the top ``k``."""
    if entry is None:
        return {}
    if not isinstance(entry, dict):
        raise ValueError(f"row {b}: prompt_logprobs[{i}] is not an object")
    out = {}
    for key, value in entry.items():
        lp = value.get("logprob") if isinstance(value, dict) else value
        rank = value.get("rank") if isinstance(value, dict) else None
        if isinstance(rank, int) and rank > k:
            continue
        try:
            out[int(key)] = float(lp)
        except (TypeError, ValueError):
            raise ValueError(
                f"row {b}: prompt_logprobs[{i}] has {key!r}: {value!r}, not id: log-prob"
            ) from None
    return out


def _echo_entry(entry, b: int, i: int, lookup: Lookup | None) -> dict[int, float]:
    if not isinstance(entry, dict):
        raise ValueError(f"row {b}: top_logprobs[{i}] is not an object")
    out = {}
    for key, value in entry.items():
        tid = token_id(str(key), lookup)
        if tid is None:
            raise ValueError(
                f"row {b}, entry {i}: token {key!r} is not in the vocabulary (ask the server "
                "for ids: vLLM's return_tokens_as_token_ids)"
            )
        out[tid] = float(value)
    return out


def _check_echo(echoed: list[int], row: np.ndarray, b: int) -> None:
    """The echoed prompt must be the one sent (a server that adds a BOS token shifts it)."""
    sent = [int(t) for t in row]
    if echoed != sent[: len(echoed)] or len(echoed) < len(sent):
        diffs = [i for i, (a, e) in enumerate(zip(sent, echoed, strict=False)) if a != e]
        first = diffs[0] if diffs else min(len(sent), len(echoed))
        raise ValueError(
            f"row {b}: the echoed prompt differs from the ids sent from position {first} "
            "on (does the server add a BOS token, or tokenize the text otherwise?)"
        )
