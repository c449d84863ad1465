"""``kd serve MODEL --host 127.0.0.1 --port N``: a teacher behind HTTP, for runs on other
machines (``[[teachers]] server = "http://HOST:PORT"``) and for other tools.

It loads any teacher kdcore can load (a model folder, an mlx-lm folder, a ``.gguf`` file,
a hub name) and answers two protocols:

- kdcore's own (``kdcore.teachers.wire``): ``POST /v1/topk`` with a ``[B, L]`` batch of
  token ids, answered with each position's top-k log-probs and tail mass as safetensors;
- OpenAI-style ``POST /v1/completions`` with ``prompt`` a list of token ids (or of such
  lists) or text, ``echo``, ``logprobs = k`` and ``max_tokens`` 0 or 1, answered as vLLM
  and llama.cpp do (``choices[i].logprobs``: ``tokens``, ``token_logprobs``,
  ``top_logprobs``), and with vLLM's ``prompt_logprobs = k`` as vLLM does
  (``choices[i].prompt_logprobs``); token strings are the vocabulary's, or
  ``"token_id:N"`` with vLLM's ``return_tokens_as_token_ids``. ``POST /tokenize`` gives a
  text's ids (vLLM's and llama.cpp's form).

It binds to loopback by default; any other address needs a token (``--token-env VAR``),
checked as ``Authorization: Bearer``. A request larger than ``--max-request-mb`` or with
more than ``--max-tokens`` positions is refused (413); a client that sends too slowly is
dropped, and a request that waits for the model longer than ``--timeout-s`` is answered
503. Every MLX call runs on one worker thread: MLX streams belong to the thread that
made them, and one forward at a time bounds memory.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import json
import os
import queue
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as WaitedTooLong
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs
import numpy as np

from kdcore.errors import CheckpointError, SpecError
from kdcore.teachers import openai, wire


@attrs.frozen
class Limits:
    """What one request may ask: ``max_top_k`` log-probs per position, ``max_tokens``
    positions, ``max_bytes`` of body; ``timeout_s`` to send it and to wait for the model."""

    max_top_k: int = 64
    max_tokens: int = 1 << 16
    max_bytes: int = 16 << 20
    timeout_s: float = 60.0


class Scorer:
    """The loaded teacher; its methods run on the one worker thread (``run``)."""

    def __init__(self, model: str, dtype: str | None = None, name: str | None = None):
        with contextlib.suppress(ImportError):  # its import makes a stream: on this thread
            import mlx_lm  # noqa: F401
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, name="kd-serve-model", daemon=True).start()
        self._submit(self._load, model, dtype).result()
        self.name = name or self.folder.name
        from kdcore.tokenizers.simple import fingerprint, load_tokenizer

        try:  # on this thread too (it may import mlx-lm)
            self.tokenizer = load_tokenizer(self.folder)
        except CheckpointError:
            self.tokenizer = None
        self.tokens = self.tokenizer.tokens() if self.tokenizer is not None else None
        self.tokenizer_hash = fingerprint(self.tokenizer) if self.tokenizer is not None else None
        from kdcore.cache.provenance import chat_template_hash, teacher_identity

        try:  # what a cache made from this server records of it
            self.identity: str | None = teacher_identity(self.folder)
        except CheckpointError:
            self.identity = None
        self.chat_template_hash = chat_template_hash(self.folder)

    def _load(self, model: str, dtype: str | None) -> None:
        import mlx.core as mx

        from kdcore.models.io import count_parameters, load_model
        from kdcore.models.mlxlm import locate_model

        self.folder = locate_model(model, where="MODEL")
        self.model = load_model(self.folder, dtype, "--dtype")[0]
        self.model.eval()
        self.vocab_size = int(self.model(mx.array([[0]])).logits.shape[-1])
        self.num_parameters = count_parameters(self.model)

    def _work(self) -> None:
        # A daemon thread that never ends: MLX aborts the process when a thread that ran
        # it ends before the process does (its streams' threads are then left joinable).
        while True:
            method, args, future = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(method(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                    future.set_exception(exc)

    def _submit(self, method, *args) -> Future:
        future: Future = Future()
        self._jobs.put((method, args, future))
        return future

    def run(self, method, *args, timeout: float):
        """``method(*args)`` on the model's thread; ``WaitedTooLong`` after ``timeout``."""
        future = self._submit(method, *args)
        try:
            return future.result(timeout=timeout)
        except WaitedTooLong:
            future.cancel()  # not started yet: never started
            raise

    def topk(self, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [B, L, k], log-probs [B, L, k], tail [B, L]) of a ``[B, L]`` batch."""
        import mlx.core as mx

        from kdcore.cache.write import topk_logprobs

        top = topk_logprobs(self.model(mx.array(ids)).logits, k)
        mx.eval(*top)
        return tuple(np.array(a) for a in top)

    def prompt_logprobs(self, rows: list[list[int]], k: int) -> list[tuple]:
        """Per row: top-k ids and log-probs [n, k] after each token, and the log-prob and
        rank (1: the most probable) of each token given those before it [n - 1]; rows of
        one length run as one batch."""
        import mlx.core as mx

        from kdcore.cache.write import topk_logprobs
        from kdcore.signal.teacher import stable_log_softmax

        out: list[Any] = [None] * len(rows)
        for n in sorted({len(r) for r in rows}):
            which = [i for i, r in enumerate(rows) if len(r) == n]
            ids = mx.array([rows[i] for i in which])
            logits = self.model(ids).logits
            top_ids, top_lp, _tail = topk_logprobs(logits, max(k, 1))
            logp = stable_log_softmax(logits[:, :-1].astype(mx.float32))
            given = mx.take_along_axis(logp, ids[:, 1:, None], -1)
            rank = (logp > given).sum(-1) + 1
            mx.eval(top_ids, top_lp, given, rank)
            for j, i in enumerate(which):
                got = (top_ids[j], top_lp[j], given[j, :, 0], rank[j])
                out[i] = tuple(np.array(a) for a in got)
        return out

    def piece(self, tid: int) -> str:
        """The text of one token (vLLM's ``decoded_token``)."""
        if self.tokenizer is None:
            return f"{openai.ID_PREFIX}{tid}"
        return self.tokenizer.decode([tid])

    def token_name(self, tid: int, as_ids: bool) -> str:
        if as_ids or self.tokens is None or tid >= len(self.tokens):
            return f"{openai.ID_PREFIX}{tid}"
        return self.tokens[tid]


class Reject(Exception):
    """A request refused: ``status`` and the message sent back."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_token(host: str, token: str | None) -> None:
    """A server reachable from other machines must check a token."""
    if not is_loopback(host) and not token:
        raise SpecError(
            f"kd serve --host {host}: a non-loopback address needs a token "
            "(--token-env VAR, VAR holding it)"
        )


class TeacherServer(ThreadingHTTPServer):
    """The HTTP server of one :class:`Scorer`; ``url`` is where it listens."""

    daemon_threads = True

    def __init__(self, scorer: Scorer, host: str, port: int, token: str | None, limits: Limits):
        require_token(host, token)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.scorer, self.token, self.limits = scorer, token, limits
        super().__init__((host, port), Handler)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> TeacherServer:
        """Serve on a background thread (tests, notebooks); ``close`` stops it."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def info(self) -> dict:
        s = self.scorer
        return {
            "protocol": wire.PROTOCOL,
            "version": wire.VERSION,
            "model": s.name,
            "vocab_size": s.vocab_size,
            "max_top_k": min(self.limits.max_top_k, s.vocab_size),
            "max_tokens": self.limits.max_tokens,
            "tokenizer_hash": s.tokenizer_hash,
            "num_parameters": s.num_parameters,
            "identity": s.identity,
            "chat_template_hash": s.chat_template_hash,
        }


class Handler(BaseHTTPRequestHandler):
    server: TeacherServer
    server_version = "kd-serve/1"

    def setup(self) -> None:
        self.timeout = self.server.limits.timeout_s  # a client that sends too slowly
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # a request per training step: log_error below says what went wrong

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, route) -> None:
        try:
            if self.path != "/health":
                self._check_token()
            status, body, kind = route()
        except Reject as exc:
            self.log_error("%s %s: %d %s", self.command, self.path, exc.status, exc)
            status, body, kind = exc.status, wire.error_body(exc.status, str(exc), exc.kind), None
        except Exception as exc:  # noqa: BLE001 - the client gets the reason, the server lives
            self.log_error("%s %s: %r", self.command, self.path, exc)
            status, body, kind = 500, wire.error_body(500, repr(exc), "server_error"), None
        self.send_response(status)
        self.send_header("Content-Type", kind or "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if status == 503:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body)

    def _check_token(self) -> None:
        token = self.server.token
        if token is None:
            return
        sent = self.headers.get("Authorization", "")
        ok = sent.startswith("Bearer ") and hmac.compare_digest(sent[7:].encode(), token.encode())
        if not ok:
            raise Reject(401, "a valid Authorization: Bearer token is required", "unauthorized")

    def _get(self) -> tuple[int, bytes, str | None]:
        info = self.server.info()
        if self.path == "/health":
            return 200, b'{"status": "ok"}', None
        if self.path == wire.INFO_PATH:
            return 200, json.dumps(info).encode(), None
        if self.path == wire.MODELS_PATH:
            model = {"id": info["model"], "object": "model", "owned_by": "kdcore"}
            return 200, json.dumps({"object": "list", "data": [model]}).encode(), None
        raise Reject(404, f"no such path: GET {self.path}", "not_found")

    def _post(self) -> tuple[int, bytes, str | None]:
        if self.path not in (wire.TOPK_PATH, wire.COMPLETIONS_PATH, openai.TOKENIZE_PATH):
            raise Reject(404, f"no such path: POST {self.path}", "not_found")
        request = self._json_body()
        if self.path == wire.TOPK_PATH:
            return 200, self._topk(request), wire.TOPK_TYPE
        if self.path == openai.TOKENIZE_PATH:
            return 200, json.dumps(self._tokenize(request)).encode(), None
        return 200, json.dumps(self._completions(request)).encode(), None

    def _json_body(self) -> dict:
        size = self.headers.get("Content-Length")
        if size is None or not size.isdigit():
            raise Reject(411, "a request needs a Content-Length")
        if int(size) > self.server.limits.max_bytes:
            self.close_connection = True
            raise Reject(
                413, f"request of {size} bytes; the limit is {self.server.limits.max_bytes}"
            )
        try:
            request = json.loads(self.rfile.read(int(size)))
        except ValueError as exc:
            raise Reject(400, f"the body is not JSON: {exc}") from None
        if not isinstance(request, dict):
            raise Reject(400, "the body must be a JSON object")
        return request

    def _k(self, value: Any, name: str, default: int) -> int:
        k = default if value is None else value
        most = min(self.server.limits.max_top_k, self.server.scorer.vocab_size)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= most:
            raise Reject(400, f"{name} must be an integer in [0, {most}] (kd serve --top-k)")
        return k

    def _rows(self, value: Any, name: str) -> list[list[int]]:
        if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
            value = [value]
        ok = isinstance(value, list) and value and all(isinstance(r, list) and r for r in value)
        if not ok or not all(
            isinstance(t, int) and not isinstance(t, bool) for r in value for t in r
        ):
            raise Reject(400, f"{name} must be token ids: a list of ints, or a list of such lists")
        vocab = self.server.scorer.vocab_size
        if any(not 0 <= t < vocab for r in value for t in r):
            raise Reject(400, f"{name} holds ids outside the vocabulary [0, {vocab})")
        if sum(len(r) for r in value) > self.server.limits.max_tokens:
            raise Reject(413, f"more than {self.server.limits.max_tokens} positions (--max-tokens)")
        return value

    def _run(self, method, *args):
        try:
            return self.server.scorer.run(method, *args, timeout=self.server.limits.timeout_s)
        except WaitedTooLong:
            raise Reject(
                503, "busy: the model did not get to this request in time", "busy"
            ) from None

    def _topk(self, request: dict) -> bytes:
        rows = self._rows(request.get("input_ids"), "input_ids")
        if len({len(r) for r in rows}) != 1:
            raise Reject(400, "input_ids must be a [B, L] batch: rows of one length")
        k = self._k(request.get("top_k"), "top_k", self.server.info()["max_top_k"])
        if k < 1:
            raise Reject(400, "top_k must be at least 1")
        s = self.server.scorer
        ids, logprobs, tail = self._run(s.topk, np.array(rows, np.int32), k)
        return wire.encode_topk(ids, logprobs, tail, {"vocab_size": s.vocab_size, "model": s.name})

    def _completions(self, request: dict) -> dict:
        s = self.server.scorer
        if request.get("model") not in (None, s.name):
            raise Reject(
                404, f"the model {request['model']!r} is not served here ({s.name!r})", "not_found"
            )
        rows = self._rows(self._encoded(request.get("prompt")), "prompt")
        new = request.get("max_tokens") or 0  # none asked: the prompt's log-probs only
        if new not in (0, 1) or isinstance(new, bool):
            raise Reject(400, "kd serve scores prompts: max_tokens must be 0 or 1")
        if request.get("n", 1) != 1:
            raise Reject(400, "n must be 1")
        k = self._k(request.get("logprobs"), "logprobs", 0)
        pk = request.get("prompt_logprobs")
        if pk is not None:
            pk = self._k(pk, "prompt_logprobs", 0)
        echo, as_ids = bool(request.get("echo")), bool(request.get("return_tokens_as_token_ids"))
        scored = self._run(s.prompt_logprobs, rows, max(k, pk or 0))
        choices = [
            _choice(s, i, row, got, k, new, echo, as_ids, request.get("logprobs") is not None)
            for i, (row, got) in enumerate(zip(rows, scored, strict=True))
        ]
        if pk is not None:
            for choice, row, got in zip(choices, rows, scored, strict=True):
                choice["prompt_logprobs"] = _prompt_logprobs(s, row, got, pk)
        prompt_tokens = sum(len(r) for r in rows)
        return {
            "id": f"cmpl-kd-{uuid.uuid4().hex[:12]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": s.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": new * len(rows),
                "total_tokens": prompt_tokens + new * len(rows),
            },
        }

    def _encoded(self, prompt: Any) -> Any:
        """A text prompt (or a list of them) as the tokenizer's ids, no special tokens."""
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
            return prompt
        tokenizer = self.server.scorer.tokenizer
        if tokenizer is None:
            raise Reject(400, "this model has no tokenizer here: send token ids, not text")
        return [tokenizer.encode(t) for t in texts]

    def _tokenize(self, request: dict) -> dict:
        """llama.cpp's ``content`` or vLLM's ``prompt``, as ids (with llama.cpp's
        ``with_pieces``, ``{"id", "piece"}`` each)."""
        text = request.get("content", request.get("prompt"))
        if not isinstance(text, str):
            raise Reject(400, "/tokenize needs the text in content (or prompt)")
        rows = self._encoded(text) if text else [[]]
        ids = rows[0]
        tokens: list = ids
        if request.get("with_pieces"):
            decode = self.server.scorer.tokenizer.decode
            tokens = [{"id": i, "piece": decode([i])} for i in ids]
        return {"tokens": tokens, "count": len(ids), "max_model_len": self.server.limits.max_tokens}


def _prompt_logprobs(s: Scorer, row, got, k: int) -> list:
    """vLLM's ``prompt_logprobs``: null, then per prompt token its top-k and itself, each
    ``{"ID": {"logprob", "rank", "decoded_token"}}``."""
    top_ids, top_lp, given, ranks = got
    out: list = [None]
    for t in range(1, len(row)):
        entry = {
            str(int(i)): {
                "logprob": float(v),
                "rank": r + 1,
                "decoded_token": s.piece(int(i)),
            }
            for r, (i, v) in enumerate(zip(top_ids[t - 1][:k], top_lp[t - 1][:k], strict=True))
        }
        token = str(int(row[t]))
        if token not in entry:
            entry[token] = {
                "logprob": float(given[t - 1]),
                "rank": int(ranks[t - 1]),
                "decoded_token": s.piece(int(row[t])),
            }
        out.append(entry)
    return out


def _choice(s: Scorer, index, row, got, k, new, echo, as_ids, want_logprobs) -> dict:
    """One row's choice: the prompt echoed (when asked) and the greedy next token (max_tokens
    1), with each token's log-prob given those before it and the top-k there."""
    top_ids, top_lp, given, _ranks = got
    tokens, token_lp, top = [], [], []
    if echo:
        tokens = list(row)
        token_lp = [None] + [float(x) for x in given]
        top = [None] + [_top(s, top_ids[t], top_lp[t], k, as_ids) for t in range(len(row) - 1)]
    generated = [int(top_ids[-1, 0])] if new else []
    if new:
        tokens.append(generated[0])
        token_lp.append(float(top_lp[-1, 0]))
        top.append(_top(s, top_ids[-1], top_lp[-1], k, as_ids))
    shown = (list(row) if echo else []) + generated
    text = s.tokenizer.decode(shown) if s.tokenizer is not None else ""
    logprobs = None
    if want_logprobs:
        logprobs = {
            "tokens": [s.token_name(int(t), as_ids) for t in tokens],
            "token_logprobs": token_lp,
            "top_logprobs": top,
        }
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": "length"}


def _top(s: Scorer, ids: np.ndarray, logprobs: np.ndarray, k: int, as_ids: bool) -> dict:
    return {
        s.token_name(int(i), as_ids): float(v) for i, v in zip(ids[:k], logprobs[:k], strict=True)
    }


# ---------------------------------------------------------------- the command


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a teacher's top-k log-probs over HTTP (kdcore's protocol and OpenAI's)",
        description="Serve MODEL's log-probs for [[teachers]] server = URL and other tools.",
    )
    p.add_argument("model", help="a model folder, an mlx-lm folder, a .gguf file or a hub name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--top-k", type=int, default=64, help="the most log-probs per position")
    p.add_argument("--token-env", metavar="VAR", help="environment variable holding the token")
    p.add_argument("--name", help="the model's name in replies (default: its folder's)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-tokens", type=int, default=1 << 16, help="positions per request")
    p.add_argument("--max-request-mb", type=float, default=16.0)
    p.add_argument("--timeout-s", type=float, default=60.0, help="to send, and to wait")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env) or None
        if token is None:
            raise SpecError(f"environment variable {args.token_env} (--token-env) is not set")
    require_token(args.host, token)  # before the model is loaded
    for name in ("top_k", "max_tokens", "max_request_mb", "timeout_s"):
        if not getattr(args, name) > 0:
            raise SpecError(f"--{name.replace('_', '-')} must be > 0")
    limits = Limits(
        args.top_k, args.max_tokens, int(args.max_request_mb * (1 << 20)), args.timeout_s
    )
    scorer = Scorer(args.model, args.dtype, args.name)
    server = TeacherServer(scorer, args.host, args.port, token, limits)
    guarded = " (token required)" if token else ""
    print(
        f"kd serve: {scorer.name} ({scorer.vocab_size} tokens, top-k up to {args.top_k}) on "
        f"{server.url}{guarded}; Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
