"""The ``mixture`` dataset: several text corpora (domains), each example tagged with its
domain id, so a multi-teacher run can be evaluated and inspected per domain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np

from kdcore import Dataset, validators
from kdcore.app import open_text, resolve_tokenizer


@attrs.define
class MixtureConfig:
    paths: list[str]  # one UTF-8 text file (or .gz) per domain; domain id = position
    names: list[str] = attrs.field(factory=list)  # domain names (default: the file stems)
    tokenizer: str = "byte"
    seq_len: int = attrs.field(default=128, validator=validators.positive)
    val_fraction: float = attrs.field(
        default=0.1, validator=[validators.number, validators.fraction]
    )
    max_chars: int | None = None  # per file
    balance: bool = True  # equal number of windows per domain in each split

    def __attrs_post_init__(self) -> None:
        if not self.paths:
            raise ValueError("paths must name at least one file")
        if self.names and len(self.names) != len(self.paths):
            raise ValueError(f"{len(self.names)} names for {len(self.paths)} paths")


def windows(tokens: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Non-overlapping next-token windows of ``seq_len`` (the tail that does not fill one
    is dropped)."""
    count = max(0, (len(tokens) - 1) // seq_len)
    idx = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    chunk = tokens[idx] if count else np.zeros((0, seq_len + 1), np.int32)
    return {
        "input_ids": chunk[:, :-1].astype(np.int32),
        "labels": chunk[:, 1:].astype(np.int32),
        "mask": np.ones((count, seq_len), np.float32),
    }


class MixtureDataset(Dataset):
    """Windows from every domain file, interleaved; ``domain`` [B] int32 in every batch.

    Each file's last ``val_fraction`` of tokens is its val split. With ``balance`` every
    domain contributes the same number of windows (the smallest domain's count, first
    windows kept) to each split, so per-domain means weigh the domains equally.
    """

    def __init__(self, config: MixtureConfig, setup: Any):
        self.seed = setup.seed
        texts = []
        for path in config.paths:
            text = open_text(Path(setup.resolve(path)))
            texts.append(text[: config.max_chars] if config.max_chars else text)
        self.tokenizer = setup.tokenizer or resolve_tokenizer(
            config.tokenizer, setup.base_dir, "".join(texts)
        )
        self.domain_names = list(config.names) or [Path(p).name.split(".")[0] for p in config.paths]
        parts: dict[str, list[dict[str, np.ndarray]]] = {"train": [], "val": []}
        for text in texts:
            tokens = np.asarray(self.tokenizer.encode(text), dtype=np.int32)
            cut = int(len(tokens) * (1 - config.val_fraction))
            parts["train"].append(windows(tokens[:cut], config.seq_len))
            parts["val"].append(windows(tokens[cut:], config.seq_len))
        self._examples = {
            split: self._merge(chunks, config.balance) for split, chunks in parts.items()
        }
        self.records_read = len(texts)

    @staticmethod
    def _merge(chunks: list[dict[str, np.ndarray]], balance: bool) -> dict[str, np.ndarray]:
        if balance:
            keep = min(len(c["input_ids"]) for c in chunks)
            chunks = [{k: v[:keep] for k, v in c.items()} for c in chunks]
        merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        merged["domain"] = np.concatenate(
            [np.full(len(c["input_ids"]), d, np.int32) for d, c in enumerate(chunks)]
        )
        # Interleave the domains (window 0 of each, then window 1...): any prefix of the
        # val split, such as the engine's first eval batches, then covers every domain.
        position = np.concatenate([np.arange(len(c["input_ids"])) for c in chunks])
        order = np.lexsort((merged["domain"], position))
        return {k: v[order] for k, v in merged.items()}

    def domain_counts(self, split: str = "train") -> dict[str, int]:
        ids = self._examples[split]["domain"]
        return {name: int((ids == d).sum()) for d, name in enumerate(self.domain_names)}

    def inspect(self, limit: int = 3) -> dict:
        report = super().inspect(limit)
        report["domains"] = {s: self.domain_counts(s) for s in ("train", "val")}
        return report
