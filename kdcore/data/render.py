"""The chat dataset's rendering: records to tokens with the tokenizer's own chat template, and
which of those tokens carry loss.

Chat and completion records are rendered by the chat template of the tokenizer folder
(``tokenizer_config.json`` / ``chat_template.jinja``), loaded through mlx-lm's
``TokenizerWrapper`` as ``mlx_lm`` trains with it, and tokenized as its
``apply_chat_template`` tokenizes (no special tokens added: the template has them).

Which tokens carry loss: with ``mask_prompt = true`` (the default), those of every
assistant turn: what rendering the turn adds after the generation prompt (its content,
tool calls and end-of-turn marker, e.g. Qwen's ``<|im_end|>\\n``). The span of turn ``k`` is
found by rendering incrementally: ``messages[:k]`` with ``add_generation_prompt=True`` and
``messages[:k+1]`` are both prefixes of the whole rendering; the characters between them are
the turn, and a token carries loss when its first character lies in one. This works with any
template (most shipped ones have no ``{% generation %}`` tags, so transformers'
``return_assistant_tokens_mask`` cannot be used with them) and is how mlx-lm itself finds its
``mask_prompt`` offset. A template that does not render prefix by prefix (one that rewrites
earlier turns) falls back to finding the turn's content in the text. mlx-lm's own
``mask_prompt`` trains on the last message only; here every assistant turn carries loss.
``mask_prompt = false`` keeps loss on every token. A record's first token never carries loss
(nothing in the record precedes it).
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np

from kdcore.errors import SpecError
from kdcore.tokenizers.hf import HFTokenizer, require_mlx_lm


@attrs.define
class Encoded:
    """One record as tokens: ``ids`` [n] int32, ``carries`` [n] bool (loss), and the text
    the tokens are of."""

    ids: np.ndarray
    carries: np.ndarray
    text: str


class ChatRenderer:
    """A tokenizer folder's chat template and tokenizer, as mlx-lm loads them."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise SpecError(
                f"the chat dataset needs a Hugging Face tokenizer folder: {folder} has no "
                "tokenizer.json @ $.data.params.tokenizer"
            )
        require_mlx_lm()
        from mlx_lm.tokenizer_utils import load
        from tokenizers import Tokenizer

        try:
            self.wrapper = load(folder)
        except Exception as exc:  # transformers' errors for a broken folder vary
            raise SpecError(
                f"cannot load the tokenizer in {folder}: {exc} @ $.data.params.tokenizer"
            ) from None
        self.folder = folder
        template = getattr(self.wrapper, "chat_template", None)
        self.template = template if isinstance(template, str) else json.dumps(template)
        self.has_template = bool(self.wrapper.has_chat_template)
        # A private copy of transformers' backend tokenizer: the ids apply_chat_template
        # gives, with character offsets, and no padding or truncation state shared.
        self.encoder = Tokenizer.from_str(self.wrapper.backend_tokenizer.to_str())
        self.encoder.no_truncation()
        self.encoder.no_padding()
        self.tokenizer = HFTokenizer(self.encoder, source=folder)
        self.eos = self.wrapper.eos_token_id
        self._turn_end: str | None = None

    def render(self, messages: list, tools: list | None, generation: bool = False) -> str:
        return self.wrapper.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation
        )

    def encode_text(self, text: str) -> Encoded:
        """A text record: tokenized as is, an end-of-sequence token added when missing (as
        mlx-lm's ``TextDataset``), every token but the first carrying loss."""
        ids = list(self.encoder.encode(text, add_special_tokens=True).ids)
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
        return _encoded(ids, np.ones(len(ids), bool), text)

    def encode_chat(self, messages: list, tools: list | None, mask_prompt: bool) -> Encoded:
        """A conversation in the template, loss on its assistant turns (``mask_prompt``) or
        on every token but the first. Raises ``ValueError`` when the template refuses it."""
        try:
            text = self.render(messages, tools)
        except Exception as exc:  # the template's own checks (raise_exception)
            raise ValueError(f"the chat template refuses it: {exc}") from None
        encoding = self.encoder.encode(text, add_special_tokens=False)
        ids = encoding.ids
        if mask_prompt:
            starts = np.fromiter((a for a, _ in encoding.offsets), np.int64, len(ids))
            carries = np.zeros(len(ids), bool)
            for a, b in self.assistant_spans(messages, tools, text):
                carries |= (starts >= a) & (starts < b)
        else:
            carries = np.ones(len(ids), bool)
        return _encoded(ids, carries, text)

    def prompt_ids(self, messages: list, tools: list | None) -> list[int] | None:
        """The tokens of ``messages`` rendered with ``add_generation_prompt=True``; None when
        the template refuses them."""
        try:
            text = self.render(messages, tools, generation=True)
        except Exception:
            return None
        return list(self.encoder.encode(text, add_special_tokens=False).ids)

    def turn_end(self) -> str:
        """What the template writes after an assistant turn's content (``<|im_end|>\\n``):
        found once by rendering a probe conversation."""
        if self._turn_end is None:
            marker = "\u2063kd-probe\u2063"
            try:
                text = self.render(
                    [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                    None,
                )
                self._turn_end = text[text.index(marker) + len(marker) :]
            except Exception:  # a template that refuses the probe: no suffix known
                self._turn_end = ""
        return self._turn_end

    def assistant_spans(self, messages: list, tools: list | None, text: str) -> list:
        """(start, end) characters of each assistant turn in ``text`` (the rendering of
        ``messages``): rendered prefix by prefix, else found by its content."""
        spans, cursor = [], 0
        last = len(messages) - 1
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            span = None
            try:
                before = self.render(messages[:k], tools, generation=True) if k else None
                upto = text if k == last else self.render(messages[: k + 1], tools)
            except Exception:
                before = upto = None
            opens = before is not None and text.startswith(before) and len(before) >= cursor
            if opens and upto is not None and text.startswith(upto) and len(upto) > len(before):
                span = (len(before), len(upto))
            elif opens:  # a template that rewrites earlier turns (drops their reasoning)
                span = self._close(text, len(before))
            else:
                span = self._find(message, text, cursor)
            if span is None:
                raise ValueError(
                    f"assistant turn {k + 1} cannot be located in the template's rendering"
                )
            spans.append(span)
            cursor = span[1]
        return spans

    def _close(self, text: str, start: int) -> tuple[int, int] | None:
        """The turn that starts at ``start``: through the first end-of-turn marker after it
        (with what the template writes around the marker, e.g. the newline after it)."""
        whole = self.turn_end()
        marker = whole.strip()
        at = text.find(marker, start) if marker else -1
        if at < 0:
            return None
        lead = whole.index(marker)
        if text.startswith(whole, at - lead):
            return start, at - lead + len(whole)
        return start, at + len(marker)

    def _find(self, message: dict, text: str, cursor: int) -> tuple[int, int] | None:
        content = message.get("content")
        if not isinstance(content, str) or not content:
            return None
        start = text.find(content, cursor)
        if start < 0:
            return None
        end = start + len(content)
        suffix = self.turn_end()
        if suffix and text.startswith(suffix, end):
            end += len(suffix)
        return start, end


def _encoded(ids: list, carries: np.ndarray, text: str) -> Encoded:
    if len(carries):
        carries[0] = False  # nothing in the record precedes its first token
    return Encoded(np.asarray(ids, np.int32), carries, text)
