"""Hugging Face hub names for models, tokenizers and datasets, read through the local caches.

A spec may name a model (``path``), a tokenizer (``tokenizer``) or a dataset (``data.params.path``)
by its hub name instead of a local path, as mlx-lm accepts them:

- an existing local path (absolute, ``~``, or relative to the spec's folder) always wins;
- a string shaped like ``owner/name`` (``owner/name@revision`` for a branch, tag or commit) that
  is not a local path is a hub name. Models and tokenizers resolve through the Hugging Face hub
  cache with ``huggingface_hub.snapshot_download`` (downloading what is missing when online,
  ``local_files_only`` when ``HF_HUB_OFFLINE=1``), exactly the files mlx-lm fetches;
- datasets read through the ``datasets`` library's cache (``load_dataset``, as mlx-lm's
  ``--data`` does; the optional extra ``kdcore[hub]``). ``owner/name:split`` picks a split
  (default ``train``), ``owner/name:config:split`` a configuration too. The split's records
  are written once as a JSONL (or, for the text dataset, a text) file under ``$KD_CACHE``, so
  every reader of local data files reads them unchanged (the chat dataset reads records back by
  byte offset, which a file gives and an in-memory list does not).

Every failure is a ``SpecError`` naming the spec place, whether the lookup was offline or the
name was not found, the cache looked in, and the command that fetches the name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import attrs

from kdcore.errors import SpecError
from kdcore.io import kd_cache_root

# What mlx-lm's ``_download`` fetches for a model (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS), less
# "*.py": a spec never executes code, so remote modelling code is never fetched. Weights are
# ``model*.safetensors`` (what ``mlx_lm.load`` reads): Mistral repos also ship a
# ``consolidated.safetensors`` of the same weights that would double the download.
MODEL_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jinja",
]
# A tokenizer alone: the same files without the weights.
TOKENIZER_PATTERNS = [p for p in MODEL_PATTERNS if not p.endswith(".safetensors")]

# ``owner/name`` as the hub spells repo ids (huggingface_hub's validate_repo_id: letters,
# digits, ``-_.``, no leading or trailing ``-``/``.``), optionally ``@revision``.
_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REPO = rf"(?P<repo>{_PART}/{_PART})"
_REVISION = r"(?:@(?P<revision>[\w./-]+))?"
# A dataset's selectors: ``:split`` or ``:config:split``; a split may carry datasets' slice
# syntax (``train[:1000]``), whose colon is inside brackets.
_SELECTOR = r"[\w.-]+(?:\[[^\]]*\])?"
_MODEL_NAME = re.compile(rf"^{_REPO}{_REVISION}$")
_DATASET_NAME = re.compile(
    rf"^{_REPO}{_REVISION}(?::(?P<first>{_SELECTOR}))?(?::(?P<second>{_SELECTOR}))?$"
)
# Names ending like files are local paths that are missing, not hub names: a typo in
# ``data/train.jsonl`` must keep its "not found" error rather than become a hub lookup.
_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".gz", ".csv", ".tsv", ".parquet", ".gguf", ".md")


@attrs.frozen
class HubName:
    """A parsed hub name: ``repo_id``, ``revision`` (None: the default branch) and, for a
    dataset, ``config`` and ``split`` (None: the dataset's only configuration / ``train``)."""

    repo_id: str
    revision: str | None = None
    config: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        text = self.repo_id + (f"@{self.revision}" if self.revision else "")
        if self.config:
            text += f":{self.config}"
        return text + (f":{self.split}" if self.split else "")


def _valid_repo(repo: str) -> bool:
    # the hub's own rules beyond the regex
    return len(repo.split("/")[1]) <= 96 and "--" not in repo and ".." not in repo


def parse_hub_name(text: str, kind: Literal["model", "dataset"] = "model") -> HubName | None:
    """``text`` as a hub name, or None when it is not shaped like one."""
    if not isinstance(text, str) or text.lower().endswith(_FILE_SUFFIXES + (".git",)):
        return None
    if kind == "dataset":
        match = _DATASET_NAME.match(text)
        if match is None or not _valid_repo(match["repo"]):
            return None
        first, second = match["first"], match["second"]
        config, split = (first, second) if second else (None, first)
        return HubName(match["repo"], match["revision"], config, split)
    match = _MODEL_NAME.match(text)
    if match is None or not _valid_repo(match["repo"]):
        return None
    return HubName(match["repo"], match["revision"])


def local_path(text: str, base_dir: Path) -> Path:
    """``text`` as a local path: ``~`` expanded, relative paths under ``base_dir``."""
    path = Path(os.path.expanduser(str(text)))
    return path if path.is_absolute() else Path(base_dir) / path


def hub_reference(
    text: str, base_dir: Path, kind: Literal["model", "dataset"] = "model"
) -> HubName | None:
    """The hub name ``text`` stands for, or None when it is a local path (existing or not).

    ``kd validate`` can use this to accept a hub name where it checks that a path exists."""
    if local_path(text, base_dir).exists():
        return None
    return parse_hub_name(text, kind)


def offline() -> bool:
    """Whether the hub may not be reached: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as
    the environment says now, or as huggingface_hub read it at import."""
    truthy = {"1", "on", "yes", "true"}
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in truthy:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _at(where: str | None) -> str:
    return f" @ {where}" if where else ""


def _require_hub(what: str, where: str | None):
    try:
        import huggingface_hub
    except ImportError:
        raise SpecError(
            f"{what} is a Hugging Face hub name, which needs the optional extra: "
            f"pip install 'kdcore[hub]'{_at(where)}"
        ) from None
    return huggingface_hub


# ---------------------------------------------------------------- models and tokenizers


def _fetch_hint(name: HubName, patterns: list[str]) -> str:
    revision = f" --revision {name.revision}" if name.revision else ""
    include = " ".join(f"'{p}'" for p in patterns)
    return (
        f"fetch it while online with: hf download {name.repo_id}{revision} --include {include} "
        f"(huggingface_hub < 0.34: huggingface-cli download {name.repo_id}{revision})"
    )


def _snapshot(
    name: HubName, patterns: list[str], what: str, where: str | None, local: Path
) -> Path:
    """The snapshot folder of ``name`` in the hub cache, fetched first unless offline.
    ``local`` is the path the name was not found at (a typo in a local path reads as a hub
    name, so the error names both)."""
    hub = _require_hub(f"{what} {name}", where)
    # huggingface_hub.utils holds these errors in every version since 0.20 (.errors is newer)
    from huggingface_hub import constants
    from huggingface_hub import utils as errors

    # a cached snapshot missing requested files (huggingface_hub >= 1.0 checks this offline)
    incomplete = getattr(getattr(hub, "errors", None), "IncompleteSnapshotError", None)
    not_cached = (errors.LocalEntryNotFoundError,) + ((incomplete,) if incomplete else ())

    is_offline = offline()
    cache = constants.HF_HUB_CACHE
    place = f"the Hugging Face cache {cache} (HF_HUB_CACHE)"
    try:
        folder = hub.snapshot_download(
            name.repo_id,
            revision=name.revision,
            allow_patterns=patterns,
            local_files_only=is_offline,
        )
    except errors.RevisionNotFoundError:
        raise SpecError(
            f"{what} {name.repo_id} has no revision {name.revision!r} on the Hugging Face hub"
            f"{_at(where)}"
        ) from None
    except errors.RepositoryNotFoundError:  # GatedRepoError is one: a 401/403 looks alike
        raise SpecError(
            f"{what} {name.repo_id} was not found on the Hugging Face hub (or it is private or "
            f"gated: accept its terms on huggingface.co and log in with `hf auth login`); "
            f"not in {place} either{_at(where)}"
        ) from None
    except not_cached:
        if is_offline:
            why = "offline (HF_HUB_OFFLINE=1), and it is not in " + place
        else:
            why = "the hub could not be reached, and it is not in " + place
        raise SpecError(
            f"{what} {name}: no local folder {local}, and as a Hugging Face hub name: "
            f"{why}; {_fetch_hint(name, patterns)}{_at(where)}"
        ) from None
    except (errors.HfHubHTTPError, OSError) as exc:
        raise SpecError(
            f"{what} {name}: the Hugging Face hub failed ({type(exc).__name__}: {exc}); "
            f"{_fetch_hint(name, patterns)}{_at(where)}"
        ) from None
    return Path(folder)


def resolve_model(name_or_path: str, base_dir: Path, where: str | None = None) -> Path:
    """The local folder of a model given by local path or hub name.

    An existing local path wins (and a missing one that is not shaped like ``owner/name`` is
    returned as it is, for the loader's own "not found" error). A hub name resolves to its
    snapshot folder in the Hugging Face cache, holding config.json and the safetensors weights.
    """
    path = local_path(name_or_path, base_dir)
    name = None if path.exists() else parse_hub_name(name_or_path)
    if name is None:
        return path
    folder = _snapshot(name, MODEL_PATTERNS, "model", where, path)
    # a snapshot may hold only what an earlier, narrower fetch took (a tokenizer's files)
    if not (folder / "config.json").is_file():
        raise SpecError(
            f"model {name}: its snapshot {folder} has no config.json (not a model repo, or "
            f"fetched only in part); {_fetch_hint(name, MODEL_PATTERNS)}{_at(where)}"
        )
    if not any(folder.glob("model*.safetensors")):
        raise SpecError(
            f"model {name}: its snapshot {folder} has no model*.safetensors weights (mlx-lm "
            "reads safetensors; a GGUF file is imported with kd import, PyTorch weights are "
            f"converted with mlx_lm.convert); {_fetch_hint(name, MODEL_PATTERNS)}{_at(where)}"
        )
    return folder


def resolve_tokenizer_dir(name_or_path: str, base_dir: Path, where: str | None = None) -> Path:
    """The local folder of a tokenizer given by local path or hub name: for a hub name, the
    snapshot of its tokenizer files alone (tokenizer.json, tokenizer_config.json, templates),
    no weights."""
    path = local_path(name_or_path, base_dir)
    name = None if path.exists() else parse_hub_name(name_or_path)
    if name is None:
        return path
    folder = _snapshot(name, TOKENIZER_PATTERNS, "tokenizer", where, path)
    if not (folder / "tokenizer.json").is_file():
        raise SpecError(
            f"tokenizer {name}: its snapshot {folder} has no tokenizer.json (kdcore reads the "
            f"Hugging Face tokenizers format){_at(where)}"
        )
    return folder


# ---------------------------------------------------------------- datasets


def _require_datasets(name: HubName, where: str | None):
    try:
        import datasets
    except ImportError:
        raise SpecError(
            f"data path {name} is a Hugging Face hub dataset, which needs the optional extra: "
            f"pip install 'kdcore[hub]' (the datasets library){_at(where)}"
        ) from None
    return datasets


def _load_split(name: HubName, where: str | None) -> tuple[Any, HubName]:
    """The ``datasets.Dataset`` of ``name``'s split, through the datasets cache, and ``name``
    with the split it read."""
    datasets = _require_datasets(name, where)
    # datasets reads HF_HUB_OFFLINE once, at import; either reading of it means offline here
    is_offline = offline() or bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
    cache = datasets.config.HF_DATASETS_CACHE
    args = [name.repo_id] + ([name.config] if name.config else [])
    fetch = (
        f'fetch it once online with: python -c "import datasets; '
        f'datasets.load_dataset({", ".join(repr(a) for a in args)})"'
    )
    # datasets >= 2.15 names a missing dataset apart; before, it is a FileNotFoundError
    exceptions = getattr(datasets, "exceptions", None)
    not_found = getattr(exceptions, "DatasetNotFoundError", None) or ()
    try:
        loaded = datasets.load_dataset(*args, revision=name.revision, split=name.split)
    except not_found as exc:
        raise SpecError(
            f"hub dataset {name.repo_id} was not found ({exc}); a private or gated one needs "
            f"`hf auth login`{_at(where)}"
        ) from None
    except (ConnectionError, FileNotFoundError) as exc:
        # offline, or the hub unreachable, and nothing in the datasets cache (datasets < 3
        # says so with a FileNotFoundError)
        if not is_offline and not isinstance(exc, ConnectionError):
            raise SpecError(f"hub dataset {name}: {exc}{_at(where)}") from None
        why = "offline (HF_HUB_OFFLINE=1)" if is_offline else f"the hub is unreachable ({exc})"
        raise SpecError(
            f"data path {name} is a hub dataset, but {why} and it is not in the datasets cache "
            f"{cache} (HF_DATASETS_CACHE); {fetch}{_at(where)}"
        ) from None
    except (ValueError, KeyError, OSError) as exc:  # a missing config, an unknown split
        raise SpecError(
            f"hub dataset {name} ({'offline, ' if is_offline else ''}datasets cache {cache}): "
            f"{exc}; write owner/name:split or owner/name:config:split{_at(where)}"
        ) from None
    if isinstance(loaded, dict):  # no split named: mlx-lm's default, "train", or the only one
        splits = sorted(loaded)
        pick = "train" if "train" in loaded else (splits[0] if len(splits) == 1 else None)
        if pick is None:
            raise SpecError(
                f"hub dataset {name} has no train split; name one of {splits} as "
                f"{name.repo_id}:SPLIT{_at(where)}"
            )
        loaded = loaded[pick]
        name = attrs.evolve(name, split=pick)
    return loaded, name


def dataset_records(name: str, where: str | None = None) -> Iterator[dict]:
    """The records (dicts) of hub dataset ``name`` (``owner/name[@rev][:config][:split]``),
    read through the datasets cache."""
    parsed = parse_hub_name(name, "dataset")
    if parsed is None:
        raise SpecError(f"{name!r} is not a hub dataset name (owner/name){_at(where)}")
    loaded, _ = _load_split(parsed, where)
    return iter(loaded)


def _cache_key(name: HubName, loaded: Any, fmt: str, text_feature: str) -> str:
    """Names what the materialized file holds: the split's arrow files as the datasets cache
    has them now (a refreshed download writes new ones), or datasets' own fingerprint."""
    files = [
        (f["filename"], os.stat(f["filename"]).st_size, os.stat(f["filename"]).st_mtime_ns)
        for f in getattr(loaded, "cache_files", []) or []
    ]
    basis = files or getattr(loaded, "_fingerprint", None)
    if not basis:  # an in-memory dataset with no fingerprint: never reuse a file for it
        basis = os.urandom(16).hex()
    blob = json.dumps([str(name), fmt, text_feature, basis], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_atomically(target: Path, lines: Iterator[str]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=".part-", suffix=target.suffix)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for line in lines:
                out.write(line)
        os.replace(temp, target)  # a reader never sees half a file, even with two runs at once
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def resolve_dataset(
    name: str,
    where: str | None = None,
    fmt: Literal["jsonl", "text"] = "jsonl",
    text_feature: str = "text",
) -> Path:
    """A local file holding hub dataset ``name``'s split: JSONL records (``fmt="jsonl"``) or,
    for a text corpus, the ``text_feature`` strings of the records one after another, blank
    line between. Written once under ``$KD_CACHE/hub-data`` and reused while the datasets
    cache holds the same files."""
    parsed = parse_hub_name(name, "dataset")
    if parsed is None:
        raise SpecError(f"{name!r} is not a hub dataset name (owner/name){_at(where)}")
    loaded, parsed = _load_split(parsed, where)
    key = _cache_key(parsed, loaded, fmt, text_feature)
    owner, repo = parsed.repo_id.split("/")
    split = re.sub(r"[^\w.-]", "_", parsed.split or "train")
    folder = kd_cache_root() / "hub-data" / f"{owner}___{repo}" / (parsed.config or "default")
    target = folder / f"{split}-{key}.{'jsonl' if fmt == 'jsonl' else 'txt'}"
    if target.is_file():
        return target
    if fmt == "text":
        columns = list(getattr(loaded, "column_names", None) or [])
        if columns and text_feature not in columns:
            raise SpecError(
                f"hub dataset {parsed} has no {text_feature!r} column (it has {columns}): the "
                f"text dataset reads one string per record{_at(where)}"
            )

        def texts() -> Iterator[str]:
            for i, record in enumerate(loaded):
                value = record.get(text_feature)
                if not isinstance(value, str):
                    raise SpecError(
                        f"hub dataset {parsed}: record {i} has no string {text_feature!r}"
                        f"{_at(where)}"
                    )
                yield ("\n\n" if i else "") + value

        _write_atomically(target, texts())
    else:
        # default=str: a value JSON cannot hold (a date, bytes) becomes text rather than
        # failing the whole split; the readers look only at their own fields
        _write_atomically(
            target,
            (json.dumps(dict(r), ensure_ascii=False, default=str) + "\n" for r in loaded),
        )
    return target


def resolve_data_path(
    path: str,
    base_dir: Path,
    where: str | None = "$.data.params.path",
    fmt: Literal["jsonl", "text"] = "jsonl",
    text_feature: str = "text",
) -> Path:
    """A dataset's ``path``: an existing local path wins; a hub dataset name becomes the local
    file :func:`resolve_dataset` writes; anything else is returned as a local path, for the
    reader's own "not found" error."""
    local = local_path(path, base_dir)
    if local.exists() or parse_hub_name(path, "dataset") is None:
        return local
    return resolve_dataset(path, where, fmt, text_feature)
