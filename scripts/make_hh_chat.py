"""Make ``data/hh_chat.jsonl.gz``: the bundled HH harmless dialogues as chat records.

    python scripts/make_hh_chat.py [SOURCE] [OUT]

Reads the preference pairs (``examples/preference/data/hh_harmless_pairs.jsonl.gz``, a copy
of the shared ``hh_harmless_pairs.jsonl.gz``: Anthropic hh-rlhf, MIT) and writes, for each
pair, its *chosen* dialogue as ``{"messages": [{"role": "user"|"assistant", "content"}]}``
(the ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` turns, in order), for the ``chat`` dataset and
on-policy distillation (whose prompts are the turns before the first assistant reply). A
dialogue whose turns do not alternate user/assistant, start with the user and end with the
assistant, or that has an empty turn, is left out. The same input always gives a
byte-identical file (input order, gzip without a timestamp).
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "examples" / "preference" / "data" / "hh_harmless_pairs.jsonl.gz"
OUT = ROOT / "data" / "hh_chat.jsonl.gz"
TURN = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}


def messages(dialogue: str) -> list[dict] | None:
    """The turns of an HH dialogue, or None when they are not a clean user/assistant
    alternation that ends with the assistant."""
    marks = list(TURN.finditer(dialogue))
    if not marks or marks[0].start() != 0:
        return None
    turns = []
    for mark, after in zip(marks, marks[1:] + [None]):
        content = dialogue[mark.end() : after.start() if after else len(dialogue)].strip()
        turns.append({"role": ROLES[mark.group(1)], "content": content})
    roles = [t["role"] for t in turns]
    alternate = all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))
    if not alternate or roles[-1] != "assistant" or not all(t["content"] for t in turns):
        return None
    return turns


def main(source: Path, out: Path) -> None:
    kept = skipped = 0
    lines = []
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            turns = messages(json.loads(line)["chosen"])
            if turns is None:
                skipped += 1
                continue
            lines.append(json.dumps({"messages": turns}, ensure_ascii=False) + "\n")
            kept += 1
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as handle:
        handle.write("".join(lines).encode("utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    print(f"{out}: {kept} dialogues ({skipped} left out)")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0]) if args else SOURCE, Path(args[1]) if len(args) > 1 else OUT)
