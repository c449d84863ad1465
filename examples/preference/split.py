"""Deterministic train/held-out split of the bundled HH harmless pairs, with safety flags.

    python examples/preference/split.py OUT_DIR

writes three disjoint pair files, ``OUT_DIR/heldout.jsonl.gz`` (the test split, read only
at the end), ``OUT_DIR/tune.jsonl.gz`` (a validation split for choosing the DPO settings,
see tune.py) and ``OUT_DIR/train.jsonl.gz`` (everything else: what the teachers and students
are trained on), and ``OUT_DIR/sft.txt.gz`` (the chosen dialogues of the training pairs, for
the teacher's cross-entropy stage). The same input always gives byte-identical files
(seeded permutation, gzip without a timestamp).

Safety flags: HH harmless data has none, so a pair gets ``"safety": CATEGORY`` when the
human turns of its prompt match one of the keyword patterns below (first category that
matches, in this order; lower-cased, matched at word starts), else ``"safety": false``.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).parent / "data" / "hh_harmless_pairs.jsonl.gz"
HELDOUT = 250
TUNE = 150
SEED = 0

CATEGORIES = {
    "self_harm": r"suicide|kill myself|self[- ]harm|cut myself",
    "violence": r"kill|murder|hurt|attack|shoot|stab|punch|beat up|weapon|gun|bomb|explosive|"
    r"torture|fight",
    "crime": r"steal|rob|shoplift|break into|burglar|illegal|launder|fraud|scam|hack|"
    r"counterfeit|smuggl|cheat|get away with|trespass|vandal",
    "drugs": r"drugs?\b|cocaine|heroin|meth\b|weed|marijuana|overdose|poison|drunk",
    "hate_harassment": r"racis|slur|n-word|hate|stupid|idiot|ugly|insult|offensive|"
    r"black people|white people|jews?\b|muslims?\b|gay",
    "sexual": r"sex|porn|nude|naked|rape|prostitut",
    "privacy": r"address|phone number|social security|password|credit card",
}
PATTERNS = {k: re.compile(r"\b(?:" + v + ")") for k, v in CATEGORIES.items()}


def human_turns(dialogue: str) -> str:
    """The human turns of the dialogue before its last assistant turn, lower-cased."""
    prompt = dialogue[: dialogue.rfind("\n\nAssistant:")]
    turns = [seg.split("\n\nAssistant:")[0] for seg in prompt.split("\n\nHuman:")[1:]]
    return " ".join(turns).lower()


def safety_category(record: dict) -> str | bool:
    text = human_turns(record.get("chosen", ""))
    for name, pattern in PATTERNS.items():
        if pattern.search(text):
            return name
    return False


def write_gz(path: Path, text: str) -> None:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as handle:
        handle.write(text.encode("utf-8"))
    path.write_bytes(buffer.getvalue())


def main(out: Path) -> None:
    with gzip.open(SOURCE, "rt", encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    order = np.random.default_rng(SEED).permutation(len(lines))
    records = []
    for i in order:
        record = json.loads(lines[i])
        record["safety"] = safety_category(record)
        records.append(record)
    heldout, tune = records[:HELDOUT], records[HELDOUT : HELDOUT + TUNE]
    train = records[HELDOUT + TUNE :]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("tune", tune), ("heldout", heldout)):
        write_gz(out / f"{name}.jsonl.gz", "".join(json.dumps(r) + "\n" for r in part))
    write_gz(out / "sft.txt.gz", "".join(r["chosen"] for r in train))
    flagged = sum(bool(r["safety"]) for r in heldout)
    print(
        f"{out}: {len(train)} train, {len(tune)} tune, {len(heldout)} held-out pairs "
        f"({flagged} held-out safety pairs)"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "out" / "data")
