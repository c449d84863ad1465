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
            enc = dataset.encode(record)
        except ValueError as exc:
            report["samples"].append({"line": int(lines[record]), "error": str(exc)})
            continue
        kept_ids, kept = enc.ids[:room], enc.carries[:room]
        report["samples"].append(
            {
                "line": int(lines[record]),
                "format": FORMATS[int(kinds[record])],
                "text": decode(enc.ids),
                "marked": _marked(decode, kept_ids, kept, len(enc.ids) - len(kept_ids)),
                "loss_text": decode(kept_ids[kept]),
                "tokens": int(len(enc.ids)),
                "loss_tokens": int(kept.sum()),
                "cut_tokens": int(max(0, len(enc.ids) - room)),
            }
        )
    return report


def _marked(decode, ids: np.ndarray, carries: np.ndarray, cut: int) -> str:
    """The tokens' text with each run of loss-carrying tokens in ⟦ ⟧, and the cut."""
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or carries[end] != carries[start]:
            text = decode(ids[start:end])
            pieces.append(f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if carries[start] else text)
            start = end
    if cut:
        pieces.append(f"⟪{cut} more tokens cut⟫")
    return "".join(pieces)
