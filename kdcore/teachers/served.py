"""The ``server`` teacher source: a teacher behind ``kd serve`` or an OpenAI-style
completions server that returns prompt log-probs (vLLM, llama.cpp), named by
``[[teachers]] server = "http://host:port"``.

Each batch's token ids go to the server and each position's top-k log-probs come back as
a sparse :class:`~kdcore.signal.teacher.TeacherSignal`, the form a top-k cache gives, so
every loss that trains from a cache trains from a server. The token (``token_env`` names
the environment variable holding it) is sent as ``Authorization: Bearer`` and never
written anywhere: the spec and the run folder hold the variable's name only.

Faults: each request has a time limit (``timeout_s``); a server that does not answer, or
answers 429, 500, 502, 503 or 504, is tried again after ``backoff_s``, doubling (at most
30 s), up to ``retries`` times and ``wait_s`` seconds; then
:class:`kdcore.errors.ServerError` names the server, and the training loop saves the state
of the last finished step and says how to resume. A reply of the wrong shape or
vocabulary is refused with the reason. TLS certificates are verified (Python's default
context); redirects are not followed (they would carry the token elsewhere).

While the student trains, the requests for the next batches are in flight
(``prefetch``, :mod:`kdcore.teachers.prefetch`); a server that takes no token ids gets
text, its ``/tokenize`` checked against the run's tokenizer first (``prompt = "text"``,
:mod:`kdcore.teachers.openai`).
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Literal

import attrs
import mlx.core as mx
import numpy as np

from kdcore.errors import ServerError, SpecError
from kdcore.signal.teacher import TeacherSignal
from kdcore.spec.validators import in_range, non_negative, positive
from kdcore.teachers import openai, wire
from kdcore.teachers.mlxlm import run_tokenizer
from kdcore.teachers.prefetch import Prefetcher
from kdcore.tokenizers.simple import fingerprint

RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_BACKOFF_S = 30.0


@attrs.define
class ServedTeacherConfig:
    """``protocol``: ``"kd"`` (``kd serve``'s binary top-k) or ``"openai"`` (completions with
    ``echo`` and ``logprobs``); ``model``: the name sent to the server; ``token_env``: the
    environment variable that holds the bearer token; ``top_k``: log-probs per position;
    ``vocab_size``: the teacher's vocabulary (``openai`` only; None: the run tokenizer's);
    ``rows_per_request``: the most rows one request carries (None: a whole batch; 1 for a
    server that takes one prompt a request, as llama-cpp-python's)."""

    protocol: Literal["kd", "openai"] = "kd"
    model: str | None = None
    token_env: str | None = None
    top_k: int = attrs.field(default=20, validator=in_range(1, 1 << 16))
    timeout_s: float = attrs.field(default=60.0, validator=positive)
    retries: int = attrs.field(default=5, validator=in_range(0, 1000))
    backoff_s: float = attrs.field(default=1.0, validator=positive)
    wait_s: float = attrs.field(default=300.0, validator=non_negative)
    vocab_size: int | None = attrs.field(default=None, validator=positive)
    prefetch: int = attrs.field(default=2, validator=in_range(0, 64))
    prompt: Literal["ids", "text"] = "ids"
    form: Literal["echo", "prompt_logprobs"] = "echo"
    rows_per_request: int | None = attrs.field(default=None, validator=positive)


class _Transient(Exception):
    """A failure worth another try: no answer, or a busy or restarting server."""

    def __init__(self, reason: str, retry_after: float = 0.0, status: int | None = None):
        super().__init__(reason)
        self.retry_after = retry_after
        self.status = status  # the HTTP status when the server answered


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx becomes an HTTPError: the token is never sent elsewhere


def server_address(url: str, where: str) -> str:
    """``url`` checked (http or https, a host, no user:password) without a trailing slash."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError(f"server must be an http:// or https:// address, got {url!r} @ {where}")
    if parts.username or parts.password:
        raise SpecError(f"put the server's credentials in token_env, not in its address @ {where}")
    return url.rstrip("/")


class ServedTeacher:
    """A teacher behind an HTTP server (module docstring); ``signal`` sends the batch."""

    def __init__(self, config: ServedTeacherConfig, setup: Any):
        ref = setup.teacher
        teachers = getattr(setup.spec, "teachers", None) or [ref]
        index = next((i for i, t in enumerate(teachers) if t is ref), 0)
        where = f"$.teachers[{index}]"
        if ref is None or not getattr(ref, "server", None):
            raise SpecError(
                f'the server teacher source needs server = "http://HOST:PORT" @ {where}'
            )
        self.settings = config
        self.server = server_address(ref.server, f"{where}.server")
        self.token = None
        if config.token_env:
            self.token = os.environ.get(config.token_env) or None
            if self.token is None:
                raise SpecError(
                    f"environment variable {config.token_env} (token_env) is not set "
                    f"@ {where}.params.token_env"
                )
        self._opener = urllib.request.build_opener(
            _NoRedirect, urllib.request.HTTPSHandler(context=ssl.create_default_context())
        )
        if config.prompt == "text" and config.protocol != "openai":
            raise SpecError(
                f'prompt = "text" is for protocol = "openai" (kd serve takes ids) '
                f"@ {where}.params.prompt"
            )
        self.model = None  # no weights here: an initializer cannot copy from it
        self.config = None
        self.tokenizer = None
        self.run_tokenizer = run_tokenizer(setup)
        self._token_ids: dict[str, int] | None = None
        self._closed = threading.Event()  # set: requests sent ahead stop retrying
        self._ahead = threading.local()
        self._lock = threading.Lock()
        self._traffic = {"tokens": 0, "requests": 0, "request_s": 0.0, "wait_s": 0.0}
        self.info: dict = {}
        self.served_model = config.model
        if config.protocol == "kd":
            self.info = self._json(self._request(wire.INFO_PATH), wire.INFO_PATH)
            self.vocab_size = self._check_info(self.info)
            self.served_model = self.info.get("model")
        else:
            self.vocab_size = config.vocab_size or getattr(self.run_tokenizer, "vocab_size", 0)
            if config.prompt == "text":
                self._check_tokenize()
            self._probe()  # answers, in the expected form
        self.num_parameters = int(self.info.get("num_parameters") or 0)
        self.prefetch_depth = config.prefetch
        self._prefetcher = Prefetcher(self._score_ahead) if config.prefetch else None

    # ------------------------------------------------------------ the signal

    def signal(self, batch: dict, capture: frozenset = frozenset(), student=None) -> TeacherSignal:
        if capture:
            raise SpecError(
                f"a served teacher sends top-k log-probs only, not {', '.join(sorted(capture))}"
                ": losses that need them need a local teacher (path = ...) @ $.teachers"
            )
        ids = np.asarray(batch["input_ids"])
        got, waited = None, 0.0
        if self._prefetcher is not None:
            got, waited = self._prefetcher.take(ids)
        if got is None:  # not asked for ahead: the step waits for all of it
            start = time.perf_counter()
            got = self.score(ids)
            waited = time.perf_counter() - start
        with self._lock:
            self._traffic["wait_s"] += waited
        top_ids, logprobs, tail = got
        return TeacherSignal(
            vocab_size=self.vocab_size,
            topk_ids=mx.array(top_ids),
            topk_logprobs=mx.array(logprobs),
            tail_logmass=mx.array(tail),
        )

    def prefetch(self, batches: list[tuple[int, np.ndarray]]) -> None:
        """Send the requests for ``(index, ids)`` batches ahead of the steps that read them."""
        if self._prefetcher is not None:
            self._prefetcher.ask(batches)

    def traffic(self) -> dict[str, float]:
        """Cumulative: ``tokens`` scored, ``requests`` answered, ``request_s`` spent in them,
        ``wait_s`` the run's steps waited for replies."""
        with self._lock:
            return dict(self._traffic)

    def _score_ahead(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._ahead.active = True  # on the prefetch thread: close() ends its retries
        return self.score(ids)

    def close(self) -> None:
        """Stop asking ahead; a request retrying in the background gives up (the run's
        own requests, the final evaluation's, still retry)."""
        self._closed.set()
        if self._prefetcher is not None:
            self._prefetcher.close()

    def provenance(self) -> dict:
        """What a cache written from this server records of it (never the token);
        ``unknown``: what the server does not say (an OpenAI-style server says neither its
        chat template nor its weights' identity; None from kd serve means it has none)."""
        said = ("identity", "chat_template_hash")
        unknown = [key for key in said if key not in self.info]
        if self.served_model is None:
            unknown.insert(0, "model")
        return {
            "source": "server",
            "server": public_address(self.server),
            "protocol": self.settings.protocol,
            "model": self.served_model,
            "identity": self.info.get("identity"),
            "chat_template_hash": self.info.get("chat_template_hash"),
            "unknown": unknown,
        }

    def score(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(top-k ids [B, L, K], log-probs [B, L, K], tail log-mass [B, L]) of a [B, L]
        batch, in requests of at most the server's ``max_tokens`` positions."""
        ids = np.asarray(ids, np.int32)
        if ids.ndim != 2 or ids.size == 0:
            raise ValueError(f"a served teacher scores a [B, L] batch of ids, got {ids.shape}")
        limit = int(self.info.get("max_tokens") or 0)
        rows = max(1, limit // ids.shape[1]) if limit else len(ids)
        rows = min(rows, self.settings.rows_per_request or rows)
        start = time.perf_counter()
        parts = [self._score_rows(ids[lo : lo + rows]) for lo in range(0, len(ids), rows)]
        with self._lock:
            self._traffic["tokens"] += int(ids.size)
            self._traffic["requests"] += len(parts)
            self._traffic["request_s"] += time.perf_counter() - start
        return tuple(np.concatenate(p, axis=0) for p in zip(*parts, strict=True))

    def _score_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = self.settings.top_k
        if self.settings.protocol == "kd":
            body = json.dumps({"input_ids": ids.tolist(), "top_k": k}).encode()
            try:
                arrays, meta = wire.decode_topk(self._request(wire.TOPK_PATH, body))
            except ValueError as exc:
                raise self._fail(str(exc)) from None
            if meta.get("vocab_size") != str(self.vocab_size):
                raise self._fail(
                    f"its vocabulary is {meta.get('vocab_size')} tokens, {self.vocab_size} "
                    "when the run started: is it serving another model?"
                )
            got = (arrays["topk_ids"], arrays["topk_logprobs"], arrays["tail_logmass"])
        else:
            got = self._score_openai(ids, k)
        B, L = ids.shape
        want = {"ids": (B, L, k), "log-probs": (B, L, k), "tail": (B, L)}
        for (name, shape), array in zip(want.items(), got, strict=True):
            if array.shape != shape:
                raise self._fail(f"{name} of shape {array.shape} for a batch of shape {(B, L)}")
        if got[0].size and (got[0].min() < 0 or got[0].max() >= self.vocab_size):
            raise self._fail(f"token ids outside its vocabulary of {self.vocab_size}")
        return got

    def _score_openai(self, ids: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        s = self.settings
        texts = self._texts(ids) if s.prompt == "text" else None
        request = openai.completions_request(ids, k, s.model, s.form, texts)
        reply = self._json(
            self._request(wire.COMPLETIONS_PATH, json.dumps(request).encode()), "the completion"
        )
        if self.served_model is None and isinstance(reply.get("model"), str):
            self.served_model = reply["model"]
        try:
            return openai.parse_completions(reply, ids, k, self._lookup, texts is not None)
        except ValueError as exc:
            raise self._fail(str(exc)) from None

    def _probe(self) -> None:
        """One row, then two in one request (where ``rows_per_request`` allows): a server
        that takes one prompt a request (llama-cpp-python's answers HTTP 500) is refused
        with what to set."""
        ids = np.zeros((1, 2), np.int32)
        if self.settings.prompt == "text":  # ids whose text tokenizes back to them
            ids = np.asarray([self.run_tokenizer.encode(openai.PROBE_TEXT)[:4]], np.int32)
        self.score(ids)
        if self.settings.rows_per_request != 1:
            try:
                self.score(np.concatenate([ids, ids]))
            except ServerError as exc:
                raise self._fail(
                    f"it scored one row but not a request of two ({exc.reason}): a server "
                    "that takes one prompt a request (llama-cpp-python's) needs "
                    "params.rows_per_request = 1"
                ) from None
        with self._lock:  # not the run's traffic
            self._traffic.update(tokens=0, requests=0, request_s=0.0)

    def _texts(self, ids: np.ndarray) -> list[str]:
        """Each row's text; a row whose text the run's tokenizer does not encode back to
        its ids cannot be sent as text and be scored on those ids."""
        tok, texts = self.run_tokenizer, []
        for b, row in enumerate(ids.tolist()):
            text = tok.decode(row)
            again = tok.encode(text)
            if again != row:
                first = next(
                    (i for i, (a, c) in enumerate(zip(row, again, strict=False)) if a != c),
                    min(len(row), len(again)),
                )
                raise SpecError(
                    f"teacher server {self.server}: row {b} of a batch does not survive text "
                    f"(its ids, decoded and encoded again, differ from position {first} on), "
                    'so prompt = "text" cannot score it exactly: serve the teacher with a '
                    "server that takes token ids (vLLM, llama.cpp, kd serve) @ $.teachers"
                )
            texts.append(text)
        return texts

    # ------------------------------------------------------------ checks

    def _check_info(self, info: dict) -> int:
        if info.get("protocol") != wire.PROTOCOL:
            raise self._fail(f"{wire.INFO_PATH} does not describe a kd serve teacher")
        wanted, served = self.settings.model, info.get("model")
        if wanted and wanted != served:
            raise self._fail(f"it serves {served!r}, and the spec asks for model = {wanted!r}")
        vocab = int(info.get("vocab_size") or 0)
        k, most = self.settings.top_k, int(info.get("max_top_k") or 0)
        if k > most:
            raise self._fail(f"top_k = {k} is more than the {most} it serves (kd serve --top-k)")
        if self.settings.vocab_size is not None and self.settings.vocab_size != vocab:
            raise self._fail(
                f"its vocabulary is {vocab} tokens, the spec says {self.settings.vocab_size}"
            )
        tok = self.run_tokenizer
        if tok is not None and tok.vocab_size > vocab:
            raise self._fail(
                f"its vocabulary ({vocab}) is smaller than the run's tokenizer's ({tok.vocab_size})"
            )
        theirs = info.get("tokenizer_hash")
        if tok is not None and theirs and theirs != fingerprint(tok):
            raise self._fail(
                f"its tokenizer (hash {theirs}) is not the run's (hash {fingerprint(tok)}): "
                "the same ids would name other tokens"
            )
        return vocab

    def _check_tokenize(self) -> None:
        """Text prompts are scored on the server's tokens: its ``/tokenize`` must give the
        run tokenizer's ids for a probe text (the forms of llama.cpp, vLLM and
        llama-cpp-python, whose path is /extras/tokenize)."""
        tok = self.run_tokenizer
        if tok is None:
            raise self._fail("prompt = \"text\" needs the run's tokenizer to check the server's")
        body = json.dumps(openai.tokenize_request(openai.PROBE_TEXT, self.settings.model))
        for path in openai.TOKENIZE_PATHS:
            try:
                reply = self._request(path, body.encode())
                break
            except ServerError as exc:
                if "HTTP 404" in exc.reason and path != openai.TOKENIZE_PATHS[-1]:
                    continue  # not this server's path: llama-cpp-python's is the next
                paths = " or ".join(openai.TOKENIZE_PATHS)
                raise self._fail(
                    f'prompt = "text" checks the server\'s tokenizer with {paths}, which '
                    f"failed: {exc.reason}"
                ) from None
        try:
            theirs = openai.parse_tokenize(self._json(reply, path))
        except ValueError as exc:
            raise self._fail(str(exc)) from None
        ours = tok.encode(openai.PROBE_TEXT)
        if theirs != ours:
            at = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                min(len(ours), len(theirs)),
            )
            mine = ours[at] if at < len(ours) else "nothing"
            other = theirs[at] if at < len(theirs) else "nothing"
            raise self._fail(
                f"its tokenizer is not the run's: {path} gives {len(theirs)} "
                f"tokens for a probe text where the run's gives {len(ours)}, the first "
                f"difference at token {at} ({other} there, {mine} here); the teacher would "
                "score other tokens than the student's"
            )

    def _lookup(self, token: str) -> int | None:
        """The id of a token named by its text: the decoded text of exactly one id (what
        vLLM and llama.cpp send), else its vocabulary string."""
        if self._token_ids is None:
            tok = self.run_tokenizer
            tokens = tok.tokens() if tok is not None else []
            ids = {t: i for i, t in enumerate(tokens)}
            pieces: dict[str, int | None] = {}
            for i in range(len(tokens)):
                piece = tok.decode([i])
                pieces[piece] = None if piece in pieces else i  # two ids: ambiguous
            ids.update({p: i for p, i in pieces.items() if i is not None})
            self._token_ids = ids
        return self._token_ids.get(token)

    # ------------------------------------------------------------ HTTP

    def _fail(self, reason: str) -> ServerError:
        """The error naming the server; the token, should a reply echo it, is blanked."""
        if self.token:
            reason = reason.replace(self.token, "***")
        return ServerError(self.server, reason)

    def _json(self, body: bytes, what: str) -> dict:
        try:
            data = json.loads(body)
        except ValueError:
            raise self._fail(f"{what} is not JSON") from None
        if not isinstance(data, dict):
            raise self._fail(f"{what} is not a JSON object")
        return data

    def _request(self, path: str, body: bytes | None = None) -> bytes:
        """The reply to GET (``body`` None) or POST ``path``, tried again on transient
        failures with exponential backoff (module docstring)."""
        s = self.settings
        start, delay, tries = time.monotonic(), s.backoff_s, 0
        while True:
            tries += 1
            try:
                return self._once(path, body)
            except _Transient as exc:
                last, pause = str(exc), max(delay, min(exc.retry_after, MAX_BACKOFF_S))
                status = exc.status
            waited = time.monotonic() - start
            if tries > s.retries or waited + pause > s.wait_s:
                raise self._fail(
                    f"no answer after {tries} tries over {waited:.1f} s (last: {last}); "
                    + self._hint(path, status)
                )
            if getattr(self._ahead, "active", False):
                if self._closed.wait(pause):
                    raise self._fail("the run stopped asking")
            else:
                time.sleep(pause)
            delay = min(delay * 2, MAX_BACKOFF_S)

    def _hint(self, path: str, status: int | None) -> str:
        if status is None:
            return "is it running?"
        hint = f"it is running, and answered HTTP {status}"
        if path == wire.COMPLETIONS_PATH and self.settings.prompt == "ids":
            # llama-cpp-python's server answers a prompt of ids with HTTP 500, not 422
            hint += ' (if the server takes no token ids, set prompt = "text")'
        return hint

    def _once(self, path: str, body: bytes | None) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.server + path, data=body, headers=headers, method="GET" if body is None else "POST"
        )
        try:
            with self._opener.open(request, timeout=self.settings.timeout_s) as reply:
                return reply.read()
        except urllib.error.HTTPError as exc:
            message = wire.error_message(exc.read())
            if exc.code in RETRY_STATUSES:
                after = exc.headers.get("Retry-After", "") if exc.headers else ""
                raise _Transient(f"HTTP {exc.code}: {message}", _seconds(after), exc.code) from None
            if exc.code in (401, 403):
                sent = f"the token in ${self.settings.token_env}" if self.token else "no token"
                message = f"refused {sent} (HTTP {exc.code}: {message})"
                raise self._fail(message) from None
            if exc.code in (400, 422) and path == wire.COMPLETIONS_PATH:
                if self.settings.prompt == "ids":
                    message += ' (if the server takes no token ids, set prompt = "text")'
            raise self._fail(f"HTTP {exc.code} for {path}: {message}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLError):
                raise self._fail(f"TLS failed: {exc.reason}") from None
            raise _Transient(str(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None


def public_address(url: str) -> str:
    """``url`` as a cache may record it: scheme, host, port and path, never a query or a
    fragment (where a token could hide)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _seconds(value: str) -> float:
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0
