"""The chat records of the real-model quality tables: GSM8K and HH, split into training and
held-out records that never overlap.

    python examples/real_quality/make_data.py

Reads two files the repository already bundles (both MIT):

- ``examples/smollm2/data/gsm8k_chat.jsonl``: the first 2,000 GSM8K training problems as
  chat records (``examples/smollm2/make_data.py``);
- ``data/hh_chat.jsonl.gz``: the chosen dialogues of the HH harmless pairs as chat records
  (``scripts/make_hh_chat.py``; 1,150 dialogues, most of them several turns).

and writes, into ``data/`` beside this script (the same bytes on every run: gzip without a
timestamp, a fixed shuffle):

- ``train.jsonl.gz``: every record that is not held out, GSM8K and HH shuffled together
  (seed 0) so that any prefix (``max_records``) holds both in about their proportion;
- ``heldout.jsonl.gz``: the last ``--heldout`` records of each source, GSM8K first, then HH
  (``manifest.json`` says which records are which, for per-source figures);
- ``manifest.json``: the counts, the sources and their licences.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GSM8K = ROOT / "examples" / "smollm2" / "data" / "gsm8k_chat.jsonl"
HH = ROOT / "data" / "hh_chat.jsonl.gz"
OUT = HERE / "data"
HELDOUT = 200  # per source: 400 held-out records in all
SEED = 0


def read_records(path: Path) -> list[dict]:
    """The chat records of a JSONL file (``.gz`` too); a bad line is an error, not a skip."""
    if not path.is_file():
        raise SystemExit(f"missing input {path}: it is part of the repository")
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get("messages"), list) or not record["messages"]:
                raise SystemExit(f"{path}:{number}: not a chat record (no 'messages' list)")
            records.append({"messages": record["messages"]})
    return records


def write_gz(path: Path, records: list[dict]) -> None:
    """JSONL, gzip with no timestamp or name in its header: the same records, the same bytes."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as handle:
        handle.write(text.encode("utf-8"))
    path.write_bytes(buffer.getvalue())


def split(records: list[dict], heldout: int, name: str) -> tuple[list[dict], list[dict]]:
    if heldout < 1 or heldout >= len(records):
        raise SystemExit(f"--heldout {heldout} must be in [1, {len(records) - 1}] for {name}")
    return records[:-heldout], records[-heldout:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", type=int, default=HELDOUT, help="held-out records per source")
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args(argv)
    gsm_train, gsm_held = split(read_records(GSM8K), args.heldout, "GSM8K")
    hh_train, hh_held = split(read_records(HH), args.heldout, "HH")
    train = gsm_train + hh_train
    random.Random(SEED).shuffle(train)
    args.output.mkdir(parents=True, exist_ok=True)
    write_gz(args.output / "train.jsonl.gz", train)
    write_gz(args.output / "heldout.jsonl.gz", gsm_held + hh_held)
    manifest = {
        "train": {"records": len(train), "gsm8k": len(gsm_train), "hh": len(hh_train)},
        "heldout": {
            "records": len(gsm_held) + len(hh_held),
            # record i of heldout.jsonl.gz is GSM8K for i < gsm8k, HH after
            "gsm8k": len(gsm_held),
            "hh": len(hh_held),
        },
        "sources": {
            "gsm8k": f"{GSM8K.relative_to(ROOT)} (OpenAI grade-school-math, MIT)",
            "hh": f"{HH.relative_to(ROOT)} (Anthropic hh-rlhf harmless-base, chosen, MIT)",
        },
        "seed": SEED,
    }
    (args.output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(
        f"{len(train)} training records ({len(gsm_train)} GSM8K, {len(hh_train)} HH), "
        f"{len(gsm_held) + len(hh_held)} held out -> {args.output}"
    )


if __name__ == "__main__":
    main()
