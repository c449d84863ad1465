"""Preference pairs: parsing JSONL(.gz) records and the ``pairs`` dataset.

A record is either HH style, ``{"chosen": DIALOGUE, "rejected": DIALOGUE}``, where the text up
to and including the last ``"\\n\\nAssistant:"`` is the shared prompt and what follows is the
response, or explicit, ``{"prompt": ..., "chosen": ..., "rejected": ...}``. An optional
``safety`` field marks a safety pair: ``true``/``false``, a category string (non-empty =
safety pair) or ``null``. A line that is not a valid pair is reported in ``rejected`` with
its line number and reason; nothing is dropped silently.

Batches lay a pair out as two rows: the B chosen rows first, then the B rejected rows, with

- ``pair_chosen`` [2B] float: 1 for a chosen row, 0 for a rejected row;
- ``pair_id`` [2B] int: which pair of the batch the row belongs to (0..B-1; -1 = no pair);
- ``pair_index`` [2B] int: the pair's index in the split;
- ``safety`` [2B] float: 1 when the row's pair is a safety pair;
- ``example_index`` [2B] int: ``2 * pair_index + (0 chosen, 1 rejected)``, unique per row.

``labels`` is -100 outside the response, so ``mask`` covers response tokens only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from kdcore import IGNORE_INDEX, Dataset, SpecError, validators
from kdcore.app import read_jsonl, resolve_tokenizer

HH_MARKER = "\n\nAssistant:"


@attrs.frozen
class PairRecord:
    """One parsed preference pair (``line`` is its 1-based line in the file)."""

    line: int
    prompt: str
    chosen: str
    rejected: str
    safety: bool = False
    category: str | None = None
    style: str = "hh"  # "hh" or "explicit"


def split_dialogue(text: str, marker: str = HH_MARKER) -> tuple[str, str]:
    """(prompt, response): the prompt ends with the last ``marker``; the response follows."""
    cut = text.rfind(marker)
    if cut < 0:
        raise ValueError(f"no {marker!r} turn")
    end = cut + len(marker)
    return text[:end], text[end:]


def _safety(value: Any) -> tuple[bool, str | None]:
    if value is None:
        return False, None
    if isinstance(value, bool):
        return value, None
    if isinstance(value, str):
        return bool(value.strip()), value.strip() or None
    raise ValueError(f"'safety' must be true/false, a category string or null, got {value!r}")


def parse_pair(record: dict, line: int, marker: str = HH_MARKER) -> PairRecord:
    """A :class:`PairRecord` from one JSON object; ``ValueError`` says what is wrong."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError("needs string fields 'chosen' and 'rejected'")
    safety, category = _safety(record.get("safety"))
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string")
        style = "explicit"
    else:
        try:
            prompt, chosen = split_dialogue(chosen, marker)
        except ValueError as exc:
            raise ValueError(f"'chosen' has {exc}") from None
        try:
            other, rejected = split_dialogue(rejected, marker)
        except ValueError as exc:
            raise ValueError(f"'rejected' has {exc}") from None
        if other != prompt:
            raise ValueError(f"'chosen' and 'rejected' differ before the last {marker!r} turn")
        style = "hh"
    if not chosen.strip() or not rejected.strip():
        raise ValueError("empty chosen or rejected response")
    if chosen == rejected:
        raise ValueError("chosen and rejected responses are identical")
    return PairRecord(line, prompt, chosen, rejected, safety, category, style)


def read_pairs(
    path: Path, limit: int | None = None, marker: str = HH_MARKER
) -> tuple[list[PairRecord], list[dict], int]:
    """(pairs, rejected lines ``{"line", "reason"}``, lines read) from a JSONL(.gz) file."""
    raw, rejected = read_jsonl(path, limit)
    lines_read = len(raw) + len(rejected)
    pairs = []
    for line, record in raw:
        try:
            pairs.append(parse_pair(record, line, marker))
        except ValueError as exc:
            rejected.append({"line": line, "reason": str(exc)})
    rejected.sort(key=lambda r: r["line"])
    return pairs, rejected, lines_read


@attrs.frozen
class Encoded:
    """Token rows of one pair and what truncation did to them."""

    ids: np.ndarray  # [2, seq_len + 1]: chosen, rejected
    carries: np.ndarray  # [2, seq_len + 1] bool: token is part of the response
    prompt_tokens: int  # prompt tokens kept
    prompt_cut: int  # prompt tokens dropped from the left
    response_cut: tuple[int, int]  # response tokens dropped from the right


def encode_pair(
    tokenizer: Any, pair: PairRecord, seq_len: int, max_response_tokens: int | None = None
) -> Encoded:
    """Prompt + response rows sharing one prompt.

    Responses are cut to ``max_response_tokens`` (default ``seq_len // 2``); the prompt is cut
    from the left (its end, next to the response, is what matters) so that the longer row
    fits in ``seq_len + 1`` tokens. Both rows keep exactly the same prompt tokens.
    """
    cap = min(max_response_tokens or max(1, seq_len // 2), seq_len)
    prompt = tokenizer.encode(pair.prompt)
    responses = [tokenizer.encode(pair.chosen), tokenizer.encode(pair.rejected)]
    kept = [r[:cap] for r in responses]
    room = seq_len + 1 - max(len(r) for r in kept)
    p = prompt[len(prompt) - room :] if len(prompt) > room else prompt
    ids = np.zeros((2, seq_len + 1), np.int32)
    carries = np.zeros((2, seq_len + 1), bool)
    for row, response in enumerate(kept):
        seq = p + response
        ids[row, : len(seq)] = seq
        carries[row, len(p) : len(seq)] = True
    return Encoded(
        ids,
        carries,
        len(p),
        len(prompt) - len(p),
        (len(responses[0]) - len(kept[0]), len(responses[1]) - len(kept[1])),
    )


def encode_pairs(
    tokenizer: Any, pairs: list[PairRecord], seq_len: int, max_response_tokens: int | None = None
) -> tuple[dict[str, np.ndarray], list[Encoded]]:
    """Per-pair arrays ``input_ids``/``labels``/``mask`` [N, 2, L] and ``safety`` [N]."""
    encoded = [encode_pair(tokenizer, p, seq_len, max_response_tokens) for p in pairs]
    n = len(pairs)
    ids = np.stack([e.ids for e in encoded]) if n else np.zeros((0, 2, seq_len + 1), np.int32)
    carries = np.stack([e.carries for e in encoded]) if n else np.zeros((0, 2, seq_len + 1), bool)
    labels = np.where(carries[..., 1:], ids[..., 1:], IGNORE_INDEX).astype(np.int32)
    arrays = {
        "input_ids": ids[..., :-1].astype(np.int32),
        "labels": labels,
        "mask": carries[..., 1:].astype(np.float32),
        "safety": np.asarray([p.safety for p in pairs], np.float32).reshape(n),
    }
    return arrays, encoded


def pair_rows(pairs: dict[str, np.ndarray], pair_index: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pair arrays [B, 2, ...] / [B] -> row arrays [2B, ...]: chosen rows, then rejected."""
    B = len(pair_index)
    rows = {}
    for key, value in pairs.items():
        if value.ndim >= 2 and value.shape[1] == 2:
            rows[key] = np.concatenate([value[:, 0], value[:, 1]], axis=0)
        else:
            rows[key] = np.concatenate([value, value], axis=0)
    rows["pair_chosen"] = np.concatenate([np.ones(B), np.zeros(B)]).astype(np.float32)
    rows["pair_id"] = np.tile(np.arange(B, dtype=np.int32), 2)
    rows["pair_index"] = np.tile(pair_index.astype(np.int32), 2)
    rows["example_index"] = np.concatenate([2 * pair_index, 2 * pair_index + 1]).astype(np.int32)
    return rows


@attrs.define
class PairsConfig:
    path: str
    tokenizer: str = "byte"
    seq_len: int = attrs.field(default=256, validator=validators.positive)
    max_response_tokens: int | None = attrs.field(default=None, validator=validators.positive)
    val_fraction: float = attrs.field(
        default=0.1, validator=[validators.number, validators.fraction]
    )
    assistant_marker: str = HH_MARKER
    max_records: int | None = None


class PairsDataset(Dataset):
    """Chosen/rejected pairs; a batch of B pairs is 2B rows (chosen rows, then rejected).

    The last ``val_fraction`` of the valid pairs (file order) is the val split.
    """

    def __init__(self, config: PairsConfig, setup: Any):
        self.config = config
        path = setup.resolve(config.path)
        self.pairs_read, self.rejected, self.records_read = read_pairs(
            path, config.max_records, config.assistant_marker
        )
        self.seed = setup.seed
        self.tokenizer = setup.tokenizer or resolve_tokenizer(config.tokenizer, setup.base_dir)
        cut = int(len(self.pairs_read) * (1 - config.val_fraction))
        self.records = {"train": self.pairs_read[:cut], "val": self.pairs_read[cut:]}
        self._examples, self._encoded = {}, {}
        for split, records in self.records.items():
            self._examples[split], self._encoded[split] = encode_pairs(
                self.tokenizer, records, config.seq_len, config.max_response_tokens
            )

    def batch(self, index: int, batch_size: int, split: str = "train") -> dict[str, np.ndarray]:
        """Batch ``index`` of ``batch_size`` pairs as 2 * ``batch_size`` rows."""
        picked = super().batch(index, batch_size, split)
        pair_index = picked.pop("example_index")
        return pair_rows(picked, pair_index)

    def batches(
        self, batch_size: int, split: str = "val", limit: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        for picked in super().batches(batch_size, split, limit):
            pair_index = picked.pop("example_index")
            yield pair_rows(picked, pair_index)

    def inspect(self, limit: int = 3) -> dict:
        """Counts, rejected lines, and the prompt/response split of the first pairs."""
        report: dict[str, Any] = {
            "layout": (
                "prompt = HH dialogue up to and including the last "
                f"{self.config.assistant_marker!r} (or the 'prompt' field); response = what "
                "follows; loss on response tokens only; prompt cut from the left, responses "
                f"to {self.config.max_response_tokens or self.config.seq_len // 2} tokens"
            ),
            "records_read": self.records_read,
            "pairs": {s: self.num_examples(s) for s in ("train", "val")},
            "rows": {s: 2 * self.num_examples(s) for s in ("train", "val")},
            "loss_tokens": {s: self.num_tokens(s) for s in ("train", "val")},
        }
        every = self.pairs_read
        encoded = self._encoded["train"] + self._encoded["val"]
        report["styles"] = dict(Counter(p.style for p in every))
        report["safety_pairs"] = sum(p.safety for p in every)
        report["safety_categories"] = dict(Counter(p.category for p in every if p.category))
        report["truncated_prompts"] = sum(e.prompt_cut > 0 for e in encoded)
        report["truncated_responses"] = sum(max(e.response_cut) > 0 for e in encoded)
        if encoded:
            report["prompt_tokens_mean"] = float(np.mean([e.prompt_tokens for e in encoded]))
            report["response_tokens_mean"] = float(
                np.mean([e.carries.sum(-1).mean() for e in encoded])
            )
        report["rejected"] = self.rejected
        samples = []
        for i in range(min(limit, self.num_examples("train"))):
            record, enc = self.records["train"][i], self._encoded["train"][i]
            prompt = self.tokenizer.decode(enc.ids[0, : enc.prompt_tokens])
            for row, side in enumerate(("chosen", "rejected")):
                response = enc.ids[row][enc.carries[row]]
                used = enc.ids[row, : enc.prompt_tokens + len(response)]
                samples.append(
                    {
                        "pair": i,
                        "line": record.line,
                        "side": side,
                        "safety": record.safety,
                        "category": record.category,
                        "prompt": prompt,
                        "response": self.tokenizer.decode(response),
                        "text": self.tokenizer.decode(used),
                        "loss_text": self.tokenizer.decode(response),
                        "tokens": int(enc.prompt_tokens + len(response)),
                        "loss_tokens": int(len(response)),
                    }
                )
        report["samples"] = samples
        return report


def load_pairs_for_eval(
    path: str | Path, tokenizer: Any, seq_len: int, max_response_tokens: int | None, marker: str
) -> tuple[list[PairRecord], dict[str, np.ndarray], list[dict]]:
    """Pairs of a file (all of it, no split) for ``kd eval --pairs``."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"pairs file not found: {path}")
    pairs, rejected, _ = read_pairs(path, None, marker)
    arrays, _ = encode_pairs(tokenizer, pairs, seq_len, max_response_tokens)
    return pairs, arrays, rejected
