"""GSM8K problems as chat records (mlx-lm's ``messages`` format) for the SmolLM2 example.

The answer keeps GSM8K's worked steps and its final ``#### N`` line; the calculator
annotations ``<<48/2=24>>`` are dropped (they are tool traces, not text a model should
write). Usage: python make_data.py GSM8K_TRAIN.jsonl [--records N]
(GSM8K: MIT, OpenAI grade-school-math)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

CALCULATOR = re.compile(r"<<[^>]*>>")


def chat_record(problem: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": problem["question"].strip()},
            {"role": "assistant", "content": CALCULATOR.sub("", problem["answer"]).strip()},
        ]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", type=Path)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "data")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.source.read_text(encoding="utf-8").splitlines()]
    rows = rows[: args.records]
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / "gsm8k_chat.jsonl", "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(chat_record(row), ensure_ascii=False) + "\n")
    print(f"{len(rows)} records -> {args.output / 'gsm8k_chat.jsonl'}")


if __name__ == "__main__":
    main()
