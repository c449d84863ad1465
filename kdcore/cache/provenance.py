"""Where a top-k cache came from, recorded in its manifest and checked against a run's spec.

``kd cache`` records, for each teacher, its ``provenance``: the ``source`` (``"model"``, a
local folder, or ``"server"``), the ``server`` address (scheme, host, port and path: never
a token, a query or a fragment), the ``protocol``, the ``model`` name, the hash of the
teacher's ``chat_template`` and the fields its source could not tell (``unknown``); the
manifest's ``tokenizer_hash``, ``capture_temperature``, ``k`` and ``teacher.identity``
complete it. A run whose ``[[teachers]]`` entry names the cache's origin beside it
(``path`` or ``server``, and ``params`` ``model``, ``protocol``, ``top_k``, ``temperature``,
``vocab_size``) is refused when the cache says otherwise. A cache written before
provenance was recorded is read with a warning naming what is unknown.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from kdcore.errors import CheckpointError, SpecError
from kdcore.io import read_json, sha256_file

FIELDS = ("source", "server", "protocol", "model", "chat_template_hash")
NAMES = {
    "source": "a teacher from",
    "server": "the teacher server",
    "protocol": "protocol",
    "model": "model",
    "chat_template_hash": "a chat template of hash",
    "k": "top_k =",
    "temperature": "capture temperature",
    "vocab_size": "a vocabulary of",
    "tokenizer_hash": "a tokenizer of hash",
    "identity": "a teacher of identity (config and weights)",
}


def teacher_identity(directory: Path) -> str:
    """sha256 over the teacher's ``config.json`` (canonical JSON) and its weight files."""
    digest = hashlib.sha256()
    config = read_json(directory / "config.json", "teacher config")
    digest.update(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(directory.glob("*.safetensors")):
        digest.update(weights.name.encode())
        digest.update(sha256_file(weights).encode())
    return digest.hexdigest()[:16]


def chat_template_hash(folder: Path) -> str | None:
    """sha256 (16 hex digits) of the folder's chat template (``tokenizer_config.json``'s
    ``chat_template``, else ``chat_template.jinja``); None when it has none."""
    template: Any = None
    config = folder / "tokenizer_config.json"
    if config.exists():
        try:
            template = read_json(config, "tokenizer config").get("chat_template")
        except (CheckpointError, AttributeError):
            template = None
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def local_provenance(folder: Path, named: str) -> dict:
    """The provenance of a local teacher folder (``named``: the spec's ``path``)."""
    return {
        "source": "model",
        "server": None,
        "protocol": None,
        "model": named,
        "chat_template_hash": chat_template_hash(folder),
        "unknown": [],
    }


def served_provenance(recorded: dict) -> dict:
    """The provenance of a served teacher (``ServedTeacher.provenance()``), with what the
    server does not report listed as ``unknown``."""
    return {**{key: recorded.get(key) for key in FIELDS}, "unknown": recorded["unknown"]}


def check_provenance(cache: Path, manifest: dict, expected: dict[str, tuple[Any, str]]) -> None:
    """Refuse a cache whose provenance differs from what the spec ``expected`` (field ->
    (value, spec place)); warn, naming them, of the fields the cache cannot tell."""
    recorded = manifest.get("provenance")
    if not isinstance(recorded, dict):
        asked = dict.fromkeys(where for field, (_v, where) in expected.items() if field in FIELDS)
        also = f"; the spec's {', '.join(asked)} cannot be checked" if asked else ""
        print(
            f"warning: cache {cache} was written before kd cache recorded provenance: its "
            f"teacher's source, server, model and chat template are unknown{also}",
            file=sys.stderr,
        )
        recorded = {"unknown": list(FIELDS)}
    known = {
        **recorded,
        "k": manifest.get("k"),
        "temperature": manifest.get("capture_temperature"),
        "vocab_size": manifest.get("vocab_size"),
        "tokenizer_hash": manifest.get("tokenizer_hash"),
        "identity": (manifest.get("teacher") or {}).get("identity"),
    }
    unknown = set(recorded.get("unknown") or [])
    problems, unchecked = [], []
    for field, (want, where) in expected.items():
        if field in unknown or field not in known:
            unchecked.append(f"{field} ({where})")
            continue
        have = known[field]
        same = have == want
        if field == "temperature" and isinstance(have, (int, float)):
            same = abs(float(have) - float(want)) <= 1e-9 * max(1.0, abs(float(want)))
        if not same:
            problems.append(
                f"cache {cache} was made with {NAMES.get(field, field)} {_shown(have)}, and "
                f"the spec asks for {_shown(want)} @ {where}"
            )
    if problems:
        raise SpecError(problems)
    if unchecked and isinstance(manifest.get("provenance"), dict):
        print(
            f"warning: cache {cache} does not record {', '.join(unchecked)}: not checked",
            file=sys.stderr,
        )


def _shown(value: Any) -> str:
    return "none" if value is None else repr(value)  # what is unknown is not compared
