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
from kdcore.data.packing import LAYOUT_VERSION, LOSS_CHECK_RECORDS, Rows
from kdcore.data.prompts import Prompts
from kdcore.data.render import ChatRenderer, Encoded, RenderTimeout
from kdcore.data.sources import SourcedRecords, data_sources
from kdcore.errors import SpecError
from kdcore.hub import resolve_data_path, resolve_tokenizer_dir
from kdcore.tokenizers.simple import fingerprint

# ChatConfig is defined with the record checks that read it; this is where users import it.
__all__ = ["ChatConfig", "ChatDataset"]


def _encode(
    source: ChatRecords, renderer: ChatRenderer, record: int, limit: int | None = None
) -> Encoded:
    # A record the template ran out of time on is not rendered again (a segment is rendered
    # again when it is needed again): rejected once, it costs its budget once.
    late = source.late.get(record)
    if late is not None:
        raise RenderTimeout(late)
    data, kind, config = source.read(record), source.kind(record), source.config
    if kind == TEXT:
        return renderer.encode_text(data[config.text_feature], limit)
    messages, tools = conversation(data, kind, config)
    try:
        return renderer.encode_chat(messages, tools, config.mask_prompt, limit)
    except RenderTimeout as exc:
        source.late[record] = str(exc)
        raise


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
        # local paths, or hub names read through the Hugging Face caches (kdcore.hub); one
        # file, or several sources (kdcore.data.sources)
        self.paths = {
            name: resolve_data_path(path, setup.base_dir)
            for name, path in data_sources(config.path).items()
        }
        self.path = next(iter(self.paths.values()))
        # the sources' names (route's by = "source"); None: one file
        self.source_names = None if isinstance(config.path, str) else list(self.paths)
        self.renderer = ChatRenderer(
            resolve_tokenizer_dir(config.tokenizer, setup.base_dir, "$.data.params.tokenizer"),
            data=self.path,
        )
        self.tokenizer = self.renderer.tokenizer
        # kd eval passes the run's saved tokenizer: the template's folder must still hold it
        given = getattr(setup, "tokenizer", None)
        if given is not None and fingerprint(given) != fingerprint(self.tokenizer):
            raise SpecError(
                f"the tokenizer in {self.renderer.folder} is not the one this run was trained "
                "with @ $.data.params.tokenizer"
            )
        if self.source_names is None:
            self.source = ChatRecords(self.path, config)
        else:
            self.source = SourcedRecords(self.paths, config)
        self.index = self.source.index
        self.records, self.records_read = len(self.source), self.source.lines_read
        if (self.index.kinds != TEXT).any() and not self.renderer.has_template:
            raise SpecError(
                f"tokenizer folder {self.renderer.folder} has no chat template "
                f"(tokenizer_config.json 'chat_template'): the chat records of {self.path} "
                "cannot be rendered @ $.data.params.tokenizer"
            )
        if (self.index.kinds != TEXT).any():
            self.renderer.turn_end()  # a template that never ends is refused here, once
        split = {"val_fraction": config.val_fraction, "seed": self.seed}  # rows and prompts alike
        # The rows and prompts get functions of the records and the renderer, not bound
        # methods: holding the dataset would make a reference cycle, and the spooled copy of
        # a .gz file would outlive the dataset until the cycle collector runs.
        # rows keep a record's first seq_len + 1 tokens: a longer one is tokenized only so far
        encode = functools.partial(_encode, self.source, self.renderer, limit=self.seq_len + 1)
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
        self._has_loss: set[str] = set()

    # ------------------------------------------------------------ records

    def encode(self, record: int, limit: int | None = None) -> Encoded:
        """Record ``record`` (0-based, among the kept records in file order) as tokens and
        loss marks, uncut; with ``limit``, tokenized only as far as its first ``limit``
        tokens need when it is far longer (``Encoded.exact`` False, ``total`` estimated).
        Raises ``ValueError`` when the template or the tokenizer refuses it."""
        return _encode(self.source, self.renderer, record, limit)

    def render(self, record: int) -> str:
        """The text record ``record`` is tokenized from (the template's rendering)."""
        data, kind = self.source.read(record), self.source.kind(record)
        if kind == TEXT:
            return data[self.config.text_feature]
        return self.renderer.render(*conversation(data, kind, self.config))

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
        batch = self.rows.gather(split, self.rows.picks(index, batch_size, split))
        if split == "train":
            self.require_loss(split)
        return batch

    def batches(self, batch_size: int, split: str = "val", limit: int | None = None):
        """Consecutive batches covering the split once (the last one may be short)."""
        if split == "train":
            self.require_loss(split)
        n = self.num_examples(split)
        for count, start in enumerate(range(0, n, batch_size)):
            if limit is not None and count >= limit:
                return
            yield self.rows.gather(split, list(range(start, min(n, start + batch_size))))

    def require_loss(self, split: str = "train") -> None:
        """Raise ``SpecError`` when the split has records but not one loss-carrying token
        (every record refused by the template, or cut before its assistant turns): training
        on it would log a loss of 0 and learn nothing. Renders the split's segments in order
        until one carries loss: the first, as a rule; when none does, all of them or
        ``LOSS_CHECK_RECORDS`` records (a random sample of a larger split)."""
        if split in self._has_loss or not len(self.rows.plans[split].order):
            return
        if self.rows.has_loss(split, LOSS_CHECK_RECORDS):
            self._has_loss.add(split)
            return
        s = self.rows.stats(split, max_records=0)[split]  # what was rendered, no more
        records, refused, cut = s["scanned"], s["rejected"], s["loss_cut_records"]
        scope = (
            f"of its {records} records"
            if records == s["of"]
            else f"in {records} of its {s['of']} records, drawn at random"
        )
        why = [f"{refused} refused by the chat template"] if refused else []
        if cut:
            why.append(
                f"{cut} lost every loss token to the cut at seq_len {self.seq_len} "
                f"({self.seq_len + 1} tokens a record)"
            )
        if records - refused - cut:
            why.append(f"{records - refused - cut} carry none (no assistant turn content)")
        fixes = []
        if cut:
            fixes.append(
                "raise seq_len (a record keeps its first seq_len + 1 tokens) or shorten the "
                "turns before the assistant's"
            )
        if refused:
            first = "; ".join(f"line {r['line']}: {r['reason']}" for r in self.rejected[:3])
            fixes.append(f"fix the records or the template ({first})")
        where = "$.data.params.seq_len" if cut else "$.data.params.path"
        raise SpecError(
            f"the {split} split of {self.path} has no loss tokens {scope}: "
            f"{', '.join(why)}. To train: {'; '.join(fixes) or 'add assistant turns'} @ {where}"
        )

    def track_records(self) -> None:
        """From now on every batch also holds ``record_id`` [B, L]: the record (0-based, as
        :meth:`encode` takes it) whose token each position predicts, -1 on padding."""
        self.rows.track_records = True

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
        lost; estimated for a record far longer than a row, tokenized only in part),
        ``overflow_records``/``overflow_tokens`` (cut because a packed segment ran out of
        room), ``loss_cut_records`` (records that carry loss, none of it in their row).
        Renders the records not yet rendered, a segment at a time (at most
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
