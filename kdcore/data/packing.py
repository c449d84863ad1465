"""The chat dataset's rows: records placed into rows of ``seq_len + 1`` tokens, a segment of
rows at a time, and batches drawn from them.

Rows hold ``seq_len + 1`` tokens (``seq_len`` inputs, each predicting the next). A record
longer than that is cut to its first ``seq_len + 1`` tokens; ``stats()`` and ``kd data
inspect`` count the cut records and tokens. With ``pack = true`` several records share a row
(attention stays causal over the whole row: a record sees the records before it in its row,
as in most packed training; the built-in models take no attention mask); ``stats()``
reports the padding share. ``pack = false``: one record a row, padded (id 0).

Records are read, rendered and tokenized a *segment* at a time (``PACK_ROWS`` rows of
records), when a batch first needs them; a few segments are kept. A record the template
refuses (a Jinja ``raise_exception``) is rejected when first rendered.

Rows are fixed by the data and the parameters alone: the train records, in an order fixed by
``PACK_SEED``, are cut into segments by an estimate of their token counts (a least-squares
fit of tokens on characters and turns over a sample rendered at start-up): a record
estimated at a row or more takes a row, shorter ones are aimed at ``PACK_FILL`` of the room
they take. A segment's records are then placed into its rows exactly, longest first, each
into the fullest row it fits in; one that fits nowhere (the estimate was low) is cut to the
room left and counted as ``overflow`` in ``stats()``. Train batch ``i`` is a pure function
of (seed, i): each epoch visits the segments in an order drawn from (seed, epoch), their
rows in turn. The val split is the last ``val_fraction`` of the records, in file order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import attrs
import numpy as np

from kdcore.data.render import Encoded
from kdcore.losses.tokens import IGNORE_INDEX

# Rows per segment: the unit read, rendered and packed together (more rows pack tighter,
# fewer read less per batch).
PACK_ROWS = 16
# Share of a segment's room its records' estimated tokens aim at: the headroom absorbs the
# estimate's error, so that records almost never overflow.
PACK_FILL = 0.9
# The order of the train records in segments: fixed, so the rows (and an offline teacher
# cache made for them) do not depend on the run's seed.
PACK_SEED = 0
# Records rendered at start-up to fit the token estimate.
CALIBRATION_RECORDS = 64
# Segments kept rendered.
KEPT_SEGMENTS = 8
# Records rendered, at most, to find that a split carries no loss token at all (all of them
# in a smaller split): the check of the first batch costs seconds, not an epoch.
LOSS_CHECK_RECORDS = 10_000
# Bumped when the same data and parameters would give other rows (a cache made for the old
# rows then no longer matches).
LAYOUT_VERSION = 1

_STATS = (
    "records",
    "rejected",
    "tokens",
    "loss_tokens",
    "cut_records",
    "cut_tokens",
    "overflow_records",
    "overflow_tokens",
    "loss_cut_records",  # records that carry loss, none of it in their row (cut, overflow)
)


@attrs.define
class _Plan:
    """A split's rows: its records in segment order, where each segment starts in that order
    and in the rows."""

    order: np.ndarray  # record ids
    seg_starts: np.ndarray  # [segments + 1] into order
    row_starts: np.ndarray  # [segments + 1] example ids

    @property
    def segments(self) -> int:
        return len(self.seg_starts) - 1

    @property
    def rows(self) -> int:
        return int(self.row_starts[-1])


@attrs.define
class _Segment:
    ids: np.ndarray  # [rows, seq_len + 1] int32
    carries: np.ndarray  # [rows, seq_len + 1] bool
    layout: list  # per row: [(line, start, tokens)]
    stats: np.ndarray  # [len(_STATS)] int64
    records: np.ndarray  # [rows, seq_len + 1] int32: the record of each slot, -1 on padding


def _fit_estimate(turns: np.ndarray, chars: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Coefficients (per record, per turn, per character) of a least-squares fit of token
    counts, none negative (a negative one is dropped and the rest refitted)."""
    features = np.stack([np.ones(len(chars)), turns, chars], axis=1).astype(np.float64)
    active = [0, 1, 2]
    coef = np.zeros(3)
    while active:
        solution = np.linalg.lstsq(features[:, active], tokens.astype(np.float64), rcond=None)[0]
        if (solution >= 0).all():
            coef[:] = 0
            coef[active] = solution
            return coef
        active = [a for a, s in zip(active, solution) if s >= 0]
    return np.array([float(np.mean(tokens)), 0.0, 0.0])


def _place(items: list[tuple[int, Encoded]], rows: int, room: int, pack: bool):
    """Records into ``rows`` rows of ``room`` tokens: one a row, or packed longest first,
    each into the fullest row it fits in (best fit decreasing), else cut to the room of the
    emptiest row. Yields (row, start, record index, tokens kept)."""
    if not pack:
        for row, (index, enc) in enumerate(items):
            yield row, 0, index, min(len(enc.ids), room)
        return
    left = [room] * rows
    for index, enc in sorted(items, key=lambda item: -min(len(item[1].ids), room)):
        size = min(len(enc.ids), room)
        fits = [r for r in range(rows) if left[r] >= size]
        row = (
            min(fits, key=lambda r: (left[r], r))
            if fits
            else max(range(rows), key=lambda r: (left[r], -r))
        )
        keep = min(size, left[row])
        if keep >= 2:  # a single token would carry no loss: not worth a place
            yield row, room - left[row], index, keep
            left[row] -= keep
        else:
            yield row, -1, index, 0


class Rows:
    """The train and val rows of indexed records: planned from the index when built, filled
    a segment at a time when first needed.

    ``index`` is the records' index (``lines``, ``turns``, ``chars``); ``encode(record)``
    gives a record's tokens or raises ``ValueError`` (the template refuses it), and
    ``reject`` receives those refusals (``{"line", "reason"}``) once per segment.
    """

    def __init__(
        self,
        index,
        encode: Callable[[int], Encoded],
        reject: Callable[[list[dict]], None],
        *,
        seq_len: int,
        pack: bool,
        val_fraction: float,
        seed: int,
    ):
        self.index, self.encode, self._reject = index, encode, reject
        self.room, self.pack, self.seed = seq_len + 1, pack, seed
        n = len(index)
        cut = int(n * (1 - val_fraction))
        self._coef = self._calibrate() if pack else np.zeros(3)
        self.plans = {
            "train": self._plan(np.arange(cut), shuffle=True),
            "val": self._plan(np.arange(cut, n), shuffle=False),
        }
        self._seg_stats = {
            split: np.full((plan.segments, len(_STATS)), -1, np.int64)
            for split, plan in self.plans.items()
        }
        self._segments: OrderedDict = OrderedDict()
        self._epoch_cache: tuple | None = None
        # batches also carry each position's record (``record_id``): per-record routing
        self.track_records = False

    def _calibrate(self) -> np.ndarray:
        """Fit the token estimate on up to ``CALIBRATION_RECORDS`` records spread over the
        file."""
        one_a_row = np.array([float(self.room), 0.0, 0.0])  # the safe estimate
        n = len(self.index)
        if not n:
            return one_a_row
        picks = np.unique(np.linspace(0, n - 1, CALIBRATION_RECORDS).astype(int))
        tokens, kept = [], []
        for record in picks:
            try:
                tokens.append(self.encode(int(record)).total)
                kept.append(int(record))
            except ValueError:
                continue
        if not kept:
            return one_a_row
        kept = np.asarray(kept)
        return _fit_estimate(
            self.index.turns[kept], self.index.chars[kept], np.asarray(tokens, np.float64)
        )

    def _plan(self, records: np.ndarray, shuffle: bool) -> _Plan:
        n, room = len(records), self.room
        if shuffle and n:
            records = records[np.random.default_rng(PACK_SEED).permutation(n)]
        if not self.pack:
            seg_starts = np.append(np.arange(0, n, PACK_ROWS), n) if n else np.zeros(1, int)
            rows = np.diff(seg_starts)
        else:
            c = self._coef
            est = c[0] + c[1] * self.index.turns[records] + c[2] * self.index.chars[records]
            # A record estimated at a row or more is cut to one: it takes a row, no headroom.
            # Shorter ones are aimed at PACK_FILL of the room they take.
            weight = np.where(est >= room, float(room), np.maximum(est, 1.0) / PACK_FILL)
            budget, total, starts, sums = PACK_ROWS * room, 0.0, [0], []
            for i, w in enumerate(weight.tolist()):  # greedy: while the segment's rows hold it
                if total + w > budget and total > 0:
                    starts.append(i)
                    sums.append(total)
                    total = 0.0
                total += w
            sums.append(total)
            seg_starts = np.asarray(starts + [n]) if n else np.zeros(1, int)
            sums = np.asarray(sums if n else [])
            rows = np.clip(np.ceil(sums / room - 1e-9), 1, PACK_ROWS).astype(np.int64)
        row_starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        return _Plan(records.astype(np.int64), seg_starts.astype(np.int64), row_starts)

    def _segment(self, split: str, segment: int) -> _Segment:
        key = (split, segment)
        if key in self._segments:
            self._segments.move_to_end(key)
            return self._segments[key]
        plan, room = self.plans[split], self.room
        records = plan.order[plan.seg_starts[segment] : plan.seg_starts[segment + 1]]
        rows = int(plan.row_starts[segment + 1] - plan.row_starts[segment])
        stats = dict.fromkeys(_STATS, 0)
        items, refused = [], []
        for record in records.tolist():
            try:
                items.append((record, self.encode(record)))
            except ValueError as exc:
                refused.append({"line": int(self.index.lines[record]), "reason": str(exc)})
        ids = np.zeros((rows, room), np.int32)
        carries = np.zeros((rows, room), bool)
        owner = np.full((rows, room), -1, np.int32)
        layout: list[list] = [[] for _ in range(rows)]
        encoded = dict(items)
        for row, start, record, keep in _place(items, rows, room, self.pack):
            enc, line = encoded[record], int(self.index.lines[record])
            whole = enc.total  # an estimate for a record tokenized only as far as the room
            if enc.loss and not enc.carries[:keep].any():
                stats["loss_cut_records"] += 1
            if whole > room:
                stats["cut_records"] += 1
                stats["cut_tokens"] += whole - room
            lost = min(whole, room) - keep
            if lost:
                stats["overflow_records"] += 1
                stats["overflow_tokens"] += lost
            if keep:
                ids[row, start : start + keep] = enc.ids[:keep]
                carries[row, start : start + keep] = enc.carries[:keep]
                owner[row, start : start + keep] = record
                layout[row].append((line, start, keep))
                stats["records"] += 1
        stats["rejected"] = len(refused)
        stats["tokens"] = int(sum(c for row in layout for _, _, c in row))
        stats["loss_tokens"] = int(carries.sum())
        values = np.array([stats[k] for k in _STATS], np.int64)
        if self._seg_stats[split][segment, 0] < 0:  # first time: record what it found
            self._seg_stats[split][segment] = values
            self._reject(refused)
        layout = [sorted(r, key=lambda t: t[1]) for r in layout]
        seg = _Segment(ids, carries, layout, values, owner)
        self._segments[key] = seg
        if len(self._segments) > KEPT_SEGMENTS:
            self._segments.popitem(last=False)
        return seg

    def _locate(self, split: str, example: int) -> tuple[int, int]:
        plan = self.plans[split]
        if not 0 <= example < plan.rows:
            raise IndexError(f"example {example} is not in the {split} split ({plan.rows} rows)")
        segment = int(np.searchsorted(plan.row_starts, example, side="right") - 1)
        return segment, example - int(plan.row_starts[segment])

    def gather(self, split: str, examples: list[int]) -> dict[str, np.ndarray]:
        """Rows ``examples`` of ``split`` as a batch: ``input_ids``, ``labels``, ``mask`` and
        ``example_index`` (and ``record_id`` when ``track_records`` is set)."""
        ids = np.zeros((len(examples), self.room), np.int32)
        carries = np.zeros((len(examples), self.room), bool)
        owner = np.zeros((len(examples), self.room), np.int32)
        for i, example in enumerate(examples):
            segment, row = self._locate(split, example)
            seg = self._segment(split, segment)
            ids[i], carries[i], owner[i] = seg.ids[row], seg.carries[row], seg.records[row]
        labels = np.where(carries[:, 1:], ids[:, 1:], IGNORE_INDEX).astype(np.int32)
        batch = {
            "input_ids": ids[:, :-1],
            "labels": labels,
            "mask": carries[:, 1:].astype(np.float32),
            "example_index": np.asarray(examples, np.int32),
        }
        if self.track_records:  # a position belongs to the record of the token it predicts
            batch["record_id"] = owner[:, 1:]
        return batch

    def layout(self, example: int, split: str) -> list[tuple[int, int, int]]:
        segment, row = self._locate(split, example)
        return list(self._segment(split, segment).layout[row])

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            plan = self.plans["train"]
            segments = np.random.default_rng([self.seed, epoch]).permutation(plan.segments)
            sizes = np.diff(plan.row_starts)[segments]
            self._epoch_cache = (epoch, segments, np.concatenate([[0], np.cumsum(sizes)]))
        return self._epoch_cache[1], self._epoch_cache[2]

    def picks(self, index: int, batch_size: int, split: str) -> list[int]:
        """The rows of batch number ``index`` (the split must have rows): drawn without
        replacement, epoch by epoch; in the train split each epoch visits the segments in an
        order drawn from (seed, epoch), in val the rows are in order."""
        plan = self.plans[split]
        n, picks = plan.rows, []
        for sample in range(index * batch_size, (index + 1) * batch_size):
            epoch, k = divmod(sample, n)
            if split != "train":
                picks.append(k)
                continue
            segments, starts = self._epoch_order(epoch)
            place = int(np.searchsorted(starts, k, side="right") - 1)
            picks.append(int(plan.row_starts[segments[place]]) + k - int(starts[place]))
        return picks

    def has_loss(self, split: str, max_records: int | None = None) -> bool:
        """Whether some row of ``split`` carries loss: the segments rendered so far first,
        then the others in order until one does, or until ``max_records`` records of the
        split have been rendered (a train split's order is shuffled: a random sample)."""
        plan, table = self.plans[split], self._seg_stats[split]
        loss = _STATS.index("loss_tokens")
        if (table[:, loss] > 0).any():
            return True
        sizes = np.diff(plan.seg_starts)
        scanned = int(sizes[table[:, 0] >= 0].sum())
        for segment in range(plan.segments):
            if table[segment, 0] >= 0:
                continue
            if max_records is not None and scanned >= max_records:
                break
            if self._segment(split, segment).stats[loss] > 0:
                return True
            scanned += int(sizes[segment])
        return False

    def stats(self, split: str | None = None, max_records: int | None = None) -> dict:
        """See :meth:`kdcore.data.chat.ChatDataset.stats`."""
        out = {}
        budget = max_records
        for name in [split] if split else ["train", "val"]:
            plan, table = self.plans[name], self._seg_stats[name]
            for segment in range(plan.segments):
                if table[segment, 0] < 0:
                    if budget is not None and budget <= 0:
                        continue
                    self._segment(name, segment)
                    if budget is not None:
                        budget -= int(plan.seg_starts[segment + 1] - plan.seg_starts[segment])
            done = table[:, 0] >= 0
            sums = table[done].sum(axis=0) if done.any() else np.zeros(len(_STATS), np.int64)
            record = {k: int(v) for k, v in zip(_STATS, sums)}
            scanned_rows = int(np.diff(plan.row_starts)[done].sum())
            slots = scanned_rows * self.room
            record["rows"] = plan.rows
            record["padding_share"] = round(1 - record["tokens"] / slots, 4) if slots else 0.0
            record["scanned"] = int(np.diff(plan.seg_starts)[done].sum())
            record["of"] = int(len(plan.order))
            out[name] = record
        return out
