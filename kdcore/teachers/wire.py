"""The ``kd serve`` protocol, shared by the server (``kdcore.cli.serve``) and the client
(``kdcore.teachers.served``).

- ``GET /v1/info``: JSON ``{"protocol": "kd", "version", "model", "vocab_size",
  "max_top_k", "max_tokens", "tokenizer_hash", "num_parameters"}``.
- ``POST /v1/topk`` with JSON ``{"input_ids": [[...], ...], "top_k": K}``, a ``[B, L]``
  batch of token ids (every row of one length). The reply is safetensors bytes (never
  pickle): ``topk_ids`` int32 ``[B, L, K]`` and ``topk_logprobs`` float32 ``[B, L, K]``
  (log-probabilities at temperature 1 of each position's next token, most probable first)
  and ``tail_logmass`` float32 ``[B, L]`` (log of the mass outside the top-k), with
  ``vocab_size`` and ``model`` in its metadata.

Errors are JSON ``{"error": {"message", "type", "code"}}`` with an HTTP 4xx or 5xx status,
as OpenAI-style servers answer them.
"""

from __future__ import annotations

import json
import struct

import numpy as np
from safetensors.numpy import load as _load_bytes
from safetensors.numpy import save as _save_bytes

PROTOCOL = "kd"
VERSION = 1
INFO_PATH = "/v1/info"
TOPK_PATH = "/v1/topk"
COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
TOPK_TYPE = "application/vnd.kdcore.topk+safetensors"
DTYPES = {"topk_ids": np.int32, "topk_logprobs": np.float32, "tail_logmass": np.float32}


def encode_topk(
    ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, metadata: dict[str, str]
) -> bytes:
    """The reply body of ``/v1/topk``."""
    arrays = {"topk_ids": ids, "topk_logprobs": logprobs, "tail_logmass": tail}
    arrays = {k: np.ascontiguousarray(v, DTYPES[k]) for k, v in arrays.items()}
    return _save_bytes(arrays, metadata={k: str(v) for k, v in metadata.items()})


def decode_topk(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, metadata) of a ``/v1/topk`` reply; ``ValueError`` saying what is wrong."""
    if len(body) < 8:
        raise ValueError(f"the reply ({len(body)} bytes) is not safetensors")
    (size,) = struct.unpack("<Q", body[:8])
    if size > len(body) - 8:
        raise ValueError("the reply's safetensors header is longer than the reply")
    try:
        header = json.loads(body[8 : 8 + size])
        arrays = _load_bytes(body)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same refusal
        raise ValueError(f"the reply is not valid safetensors ({exc})") from None
    for name, dtype in DTYPES.items():
        if name not in arrays:
            raise ValueError(f"the reply has no {name}")
        if arrays[name].dtype != dtype:
            raise ValueError(f"{name} is {arrays[name].dtype}, not {np.dtype(dtype)}")
    return arrays, dict(header.get("__metadata__") or {})


def error_body(status: int, message: str, kind: str = "invalid_request_error") -> bytes:
    """An error reply's JSON body."""
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


def error_message(body: bytes) -> str:
    """The message of an error reply (its first 300 characters when it is not our JSON)."""
    try:
        return str(json.loads(body)["error"]["message"])
    except Exception:  # noqa: BLE001 - another server's error page
        return body[:300].decode("utf-8", "replace").strip() or "(no message)"
