"""Position alignment across tokenizers: the teacher sees the student's text re-encoded,
and each student position is paired with the teacher position that predicts the same byte."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from kdcore.errors import SpecError
from kdcore.tokenizers.hf import token_byte_strings


def _teacher_text(raw: bytes) -> tuple[str, np.ndarray, np.ndarray]:
    """(text, text-byte ends, original-byte ends) per character of ``raw`` decoded.

    Bytes that are not valid UTF-8 (a window cut inside a character) become U+FFFD for the
    teacher, one per byte, so offsets after them still map back to ``raw``.
    """
    decoded = raw.decode("utf-8", errors="surrogateescape")
    chars, text_len, raw_len = [], [], []
    for c in decoded:
        if "\udc80" <= c <= "\udcff":
            chars.append("\ufffd")
            text_len.append(3)
            raw_len.append(1)
        else:
            chars.append(c)
            n = len(c.encode("utf-8"))
            text_len.append(n)
            raw_len.append(n)
    return "".join(chars), np.cumsum(text_len, dtype=np.int64), np.cumsum(raw_len, dtype=np.int64)


class Retokenizer:
    """Student ids -> teacher ids for the same text, and which teacher position each student
    position reads (see the module doc for the two ``alignment`` rules)."""

    def __init__(
        self,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        alignment: Literal["offsets", "position"] = "offsets",
        pad_id: int = 0,
    ):
        if alignment not in ("offsets", "position"):
            raise SpecError(f"alignment must be 'offsets' or 'position', got {alignment!r}")
        self.student_bytes = token_byte_strings(student_tokenizer)
        self.teacher_bytes = token_byte_strings(teacher_tokenizer)
        self.teacher = teacher_tokenizer
        self.alignment = alignment
        self.pad_id = pad_id

    def row(self, ids: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(teacher ids, teacher index [Ls], mask [Ls]) for one row of student ids."""
        sb = self.student_bytes
        pieces = [sb[i] if 0 <= i < len(sb) else b"" for i in np.asarray(ids).tolist()]
        s_ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
        text, text_ends, raw_ends = _teacher_text(b"".join(pieces))
        t_ids = self.teacher.encode(text) or [self.pad_id]
        L = len(pieces)
        index = np.zeros(L, np.int32)
        mask = np.zeros(L, np.float32)
        if self.alignment == "position":
            n = min(L, len(t_ids))
            index[:n] = np.arange(n)
            mask[:n] = 1.0
            return t_ids, index, mask
        tb = self.teacher_bytes
        t_pieces = [tb[j] if 0 <= j < len(tb) else b"" for j in t_ids]
        if b"".join(t_pieces) != text.encode("utf-8"):
            raise SpecError(
                "the teacher's tokenizer does not reproduce the text byte for byte (it "
                "normalises it), so positions cannot be aligned by offsets; use "
                'alignment = "position" @ $.teachers.params.alignment'
            )
        to_raw = dict(zip(text_ends.tolist(), raw_ends.tolist()))
        to_raw[0] = 0
        where = {}
        for j, end in enumerate(np.cumsum([len(p) for p in t_pieces]).tolist()):
            raw = to_raw.get(end)  # None: the teacher token ends inside a character
            if raw is not None:
                where[raw] = j
        for i, end in enumerate(s_ends.tolist()):
            j = where.get(end)
            if j is not None:
                index[i] = j
                mask[i] = 1.0
        return t_ids, index, mask

    def __call__(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(teacher ids [B, Lt] right-padded, index [B, Ls], mask [B, Ls])."""
        rows = [self.row(r) for r in np.asarray(input_ids)]
        Lt = max(len(r[0]) for r in rows)
        t_ids = np.full((len(rows), Lt), self.pad_id, np.int32)
        for b, (ids, _, _) in enumerate(rows):
            t_ids[b, : len(ids)] = ids
        return t_ids, np.stack([r[1] for r in rows]), np.stack([r[2] for r in rows])
