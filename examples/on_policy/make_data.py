"""The example's data: single-exchange chat records from the bundled HH dialogues, and a
byte-level chat tokenizer.

    python examples/on_policy/make_data.py

writes (the same bytes on every run; both are committed, so the example needs nothing else):

- ``data/hh_chat.jsonl.gz``: ``{"messages": [{"role": "user", ...}, {"role": "assistant",
  ...}]}`` records, one per distinct user turn of the repository's HH chat dialogues
  (``data/hh_chat.jsonl.gz`` at the root, ``scripts/make_hh_chat.py``: the chosen dialogues
  of the bundled HH harmless pairs) with the assistant reply that follows it, kept when the
  turn has 12 to 64 characters and the reply 8 to 100 (ASCII): short single exchanges, so
  that a byte-level teacher and six students train in minutes on two cores. The order is
  shuffled with seed 0 (the chat dataset's held-out split is the last tenth of the file);
- ``data/tokenizer/``: a Hugging Face tokenizer whose ids 0-255 are the UTF-8 bytes, plus
  ``<|im_start|>`` (256) and ``<|im_end|>`` (257, the end-of-sequence token: sampling stops
  there), with a ChatML chat template and no default system prompt.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "data" / "hh_chat.jsonl.gz"
DATA = HERE / "data" / "hh_chat.jsonl.gz"
TOKENIZER = HERE / "data" / "tokenizer"
TURN = (12, 64)
REPLY = (8, 100)
SEED = 0

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def exchanges(messages: list[dict]) -> list[tuple[str, str]]:
    """(user turn, the assistant reply after it) of a chat record."""
    return [
        (a["content"], b["content"])
        for a, b in zip(messages, messages[1:])
        if a["role"] == "user" and b["role"] == "assistant"
    ]


def fits(text: str, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= len(text) <= bounds[1] and text.isascii()


def records() -> list[dict]:
    seen: dict[str, str] = {}
    with gzip.open(SOURCE, "rt", encoding="utf-8") as handle:
        for line in handle:
            for human, reply in exchanges(json.loads(line)["messages"]):
                if fits(human, TURN) and fits(reply, REPLY):
                    seen.setdefault(human, reply)
    chats = [
        {"messages": [{"role": "user", "content": h}, {"role": "assistant", "content": a}]}
        for h, a in seen.items()
    ]
    order = np.random.default_rng(SEED).permutation(len(chats))
    return [chats[i] for i in order]


def write_data(chats: list[dict]) -> None:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as handle:
        for chat in chats:
            handle.write((json.dumps(chat) + "\n").encode("utf-8"))
    DATA.parent.mkdir(parents=True, exist_ok=True)
    DATA.write_bytes(buffer.getvalue())


def write_tokenizer() -> None:
    from tokenizers import Tokenizer

    from kdcore.tokenizers.hf import byte_level_tokenizer_json, write_hf_tokenizer

    tok = Tokenizer.from_str(json.dumps(byte_level_tokenizer_json()))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    write_hf_tokenizer(TOKENIZER, json.loads(tok.to_str()), eos_token="<|im_end|>")
    config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    (TOKENIZER / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    chats = records()
    write_data(chats)
    write_tokenizer()
    where = f"{DATA.relative_to(HERE)}; tokenizer -> {TOKENIZER.relative_to(HERE)}"
    print(f"{len(chats)} records -> {where}")


if __name__ == "__main__":
    main()
