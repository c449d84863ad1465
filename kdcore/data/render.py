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

Hostile records and templates:

- Text the tokenizer refuses (a lone surrogate such as ``"\\ud800"`` is valid JSON and a
  Python string, but not Unicode text the Rust tokenizer accepts) raises ``ValueError``, so
  that the record is rejected by number like one the template refuses.
- Rendering has a wall-clock budget, ``RENDER_SECONDS`` a rendering (a record needs one, plus
  two an assistant turn to find the loss spans). Jinja's sandbox caps one ``range`` at
  100,000 but nothing bounds nested loops or recursion, and the compiled template is plain
  Python, so a watchdog thread raises an exception into the rendering thread at the
  deadline (``PyThreadState_SetAsyncExc``: checked between bytecodes, in any thread, costing
  a few microseconds a rendering). A rendering that runs out of time raises
  :class:`RenderTimeout` (a ``ValueError``: the record is rejected); a template that runs out
  of time on the probe conversation, on each of the first ``TIMEOUT_STRIKES`` renderings, or
  for ``FILE_TIMEOUT_SECONDS`` in all is refused with a ``SpecError`` naming it.
- A record far longer than the rows need is tokenized only as far as they need it
  (``limit`` tokens, see :meth:`ChatRenderer.tokenize`): a 2 MB turn would take seconds and
  hundreds of megabytes of offsets to keep ``seq_len + 1`` tokens; its token count is then
  an estimate (``Encoded.exact``).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import threading
import time
from pathlib import Path

import attrs
import numpy as np

from kdcore.errors import SpecError
from kdcore.tokenizers.hf import HFTokenizer, load_mlx_tokenizer

# Wall-clock seconds one rendering of the template may take (a record renders in a
# millisecond; a 1,000-turn conversation's longest rendering in ~10 ms).
RENDER_SECONDS = 2.0
# A template is refused when its first renderings all run out of time (it loops on any
# record), or when the renderings that ran out of time have cost this much in all (a
# template that loops on many records would otherwise cost RENDER_SECONDS each).
TIMEOUT_STRIKES = 3
FILE_TIMEOUT_SECONDS = 30.0
# Tokenizing a prefix of a long text (``ChatRenderer.tokenize``): texts up to twice
# PREFIX_CHARS are tokenized whole; a prefix's tokens are trusted up to TAIL_CHARS before its
# end (tokenization is local: a pre-token and its merges never reach that far back).
PREFIX_CHARS = 1 << 16
TAIL_CHARS = 1024

_SURROGATE = re.compile("[\ud800-\udfff]")


class RenderTimeout(ValueError):
    """A rendering of the chat template ran out of its time budget."""


class _Overrun(BaseException):
    """Raised into a rendering thread at its deadline. A BaseException, so that the
    ``except Exception`` of the template's callers (transformers, mlx-lm) lets it through."""


class _Watchdog:
    """One daemon thread that raises :class:`_Overrun` into each thread whose rendering is
    past its deadline. ``arm``/``disarm`` take a lock and touch a dict: the thread sleeps
    until the earliest deadline and is not woken per rendering (only from idle)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._deadlines: dict[int, float] = {}
        self._fired: set[int] = set()
        self._thread: threading.Thread | None = None
        self._idle = False

    def arm(self, seconds: float) -> None:
        with self._cond:
            self._deadlines[threading.get_ident()] = time.monotonic() + seconds
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="kdcore-render-budget", daemon=True
                )
                self._thread.start()
            elif self._idle:
                self._cond.notify()

    def disarm(self) -> None:
        ident = threading.get_ident()
        with self._cond:
            self._deadlines.pop(ident, None)
            if ident in self._fired:
                self._fired.discard(ident)
                # fired but perhaps not yet delivered: cancel it, under the lock the watchdog
                # fires under, so that it can never land in the caller's later code
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for ident, deadline in self._deadlines.items():
                    if deadline <= now and ident not in self._fired:
                        self._fired.add(ident)
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(
                            ctypes.c_ulong(ident), ctypes.py_object(_Overrun)
                        )
                waiting = [d for i, d in self._deadlines.items() if i not in self._fired]
                self._idle = not waiting
                self._cond.wait(max(0.0, min(waiting) - now) if waiting else None)


# CPython's; elsewhere renderings run without a budget.
_WATCHDOG = _Watchdog() if hasattr(ctypes, "pythonapi") else None


def _new_watchdog_after_fork() -> None:
    # A forked child has no watchdog thread, and its lock may have been held at the fork.
    global _WATCHDOG
    _WATCHDOG = _Watchdog()


if _WATCHDOG is not None and hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_watchdog_after_fork)


def _within(seconds: float, render, *args):
    """``render(*args)``, or :class:`_Overrun` once it has run ``seconds``."""
    if _WATCHDOG is None:
        return render(*args)
    try:
        try:
            _WATCHDOG.arm(seconds)
            return render(*args)
        finally:
            _WATCHDOG.disarm()
    except _Overrun:
        _WATCHDOG.disarm()  # delivered inside disarm itself: finish it
        raise


def _refusal_reason(text: str, exc: Exception) -> str:
    """Why the tokenizer refused ``text``, shown without the text's bad characters."""
    found = _SURROGATE.search(text)
    if found is None:
        return f"the tokenizer refuses its text ({type(exc).__name__}: {str(exc)[:200]})"
    at = found.start()
    around = text[max(0, at - 20) : at + 20].encode("utf-8", "backslashreplace").decode()
    return (
        f"the tokenizer refuses its text: a lone surrogate {ascii(found.group())} (not "
        f"Unicode text) at character {at} of the rendering, in {around!r}"
    )


@attrs.define
class Encoded:
    """One record as tokens: ``ids`` [n] int32, ``carries`` [n] bool (loss), and the text
    the tokens are of. When the text was tokenized only as far as a ``limit``, ``ids`` are
    its first tokens (at least ``limit`` of them), ``total`` an estimate of all of its
    tokens and ``exact`` False. ``loss``: some token of the whole record carries loss
    (also one past ``ids``)."""

    ids: np.ndarray
    carries: np.ndarray
    text: str
    total: int = -1
    exact: bool = True
    loss: bool | None = None

    def __attrs_post_init__(self) -> None:
        if self.total < 0:
            self.total = len(self.ids)
        if self.loss is None:
            self.loss = bool(self.carries.any())


@attrs.define
class _Tokens:
    ids: list
    starts: np.ndarray  # first character of each token
    total: int
    covered: int  # characters of the text the ids stand for (all of it when exact)
    exact: bool


class ChatRenderer:
    """A tokenizer folder's chat template and tokenizer, as mlx-lm loads them."""

    def __init__(self, folder: Path, data: Path | None = None):
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise SpecError(
                f"the chat dataset needs a Hugging Face tokenizer folder: {folder} has no "
                "tokenizer.json @ $.data.params.tokenizer"
            )
        from tokenizers import Tokenizer

        # trust_remote_code=False: a folder's own Python is refused, with its entry named
        self.wrapper = load_mlx_tokenizer(folder, "$.data.params.tokenizer")
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
        self.data = data  # the file rendered, named when the template is refused
        self._in_time = 0  # renderings of records done within the budget
        self._late: list[float] = []  # seconds of each rendering that ran out of time

    # ------------------------------------------------------------ rendering, in a budget

    def render(self, messages: list, tools: list | None, generation: bool = False) -> str:
        """The template's rendering. Raises :class:`RenderTimeout` when it runs past
        ``RENDER_SECONDS``, and ``SpecError`` when that makes the template refused."""
        start = time.monotonic()
        try:
            text = _within(RENDER_SECONDS, self._apply, messages, tools, generation)
        except _Overrun:
            self._late.append(time.monotonic() - start)
            always = not self._in_time and len(self._late) >= TIMEOUT_STRIKES
            if always or sum(self._late) >= FILE_TIMEOUT_SECONDS:
                raise self._refused() from None
            raise RenderTimeout(
                f"the chat template took more than {RENDER_SECONDS:g} s to render it "
                "(a loop that does not end?)"
            ) from None
        self._in_time += 1
        return text

    def _apply(self, messages: list, tools: list | None, generation: bool) -> str:
        return self.wrapper.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation
        )

    def _refused(self, probe: bool = False) -> SpecError:
        of = f" records of {self.data}" if self.data else " records"
        if probe:
            what = "a two-turn probe conversation"
        elif not self._in_time:
            what = f"each of the first {len(self._late)}{of} it rendered"
        else:
            what = f"{len(self._late)}{of}, {sum(self._late):.0f} s in all"
        return SpecError(
            f"the chat template of {self.folder} takes over {RENDER_SECONDS:g} s (its budget "
            f"a rendering) on {what}: a loop that does not end? (tokenizer_config.json "
            "'chat_template' or chat_template.jinja) @ $.data.params.tokenizer"
        )

    # ------------------------------------------------------------ tokenizing

    def tokenize(self, text: str, special: bool = False, limit: int | None = None) -> _Tokens:
        """``text``'s tokens and where each starts. With a ``limit``, a text far longer than
        ``limit`` tokens need is tokenized only in part: its first tokens, at least
        ``limit`` of them, exactly as tokenizing it whole gives them (a prefix's tokens up to
        ``TAIL_CHARS`` before its end), and an estimate of the whole count. Raises
        ``ValueError`` when the tokenizer refuses the text."""
        prefix = max(PREFIX_CHARS, 16 * (limit or 0) + TAIL_CHARS)
        while limit is not None and len(text) > 2 * prefix:
            encoding = self._encode(text[:prefix], special)
            ends = np.fromiter((b for _, b in encoding.offsets), np.int64, len(encoding.ids))
            beyond = ends > prefix - TAIL_CHARS
            trusted = int(beyond.argmax()) if beyond.any() else len(ends)
            if trusted >= limit:
                covered = int(ends[trusted - 1])
                starts = np.fromiter((a for a, _ in encoding.offsets), np.int64, trusted)
                total = max(trusted + 1, round(trusted * len(text) / max(covered, 1)))
                return _Tokens(encoding.ids[:trusted], starts, total, covered, exact=False)
            prefix *= 4  # long tokens (a vocabulary of long runs): a longer prefix
        encoding = self._encode(text, special)
        ids = encoding.ids
        starts = np.fromiter((a for a, _ in encoding.offsets), np.int64, len(ids))
        return _Tokens(ids, starts, len(ids), len(text), exact=True)

    def _encode(self, text: str, special: bool):
        try:
            return self.encoder.encode(text, add_special_tokens=special)
        except Exception as exc:  # TypeError for a lone surrogate; the Rust side's errors
            raise ValueError(_refusal_reason(text, exc)) from None

    # ------------------------------------------------------------ records

    def encode_text(self, text: str, limit: int | None = None) -> Encoded:
        """A text record: tokenized as is, an end-of-sequence token added when missing (as
        mlx-lm's ``TextDataset``), every token but the first carrying loss. ``limit``: see
        :meth:`tokenize`."""
        tokens = self.tokenize(text, special=True, limit=limit)
        ids, total = list(tokens.ids), tokens.total
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            if tokens.exact:
                ids.append(self.eos)
            total += 1
        carries = np.ones(len(ids), bool)
        return _encoded(ids, carries, text, total, tokens.exact, loss=total > 1)

    def encode_chat(
        self, messages: list, tools: list | None, mask_prompt: bool, limit: int | None = None
    ) -> Encoded:
        """A conversation in the template, loss on its assistant turns (``mask_prompt``) or
        on every token but the first. ``limit``: see :meth:`tokenize`. Raises ``ValueError``
        when the template or the tokenizer refuses it (:class:`RenderTimeout` when the
        template runs out of time)."""
        try:
            text = self.render(messages, tools)
        except (RenderTimeout, SpecError):
            raise
        except Exception as exc:  # the template's own checks (raise_exception)
            reason = str(exc).encode("utf-8", "backslashreplace").decode()
            raise ValueError(f"the chat template refuses it: {reason}") from None
        tokens = self.tokenize(text, limit=limit)
        if mask_prompt:
            carries = np.zeros(len(tokens.ids), bool)
            spans = self.assistant_spans(messages, tools, text)
            for a, b in spans:
                carries |= (tokens.starts >= a) & (tokens.starts < b)
            # loss past the tokens kept: a turn that ends beyond what they stand for
            loss = bool(carries[1:].any()) or any(b > tokens.covered for _, b in spans)
        else:
            carries = np.ones(len(tokens.ids), bool)
            loss = tokens.total > 1
        return _encoded(tokens.ids, carries, text, tokens.total, tokens.exact, loss)

    def prompt_ids(self, messages: list, tools: list | None) -> list[int] | None:
        """The tokens of ``messages`` rendered with ``add_generation_prompt=True``; None when
        the template or the tokenizer refuses them."""
        try:
            text = self.render(messages, tools, generation=True)
            return list(self.tokenize(text).ids)
        except SpecError:
            raise
        except Exception:
            return None

    def turn_end(self) -> str:
        """What the template writes after an assistant turn's content (``<|im_end|>\\n``):
        found once by rendering a probe conversation. A template that runs out of time on
        it is refused (``SpecError``): it would on every record."""
        if self._turn_end is None:
            marker = "\u2063kd-probe\u2063"
            probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
            try:
                text = _within(RENDER_SECONDS, self._apply, probe, None, False)
                self._turn_end = text[text.index(marker) + len(marker) :]
            except _Overrun:
                raise self._refused(probe=True) from None
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
            except (RenderTimeout, SpecError):
                raise  # out of time: the record is rejected, not located by its content
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


def _encoded(
    ids: list,
    carries: np.ndarray,
    text: str,
    total: int = -1,
    exact: bool = True,
    loss: bool | None = None,
) -> Encoded:
    if len(carries):
        carries[0] = False  # nothing in the record precedes its first token
    return Encoded(np.asarray(ids, np.int32), carries, text, total, exact, loss)
