"""Requests for the next batches in flight while the student trains on this one.

A served teacher's reply depends only on the ids sent: the same ids give the same bytes,
whenever they are asked for. So the training loop names the batches it will read next
(their ids are known in advance from the data order, ``kdcore.engine.prefetch``; with the
``route`` aggregator, only the rows of each that the step will send this teacher) and a
:class:`Prefetcher` sends them on a background thread, one at a time and in that order;
the step that needs a batch takes its reply, waiting only for what has not arrived. A
batch whose ids were not named in advance (an on-policy batch of the student's samples, a
batch a loss rewrote, an evaluation batch) misses and is scored at once, as without
prefetch: the numbers are the same either way.

A request's failure stays with its batch and is raised at the step that takes it (after
the retries of ``kdcore.teachers.served``), where the loop saves a checkpoint. The thread
never touches MLX (JSON out, safetensors decoded with NumPy): MLX streams belong to the
thread that made them.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np


def batch_key(ids: np.ndarray) -> tuple:
    """What identifies a batch for the server: its shape and its ids."""
    ids = np.ascontiguousarray(ids, np.int32)
    return ids.shape, hashlib.blake2b(ids.tobytes(), digest_size=16).digest()


class Prefetcher:
    """``score(ids)`` run ahead of time on one daemon thread, for the batches ``ask`` names.

    ``take(ids)`` returns ``(reply, seconds waited)`` for a batch asked for (raising the
    request's error, if it failed), or ``(None, 0.0)`` for one that was not. The caller
    bounds what is asked for (the loop names the step's batches and the next few)."""

    def __init__(self, score: Callable[[np.ndarray], Any]):
        self.score = score
        self._pending: OrderedDict[tuple, tuple[int, Future]] = OrderedDict()
        self._jobs: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._work, name="kd-prefetch", daemon=True)
        self._thread.start()

    def ask(self, batches: list[tuple[int, np.ndarray]]) -> None:
        """Send the requests for ``(index, ids)`` batches not asked for yet; forget those
        with an index below the first one named (they were never taken: not needed)."""
        if self._closed.is_set() or not batches:
            return
        first = min(index for index, _ids in batches)
        for key, (index, future) in list(self._pending.items()):
            if index < first:
                future.cancel()
                del self._pending[key]
        for index, ids in batches:
            key = batch_key(ids)
            if key in self._pending:
                continue
            future: Future = Future()
            self._pending[key] = (index, future)
            self._jobs.put((np.array(ids, np.int32), future))

    def take(self, ids: np.ndarray) -> tuple[Any, float]:
        """(the reply for ``ids``, seconds waited for it), or (None, 0.0) if not asked."""
        entry = self._pending.pop(batch_key(ids), None)
        if entry is None:
            return None, 0.0
        start = time.perf_counter()
        reply = entry[1].result()  # the request's own error, raised here
        return reply, time.perf_counter() - start

    def close(self) -> None:
        """Cancel what has not started; the thread ends after the request it is in."""
        self._closed.set()
        for _index, future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._closed.is_set():
                return
            ids, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.score(ids))
            except BaseException as exc:  # noqa: BLE001 - raised at the step that takes it
                future.set_exception(exc)
