"""The ``chat`` dataset: mlx-lm's JSONL record formats, rendered with the tokenizer's own
chat template, loss on assistant turns, packed rows, read in bounded memory.

One module a concept, each documenting its part:

- :mod:`kdcore.data.chat_index`: the record formats (chat, completion, text), the one pass
  that checks and indexes the file, reading a record back;
- :mod:`kdcore.data.render`: the chat template, and which tokens carry loss
  (``mask_prompt``);
- :mod:`kdcore.data.packing`: rows of ``seq_len + 1`` tokens, packing, segments, and which
  rows make batch ``i``;
- :mod:`kdcore.data.prompts`: the prompts of on-policy methods;
- :mod:`kdcore.data.chat_inspect`: ``kd data inspect``'s report.
"""

from __future__ import annotations

import functools
import hashlib
import json

import attrs
import numpy as np

from kdcore.data import chat_inspect
from kdcore.data.chat_index import TEXT, ChatConfig, ChatRecords, conversation
from kdcore.data.packing import LAYOUT_VERSION, Rows
from kdcore.data.prompts import Prompts
from kdcore.data.render import ChatRenderer, Encoded
from kdcore.errors import SpecError
from kdcore.hub import resolve_data_path, resolve_tokenizer_dir
from kdcore.tokenizers.simple import fingerprint

# ChatConfig is defined with the record checks that read it; this is where users import it.
__all__ = ["ChatConfig", "ChatDataset"]


def _encode(source: ChatRecords, renderer: ChatRenderer, record: int) -> Encoded:
    data, kind, config = source.read(record), source.kind(record), source.config
    if kind == TEXT:
        return renderer.encode_text(data[config.text_feature])
    messages, tools = conversation(data, kind, config)
    return renderer.encode_chat(messages, tools, config.mask_prompt)


def _prompt(source: ChatRecords, renderer: ChatRenderer, record: int) -> list[int] | None:
    if not source.index.prompted[record]:
        return None
    return renderer.prompt_ids(*source.prompt_turns(record))


class ChatDataset:
    """mlx-lm chat/completion/text JSONL rendered with the tokenizer's chat template; loss on
    assistant turns. See the module docstring for where the formats, masks, packing and
    memory are described."""

    def __init__(self, config: ChatConfig, setup):
        self.config = config
        self.seed = setup.seed
        self.seq_len = config.seq_len
        # local paths, or hub names read through the Hugging Face caches (kdcore.hub)
        self.path = resolve_data_path(config.path, setup.base_dir)
        self.renderer = ChatRenderer(
            resolve_tokenizer_dir(config.tokenizer, setup.base_dir, "$.data.params.tokenizer")
        )
        self.tokenizer = self.renderer.tokenizer
        # kd eval passes the run's saved tokenizer: the template's folder must still hold it
        given = getattr(setup, "tokenizer", None)
        if given is not None and fingerprint(given) != fingerprint(self.tokenizer):
            raise SpecError(
                f"the tokenizer in {self.renderer.folder} is not the one this run was trained "
                "with @ $.data.params.tokenizer"
            )
        self.source = ChatRecords(self.path, config)
        self.index = self.source.index
        self.records, self.records_read = len(self.source), self.source.lines_read
        if (self.index.kinds != TEXT).any() and not self.renderer.has_template:
            raise SpecError(
                f"tokenizer folder {self.renderer.folder} has no chat template "
                f"(tokenizer_config.json 'chat_template'): the chat records of {self.path} "
                "cannot be rendered @ $.data.params.tokenizer"
            )
        split = {"val_fraction": config.val_fraction, "seed": self.seed}  # rows and prompts alike
        # The rows and prompts get functions of the records and the renderer, not bound
        # methods: holding the dataset would make a reference cycle, and the spooled copy of
        # a .gz file would outlive the dataset until the cycle collector runs.
        encode = functools.partial(_encode, self.source, self.renderer)
        self.rows = Rows(
            self.index,
            encode,
            self.source.reject,
            seq_len=self.seq_len,
            pack=config.pack,
            **split,
        )
        prompt = functools.partial(_prompt, self.source, self.renderer)
        self._prompts = Prompts(self.index.prompted, prompt, **split)
        self._fingerprint: str | None = None

    # ------------------------------------------------------------ records

    def encode(self, record: int) -> Encoded:
        """Record ``record`` (0-based, among the kept records in file order) as tokens and
        loss marks, uncut. Raises ``ValueError`` when the template refuses it."""
        return _encode(self.source, self.renderer, record)

    def render(self, record: int) -> str:
        """The text record ``record`` is tokenized from (the template's rendering)."""
        return self.encode(record).text

    def prompted_records(self, split: str = "train") -> np.ndarray:
        """The records of ``split`` (``"train"`` or ``"val"``) that have a prompt: a turn
        before their first assistant turn. In file order."""
        return self._prompts.records(split)

    def prompt_turns(self, record: int) -> tuple[list, list | None]:
        """Record ``record``'s turns before its first assistant turn and its tools: the
        conversation :meth:`prompt` renders."""
        return self.source.prompt_turns(record)

    def prompt(self, record: int) -> list[int] | None:
        """The tokens before record ``record``'s first assistant turn's content, as the
        template renders them with ``add_generation_prompt=True``; None for a text record,
        one that opens with an assistant turn, or one the template refuses."""
        return _prompt(self.source, self.renderer, record)

    # ------------------------------------------------------------ the Dataset interface

    def num_examples(self, split: str = "train") -> int:
        return self.rows.plans[split].rows

    def num_tokens(self, split: str = "train") -> int:
        """Loss-carrying tokens of the split (renders every record not yet rendered)."""
        return self.stats(split)[split]["loss_tokens"]

    def batch(self, index: int, batch_size: int, split: str = "train") -> dict[str, np.ndarray]:
        """Batch number ``index``: rows drawn without replacement, epoch by epoch; in the
        train split each epoch visits the segments in an order drawn from (seed, epoch).
        ``example_index`` [B] says which rows of the split they are."""
        if self.num_examples(split) == 0:
            raise SpecError(
                f"the {split} split of {self.path} is empty ({self.records} records kept, "
                f"{self.rejected_count} rejected; kd data inspect shows why)"
            )
        return self.rows.gather(split, self.rows.picks(index, batch_size, split))

    def batches(self, batch_size: int, split: str = "val", limit: int | None = None):
        """Consecutive batches covering the split once (the last one may be short)."""
        n = self.num_examples(split)
        for count, start in enumerate(range(0, n, batch_size)):
            if limit is not None and count >= limit:
                return
            yield self.rows.gather(split, list(range(start, min(n, start + batch_size))))

    def layout(self, example: int, split: str = "train") -> list[tuple[int, int, int]]:
        """(line, first slot, tokens) of each record in row ``example`` of ``split``, by
        place in the row; a row's slots are its ``seq_len + 1`` tokens."""
        return self.rows.layout(example, split)

    def fingerprint(self) -> str:
        """A hash of the kept records, the parameters that shape rows, the template and the
        vocabulary: equal exactly when the rows are."""
        if self._fingerprint is None:
            params = attrs.asdict(self.config)
            for where in ("path", "tokenizer"):  # where the files are does not shape rows
                params.pop(where)
            digest = hashlib.sha256()
            for part in (
                self.source.digest,
                json.dumps(params, sort_keys=True),
                self.renderer.template,
                self.renderer.encoder.to_str(),
                str(LAYOUT_VERSION),
            ):
                digest.update(part.encode("utf-8"))
                digest.update(b"\0")
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    # ------------------------------------------------------------ prompts (on-policy)

    def num_prompts(self, split: str = "train") -> int:
        """Records of the split that have a prompt (chat and completion records with a
        turn before their first assistant turn)."""
        return len(self._prompts.records(split))

    def prompts(
        self, index: int, batch_size: int, split: str = "train", max_tokens: int | None = None
    ) -> list[list[int]]:
        """Batch number ``index`` of prompts: per record, the token ids of everything before
        its first assistant turn's content, as the template renders ``messages[:first]``
        with ``add_generation_prompt=True`` (for Qwen: ending ``<|im_start|>assistant\\n``),
        unpadded and uncut (``max_tokens``: only the last that many). Records are drawn
        without replacement, epoch by epoch, in an order drawn from (seed, epoch) in the
        train split and in file order in val: a pure function of (seed, index). A record
        the template refuses is replaced by the next one in that order."""
        return self._prompts.batch(index, batch_size, split, max_tokens)

    # ------------------------------------------------------------ statistics

    def stats(self, split: str | None = None, max_records: int | None = None) -> dict:
        """Per split: ``rows``, ``records`` placed, ``rejected`` (by the template),
        ``tokens``, ``loss_tokens``, ``padding_share`` (row slots holding no token),
        ``cut_records``/``cut_tokens`` (records longer than ``seq_len + 1``, and what they
        lost), ``overflow_records``/``overflow_tokens`` (cut because a packed segment ran
        out of room). Renders the records not yet rendered, a segment at a time (at most
        ``max_records`` of them; ``scanned`` says how many records the numbers cover)."""
        return self.rows.stats(split, max_records)

    @property
    def rejected(self) -> list[dict]:
        """The rejected lines found so far, by line (``{"line", "reason"}``; the first
        ``KEPT_REJECTIONS``): when the file was read, and records the template refused
        when they were first rendered."""
        return self.source.rejected

    @property
    def rejected_count(self) -> int:
        return self.source.rejected_count

    def inspect(self, limit: int = 3) -> dict:
        return chat_inspect.inspect(self, limit)
