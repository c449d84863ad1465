"""Cut the three domain corpora shipped in ``data/`` from the full data sets.

Run once by the maintainers (the slices are committed); ``run.sh`` does not need it::

    python examples/multi_teacher/prepare_data.py /work/shared/data

Each slice is the first ``--chars`` characters of its domain, in file order, so the cut is
reproducible: tinyshakespeare as it is; GSM8K as "Question: ...\\nAnswer: ...\\n\\n"
records; HH-RLHF harmless dialogues (the ``chosen`` side) separated by blank lines.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _take(pieces, limit: int) -> str:
    out, size = [], 0
    for piece in pieces:
        if size + len(piece) > limit:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def shakespeare(source: Path, limit: int) -> str:
    return (source / "tinyshakespeare.txt").read_text(encoding="utf-8")[:limit]


def gsm8k(source: Path, limit: int) -> str:
    def records():
        with open(source / "gsm8k_train.jsonl", encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                yield f"Question: {row['question']}\nAnswer: {row['answer']}\n\n"

    return _take(records(), limit)


def dialogues(source: Path, limit: int) -> str:
    def records():
        with gzip.open(source / "hh_harmless_pairs.jsonl.gz", "rt", encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)["chosen"].strip() + "\n\n"

    return _take(records(), limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with the full data sets")
    parser.add_argument("--chars", type=int, default=200_000)
    args = parser.parse_args()
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    for name, cut in (("shakespeare", shakespeare), ("gsm8k", gsm8k), ("dialogue", dialogues)):
        text = cut(args.source, args.chars)
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"{name}: {len(text):,} characters")


if __name__ == "__main__":
    main()
