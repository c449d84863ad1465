"""What ``kd data inspect`` reports for a chat dataset: counts per split and format, the
rejections, and a few records with their loss-carrying text marked."""

from __future__ import annotations

import numpy as np

from kdcore.data.chat_index import FORMATS

# Records ``inspect`` renders for its statistics (the rest are left out and said to be).
INSPECT_RECORDS = 50_000
# Marks around the text of loss-carrying tokens in ``inspect``'s samples.
LOSS_OPEN, LOSS_CLOSE = "⟦", "⟧"


def inspect(dataset, limit: int = 3) -> dict:
    """The report of a :class:`kdcore.data.chat.ChatDataset`, with its first ``limit``
    records as samples."""
    stats = dataset.stats(max_records=INSPECT_RECORDS)
    dataset.require_loss("train")  # a split that would train on nothing is an error here too
    kinds, lines = dataset.index.kinds, dataset.index.lines
    formats = {name: int((kinds == kind).sum()) for kind, name in FORMATS.items()}
    report = {
        "examples": {s: dataset.num_examples(s) for s in ("train", "val")},
        "loss_tokens": {s: stats[s]["loss_tokens"] for s in ("train", "val")},
        "records_read": dataset.records_read,
        "records": dataset.records,
        "formats": formats,
        "rejected": dataset.rejected,
        "rejected_count": dataset.rejected_count,
        "stats": stats,
        "samples": [],
    }
    room, decode = dataset.seq_len + 1, dataset.tokenizer.decode
    for record in range(min(limit, dataset.records)):
        try:
            # tokenized as far as a row holds it: a 2 MB turn is not tokenized whole to show
            # its first seq_len + 1 tokens (its count is then an estimate)
            enc = dataset.encode(record, limit=room)
        except ValueError as exc:
            report["samples"].append({"line": int(lines[record]), "error": str(exc)})
            continue
        kept_ids, kept = enc.ids[:room], enc.carries[:room]
        cut = int(max(0, enc.total - room))
        sample = {
            "line": int(lines[record]),
            "format": FORMATS[int(kinds[record])],
            "text": decode(enc.ids),
            "marked": _marked(decode, kept_ids, kept, cut, enc.exact),
            "loss_text": decode(kept_ids[kept]),
            "tokens": int(enc.total),
            "loss_tokens": int(kept.sum()),
            "cut_tokens": cut,
        }
        if not enc.exact:
            sample["tokens_estimated"] = True
        report["samples"].append(sample)
    return report


def _marked(decode, ids: np.ndarray, carries: np.ndarray, cut: int, exact: bool = True) -> str:
    """The tokens' text with each run of loss-carrying tokens in ⟦ ⟧, and the cut."""
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or carries[end] != carries[start]:
            text = decode(ids[start:end])
            pieces.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if carries[start] else text)
            start = end
    if cut:
        pieces.append(f"⟪{'' if exact else 'about '}{cut} more tokens cut⟫")
    return "".join(pieces)
