"""Per-row routing of teachers: the ``route`` aggregator sends each record's tokens to exactly
one teacher, chosen by a record field, the data source it came from, or a rule.

A row may be packed from several records, so routing is per position: the dataset gives the
record behind each position (``record_id`` [B, L], -1 on padding) or the source of each row
(``domain`` [B]), and :meth:`Route.owners` turns that into the teacher of each position
(``-1``: none, the position is left out of the distillation terms; cross-entropy still sees
it). The engine then runs each teacher only on the rows that hold its positions
(:func:`routed_signals`) and computes each distillation term per teacher on those rows
(``kdcore.engine.routed``), so every teacher keeps its own form (dense, top-k, a served
teacher's) and its own vocabulary aligner.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import mlx.core as mx
import numpy as np

from kdcore.errors import SpecError
from kdcore.signal.mixture import mixture
from kdcore.signal.teacher import TeacherSignal

# The teacher name that means "no teacher": those positions carry no distillation term.
NONE = "none"


def _regex(_instance, attribute, value: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{attribute.name} must be a regular expression: {exc}") from None


@attrs.define
class RouteRule:
    """A record whose text (or ``field``, a string field of the record) matches ``pattern``
    (``re.search``) goes to ``teacher``; the first rule that matches wins."""

    pattern: str = attrs.field(validator=_regex)
    teacher: str
    field: str | None = None


@attrs.define
class RouteConfig:
    """``by``: what picks a record's teacher. ``"field"`` reads the record's ``field``
    (its value names a teacher label, or a key of ``map``); ``"source"`` the data source it
    came from (the chat dataset's ``path`` given as a table or a list of files, the
    ``mixture`` dataset's domains; a source name is a teacher label or a key of ``map``);
    ``"rule"`` the first of ``rules`` whose pattern matches. ``default``: the teacher of a
    record without the field, and of one no rule matches; ``"none"`` anywhere means no
    teacher (the record's positions carry no distillation term)."""

    by: Literal["field", "source", "rule"] = "field"
    field: str = "teacher"
    map: dict[str, str] = attrs.field(factory=dict)
    rules: list[RouteRule] = attrs.field(factory=list)
    default: str | None = None
    # Not route's parameters: named so that a spec giving them is told why, not "unknown key".
    weights: list[float] | None = None
    learnable: bool | None = None

    def __attrs_post_init__(self) -> None:
        if self.weights is not None:
            raise ValueError(
                "weights must not be set: route sends each position to exactly one teacher, "
                "so there is nothing to weigh; use aggregator 'weighted' to mix teachers"
            )
        if self.learnable is not None:
            raise ValueError(
                "learnable must not be set: route has nothing to learn (the data picks each "
                "position's teacher); use aggregator 'weighted' with learnable = true, or an "
                "adaptive one such as 'amtml'"
            )
        if not self.field:
            raise ValueError("field must name a record key")
        if self.by == "rule" and not self.rules:
            raise ValueError(
                'rules must hold at least one {pattern = "...", teacher = "..."} with by = "rule"'
            )
        if self.by != "rule" and self.rules:
            raise ValueError(f'rules must be empty unless by = "rule" (by is "{self.by}")')
        if self.by == "rule" and self.map:
            raise ValueError('map must be empty with by = "rule": each rule names its teacher')

    def named_teachers(self) -> list[tuple[str, str]]:
        """(teacher name, where in the params) of every teacher the config names."""
        out = [(t, f"map.{k}") for k, t in self.map.items()]
        out += [(r.teacher, f"rules[{i}].teacher") for i, r in enumerate(self.rules)]
        if self.default is not None:
            out.append((self.default, "default"))
        return out


def teacher_index(name: str, labels: Sequence[str]) -> int:
    """The index of the teacher labelled ``name`` (-1 for ``"none"``); ValueError if none."""
    return -1 if name == NONE else list(labels).index(name)


def record_text(
    record: dict,
    chat_key: str = "messages",
    prompt_key: str = "prompt",
    completion_key: str = "completion",
    text_key: str = "text",
) -> str:
    """What a rule's pattern is searched in: a chat record's message contents, a completion
    record's prompt and completion, a text record's text, joined by newlines."""
    if isinstance(record.get(chat_key), list):
        parts = [m.get("content") for m in record[chat_key] if isinstance(m, dict)]
        return "\n".join(p for p in parts if isinstance(p, str))
    if prompt_key in record and completion_key in record:
        return "\n".join(str(record[k]) for k in (prompt_key, completion_key))
    value = record.get(text_key)
    return value if isinstance(value, str) else ""


class Route:
    """The ``route`` aggregator: each position's teacher is the one its record routes to.

    Params (``RouteConfig``): ``by`` (``"field"``, ``"source"`` or ``"rule"``), ``field``
    (``"teacher"``), ``map`` (record value or source name -> teacher label), ``rules``
    (``[{pattern, teacher, field}]``, first match wins), ``default`` (a teacher label, or
    ``"none"``). Teachers are named by their ``label`` in ``[[teachers]]``.

    Example::

        [[teachers]]
        label = "maths"
        path = "models/maths-teacher"

        [[teachers]]
        label = "chat"
        server = "http://127.0.0.1:8011"

        [aggregator]
        name = "route"

        [aggregator.params]
        by = "rule"
        rules = [{ pattern = "####", teacher = "maths" }]    # GSM8K answers end "#### N"
        default = "chat"

    The run binds it to the dataset (a table of each record's teacher, checked when the data
    loads: a record without the field names its file and line) and gives it one vocabulary
    aligner per teacher. In a step each teacher runs only on the rows that hold its
    positions, and each distillation term is computed per teacher on its own positions,
    their mean weighted by the teachers' token counts. Called as a plain aggregator (on the
    signals of every teacher over the whole batch), it returns the equivalent mixture: at
    each position the weight 1 on its teacher (uniform where no teacher routes).
    """

    def __init__(self, config: RouteConfig | None = None, setup: Any = None):
        self.config = config or RouteConfig()
        self.labels: list[str] = []
        self.record_teacher: np.ndarray | None = None  # [records] teacher index, -1 none
        self.source_teacher: np.ndarray | None = None  # [sources] teacher index, -1 none
        self.aligners: list[Any] = []

    def attach(
        self,
        labels: Sequence[str],
        aligners: Sequence[Any],
        record_teacher: np.ndarray | None = None,
        source_teacher: np.ndarray | None = None,
    ) -> None:
        """Bind the route to a run: teacher labels, each teacher's aligner, and the table of
        each record's (or each source's) teacher index."""
        self.labels = list(labels)
        self.aligners = list(aligners)
        self.record_teacher = record_teacher
        self.source_teacher = source_teacher

    def owners(self, batch: dict) -> np.ndarray:
        """The teacher index of each position of ``batch`` ([B, L] int32, -1: none)."""
        shape = tuple(batch["input_ids"].shape)
        if self.record_teacher is not None and "record_id" in batch:
            ids = np.asarray(batch["record_id"]).astype(np.int64)
            table = self.record_teacher
            return np.where(ids >= 0, table[np.clip(ids, 0, len(table) - 1)], -1).astype(np.int32)
        if self.source_teacher is not None and "domain" in batch:
            rows = self.source_teacher[np.asarray(batch["domain"]).astype(np.int64).reshape(-1)]
            return np.broadcast_to(rows[:, None], shape).astype(np.int32)
        raise SpecError(
            "aggregator 'route': the batch says nothing of its records (no 'record_id' or "
            "'domain' array); route needs a dataset that tracks them (chat, mixture), bound "
            "by the run @ $.aggregator"
        )

    def aligned(self, index: int, signal: TeacherSignal) -> TeacherSignal:
        """Teacher ``index``'s signal in the student's vocabulary."""
        return self.aligners[index](signal) if self.aligners else signal

    def __call__(self, signals: list[TeacherSignal], inputs: Any = None) -> TeacherSignal:
        if inputs is None:
            raise ValueError("aggregator 'route' reads the batch: call it with the step's inputs")
        owners = self.owners(inputs.batch)
        members = [self.aligned(k, s) for k, s in enumerate(signals)]
        count = len(members)
        onehot = (owners[..., None] == np.arange(count)).astype(np.float32)
        none = onehot.sum(-1, keepdims=True) == 0
        weights = np.where(none, 1.0 / count, onehot).astype(np.float32)
        return mixture(members, mx.array(weights))


def routed_rows(owners: np.ndarray, mask: np.ndarray, count: int) -> list[np.ndarray]:
    """For each of ``count`` teachers, the rows holding one of its positions that carries
    loss (``mask``), in order: the rows it runs on."""
    carries = np.asarray(mask) > 0
    return [np.flatnonzero(((owners == k) & carries).any(axis=1)) for k in range(count)]


def teacher_rows(route: Route, batch: dict, count: int) -> list[np.ndarray]:
    """For each of ``count`` teachers, the rows of ``batch`` a routed step runs it on: the
    one function both the step (:func:`routed_signals`) and a served teacher's look-ahead
    (``kdcore.engine.prefetch``) use, so the rows sent ahead are the rows asked for."""
    return routed_rows(route.owners(batch), np.asarray(batch["mask"]), count)


def take_rows(batch: dict, rows: np.ndarray) -> dict:
    """``batch`` with only ``rows`` of every array whose first axis is the batch's."""
    size = batch["input_ids"].shape[0]
    if len(rows) == size:
        return batch
    index = mx.array(rows.astype(np.int32))
    out = {}
    for key, value in batch.items():
        if isinstance(value, mx.array) and value.ndim and value.shape[0] == size:
            out[key] = mx.take(value, index, axis=0)
        elif isinstance(value, np.ndarray) and value.ndim and value.shape[0] == size:
            out[key] = value[rows]
        else:
            out[key] = value
    return out


def routed_signals(
    route: Route, teachers: Sequence[Any], batch: dict, capture: frozenset, student: Any
) -> list[TeacherSignal | None]:
    """Each teacher's signal on the rows that hold its positions (None: it has none in this
    batch, and is not called)."""
    out: list[TeacherSignal | None] = []
    for teacher, picked in zip(teachers, teacher_rows(route, batch, len(teachers))):
        if not len(picked):
            out.append(None)
            continue
        out.append(teacher.signal(take_rows(batch, picked), capture, student))
    return out
