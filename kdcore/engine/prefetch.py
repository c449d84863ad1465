"""The loop's side of prefetching a served teacher (``kdcore.teachers.prefetch``): before
each step, name the batches that step and the next ``prefetch_depth`` will read, and log
what the teacher server did.

A batch's ids are a pure function of its number (``dataset.batch(index, batch_size)``,
this process's rows of it under data parallelism), so they are known steps ahead. An
on-policy batch (``train.on_policy`` draws it) is the student's samples, not known until
the step samples them: it is not named, and its teacher request is sent when it is needed.

With the ``route`` aggregator a step asks each teacher for the rows that hold its positions
only (``kdcore.signal.route.routed_signals``), so each teacher is sent exactly those rows
ahead, picked by the step's own function (``teacher_rows``) from the same batch, and
nothing for a batch where it has none: every request sent ahead is the one its step takes.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from kdcore.engine import onpolicy
from kdcore.signal.route import Route, teacher_rows
from kdcore.spec.schedules import Schedule, value_at


@runtime_checkable
class Prefetches(Protocol):
    """A teacher that scores batches ahead of time: ``prefetch_depth`` batches beyond the
    step's own (0: none), ``prefetch([(index, ids), ...])`` to send them (``ids``: the rows
    the step will ask it for, the whole batch unless routed), ``traffic()``
    (cumulative ``tokens`` scored, ``request_s`` spent in requests, ``wait_s`` the steps
    waited, ``requests``) and ``close()``."""

    prefetch_depth: int

    def prefetch(self, batches: list[tuple[int, np.ndarray]]) -> None: ...

    def traffic(self) -> dict[str, float]: ...

    def close(self) -> None: ...


class Lookahead:
    """Names each step's upcoming batches to the prefetching teachers of ``parts``, and
    turns their traffic into log fields (``server/tokens_per_s``: positions scored per
    second of request time, over the run so far; ``server/wait_s``: seconds a step waited
    for the teacher, mean since the last record; ``serverN/...`` with several served
    teachers)."""

    def __init__(self, parts: Any):
        self.parts = parts
        self.teachers = [(i, t) for i, t in enumerate(parts.teachers) if isinstance(t, Prefetches)]
        self.depth = max([t.prefetch_depth for _i, t in self.teachers] or [0])
        aggregator = getattr(parts, "aggregator", None)
        self.route = aggregator if isinstance(aggregator, Route) else None
        # batch number -> the ids each teacher will be asked for (None: no request)
        self._ids: dict[int, list[np.ndarray | None] | None] = {}
        self._last = {i: t.traffic() for i, t in self.teachers}
        self._steps = 0

    def before_step(self, step: int) -> None:
        self._steps += 1
        if self.depth <= 0:
            return
        accum = self.parts.spec.train.grad_accum
        first = step * accum
        last = min((step + 1) * accum + self.depth, self.parts.total * accum)
        self._ids = {i: ids for i, ids in self._ids.items() if i >= first}
        for k, teacher in self.teachers:
            if teacher.prefetch_depth <= 0:
                continue
            end = min(last, (step + 1) * accum + teacher.prefetch_depth)
            batches = [(i, self._batch_ids(i)) for i in range(first, end)]
            asked = [(i, ids[k]) for i, ids in batches if ids is not None]
            teacher.prefetch([(i, ids) for i, ids in asked if ids is not None])

    def _batch_ids(self, index: int) -> list[np.ndarray | None] | None:
        """The ids each teacher will be asked for in batch ``index``: the batch's, or under
        routing its rows that hold the teacher's positions (None: no row, no request);
        None for an on-policy batch."""
        parts = self.parts
        section = parts.spec.train.on_policy
        if onpolicy.enabled(section):
            step = index // parts.spec.train.grad_accum
            lmbda = section.lmbda
            if isinstance(lmbda, Schedule):
                lmbda = value_at(lmbda, step, parts.total)
            if onpolicy.draw(parts.spec.run.seed, index) < lmbda:
                return None
        if index not in self._ids:
            rows = parts.dp.shard(parts.dataset.batch(index, parts.spec.train.batch_size))
            ids = np.asarray(rows["input_ids"])
            count = len(parts.teachers)
            if self.route is None:
                self._ids[index] = [ids] * count
            else:
                picked = teacher_rows(self.route, rows, count)
                self._ids[index] = [ids[p] if len(p) else None for p in picked]
        return self._ids[index]

    def record(self) -> dict[str, float]:
        """The servers' throughput and the steps' wait since the last record."""
        out = {}
        for i, teacher in self.teachers:
            now, before = teacher.traffic(), self._last[i]
            self._last[i] = now
            name = "server" if len(self.teachers) == 1 else f"server{i}"
            if now["request_s"] > 0:
                out[f"{name}/tokens_per_s"] = now["tokens"] / now["request_s"]
            out[f"{name}/wait_s"] = (now["wait_s"] - before["wait_s"]) / max(self._steps, 1)
        self._steps = 0
        return out

    def summary(self) -> dict:
        """Each served teacher's totals over the run, for summary.json."""
        totals = {}
        for i, teacher in self.teachers:
            t = teacher.traffic()
            rate = t["tokens"] / t["request_s"] if t["request_s"] else None
            totals[f"teachers[{i}]"] = {
                **t,
                "tokens_per_s": rate,
                "prefetch": teacher.prefetch_depth,
            }
        return {"teacher_servers": totals} if totals else {}

    def close(self) -> None:
        for _i, teacher in self.teachers:
            teacher.close()
