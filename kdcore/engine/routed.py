"""The engine's side of the ``route`` aggregator (``kdcore.signal.route``): the spec checks
``kd validate`` runs, binding the route to the run's data and teachers, and a step's
distillation terms computed per teacher.

In a routed step each teacher has run only on the rows that hold its positions
(``kdcore.signal.route.routed_signals``). Each term that reads the teacher is then computed
per teacher ``k``, on the student's output at those rows, with the mask of ``k``'s own
positions (times the positions its aligner could pair): ``v_k``, a mean over its ``n_k``
tokens. The term's value is ``sum_k n_k v_k / sum_k n_k``, the mean over every routed token,
which is what each teacher's loss on its own positions, summed and divided by hand, gives;
its gradient is that of the same sum. Terms that do not read a teacher (``ce``) run once on
the whole batch. Per teacher the log gets ``route/LABEL/tokens``, ``route/LABEL/LOSS`` (each
term's ``v_k``) and ``route/LABEL/agreement`` (top-1 agreement of student and teacher on its
positions, computed in the same fused pass at weight 0).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from kdcore.align.basic import Identity
from kdcore.data.routing import close_match, record_teachers, scan_files, source_teachers
from kdcore.data.sources import data_sources
from kdcore.errors import SpecError
from kdcore.losses.rows import TEACHER, Rows
from kdcore.models.output import ModelOutput
from kdcore.protocols import PreparesVocabularies
from kdcore.registry.manager import get_registry
from kdcore.signal.aligned import position_mask
from kdcore.signal.route import NONE, Route, RouteConfig, routed_rows, take_rows
from kdcore.signal.teacher import TeacherSignal
from kdcore.spec.load import blame_overrides

# What a routed step cannot give a loss: per-layer features of one teacher per position
# would mix teachers of different shapes, and sampled batches hold no records to route.
UNROUTABLE = {
    "hidden_states": "the teachers' hidden states",
    "attentions": "the teachers' attention maps",
    "student_samples": "batches sampled from the student (they hold no records to route)",
}


def is_routed(parts: Any) -> bool:
    return isinstance(getattr(parts, "aggregator", None), Route)


# ---------------------------------------------------------------- kd validate


def route_problems(spec: Any, read_records: bool = True) -> list[str]:
    """What a spec with aggregator ``route`` asks that cannot work: a teacher it names that
    no ``[[teachers]]`` label has, teachers without labels, sources or records that route
    nowhere (the records are read unless ``read_records`` is False: a run reads them once,
    when it binds the route), losses that need per-layer teacher features, on-policy
    batches. Empty for any other aggregator."""
    config = spec.aggregator.config
    if spec.aggregator.name != "route" or not isinstance(config, RouteConfig):
        return []
    problems: list[str] = []
    labels = [t.label for t in spec.teachers]
    if not spec.teachers:
        problems.append(
            "aggregator 'route' sends positions to teachers; the spec has none @ $.teachers"
        )
    for i, label in enumerate(labels):
        if not label:
            problems.append(
                f'teachers[{i}] has no label: route names its teachers by label (label = "...")'
                f" @ $.teachers[{i}].label"
            )
        elif label == NONE:
            problems.append(
                f'label {NONE!r} means "no teacher" to route; give teachers[{i}] another '
                f"@ $.teachers[{i}].label"
            )
        elif labels.index(label) != i:
            problems.append(
                f"teachers[{i}] has the label {label!r} of teachers[{labels.index(label)}]: "
                f"route needs each label once @ $.teachers[{i}].label"
            )
    known = [x for x in labels if x]
    for name, where in config.named_teachers():
        if name != NONE and name not in known:
            problems.append(
                f"route names teacher {name!r}, which no [[teachers]] entry has as its label"
                f"{close_match(name, known)} (labels: {', '.join(map(repr, known)) or 'none'}) "
                f"@ $.aggregator.params.{where}"
            )
    registry = get_registry()
    for i, ref in enumerate(spec.losses):
        try:
            needs = registry.get("loss", ref.name).requires
        except KeyError:
            continue  # reported as an unknown loss
        for need in sorted(needs & set(UNROUTABLE)):
            problems.append(
                f"loss {ref.name!r} needs {UNROUTABLE[need]}, which a routed step (one teacher "
                f"per position) does not give; use aggregator 'mean' or 'weighted' for it "
                f"@ $.losses[{i}].name"
            )
    lmbda = spec.train.on_policy.lmbda
    if not (isinstance(lmbda, (int, float)) and lmbda == 0):
        problems.append(
            "on-policy batches are the student's samples, which hold no records to route; "
            "set lmbda = 0 with aggregator 'route' @ $.train.on_policy.lmbda"
        )
    if problems:  # the data is read only once the teachers are right
        return blame_overrides(problems, spec.overrides)
    problems += _data_problems(spec, config, labels, read_records)
    return blame_overrides(problems, spec.overrides)


def _source_names(spec: Any) -> list[str] | None:
    data = spec.data.config
    if spec.data.name == "chat" and not isinstance(getattr(data, "path", ""), str):
        try:
            return list(data_sources(data.path))
        except SpecError:
            return None
    paths = getattr(data, "paths", None)
    if isinstance(paths, list) and paths:  # the mixture dataset: its domains
        names = getattr(data, "names", None) or []
        return list(names) or [Path(p).name.split(".")[0] for p in paths]
    return None


def _data_problems(spec: Any, config: RouteConfig, labels: list[str], read: bool) -> list[str]:
    if config.by == "source":
        names = _source_names(spec)
        if names is None:
            return [
                'route by = "source" needs data with several sources: the chat dataset with '
                'path = { name = "file", ... } (or a list of files), or the mixture dataset '
                "@ $.data.params.path"
            ]
        found = source_teachers(config, names, labels)
        if found and isinstance(found[0], str):
            return found
        return _unused(labels, set(found), "no source routes to it")
    problems = []
    if spec.data.name != "chat":
        return [
            f'route by = "{config.by}" reads each record: it needs the chat dataset, not '
            f"{spec.data.name!r} @ $.aggregator.params.by"
        ]
    if config.by == "rule":
        used = {r.teacher for r in config.rules} | {config.default or NONE}
        problems += _unused(
            labels, {labels.index(t) for t in used if t in labels}, "no rule or default names it"
        )
    try:
        files = {n: spec.path(p) for n, p in data_sources(spec.data.config.path).items()}
    except SpecError as exc:
        return problems + exc.problems
    files = {n: p for n, p in files.items() if p.is_file()}  # missing: reported elsewhere
    return problems + (scan_files(config, spec.data.config, files, labels) if read else [])


def _unused(labels: list[str], used: set, why: str) -> list[str]:
    return [
        f"teacher {label!r} is never routed to ({why}): remove it or route to it @ $.teachers[{i}]"
        for i, label in enumerate(labels)
        if i not in used
    ]


# ---------------------------------------------------------------- binding


def bind_route(
    route: Route,
    spec: Any,
    dataset: Any,
    teachers: list[Any],
    tokenizer: Any,
    make_aligner: Callable[[], Any],
) -> Identity:
    """Give ``route`` the table of each record's (or source's) teacher, read from the data
    (``SpecError`` naming the file and line of a record that routes nowhere), and one
    aligner per teacher, prepared with that teacher's tokenizer; the dataset then tracks
    each position's record. Returns the run's aligner: a pass-through, since each teacher's
    own aligner runs inside the route."""
    labels = [t.label for t in spec.teachers]
    config = route.config
    records = sources = None
    if config.by == "source":
        names = getattr(dataset, "source_names", None) or getattr(dataset, "domain_names", None)
        if not names:
            raise SpecError(
                f'route by = "source": dataset {type(dataset).__name__} has one source; give '
                'the chat dataset path = { name = "file", ... } @ $.data.params.path'
            )
        found = source_teachers(config, names, labels)
        if found and isinstance(found[0], str):
            raise SpecError(found)
        table = np.asarray(found, np.int32)
        held = getattr(getattr(dataset, "source", None), "sources", None)
        if held is not None and hasattr(dataset, "track_records"):
            records = table[held]
            dataset.track_records()
        else:  # rows carry their source ("domain")
            sources = table
    else:
        records = record_teachers(dataset, config, labels)
        dataset.track_records()
    aligners = []
    for i, teacher in enumerate(teachers):
        aligner = make_aligner()
        if isinstance(aligner, PreparesVocabularies):
            try:
                aligner.prepare(teacher.tokenizer, tokenizer)
            except SpecError as exc:
                raise SpecError(
                    [f"teachers[{i}] ({labels[i]!r}): {p}" for p in exc.problems]
                ) from None
        aligners.append(aligner)
    route.attach(labels, aligners, records, sources)
    return Identity()


# ---------------------------------------------------------------- a routed step


def output_rows(out: ModelOutput, rows: np.ndarray) -> ModelOutput:
    """The student's output at ``rows`` of the batch (gradients flow back to the whole)."""
    size = (out.final_hidden if out.final_hidden is not None else out.logits).shape[0]
    if len(rows) == size:
        return out
    index = mx.array(rows.astype(np.int32))

    def take(x: mx.array) -> mx.array:
        return mx.take(x, index, axis=0)

    return ModelOutput(
        logits=take(out.logits) if out.has_logits else None,
        hidden_states=tuple(map(take, out.hidden_states)) if out.hidden_states else None,
        attentions=tuple(map(take, out.attentions)) if out.attentions else None,
        final_hidden=take(out.final_hidden) if out.final_hidden is not None else None,
        head=out.head,
        head_weight=out.head_weight,
        head_bias=out.head_bias,
        vocab=out.vocab,
    )


def _agree(scale: mx.array, s: mx.array, t: mx.array):
    same = mx.argmax(s, axis=-1) == mx.argmax(t, axis=-1)
    return same.astype(mx.float32), mx.zeros_like(s)


def _agree_sparse(scale: mx.array, s: mx.array, ids: mx.array, logprobs: mx.array):
    best = mx.take_along_axis(ids, mx.argmax(logprobs, axis=-1)[:, None], axis=-1)[:, 0]
    same = mx.argmax(s, axis=-1) == best.astype(mx.int32)
    return same.astype(mx.float32), mx.zeros_like(s)


def agreement_rows(teacher: TeacherSignal) -> Rows | None:
    """Rows whose value is 1 where the student's and the teacher's most probable tokens are
    the same (no gradient); None where the teacher's rows are not token ids (rank space)."""
    if getattr(teacher, "rank_space", False):
        return None
    if teacher.topk_ids is not None:
        extras = {"topk_ids": teacher.topk_ids, "topk_logprobs": teacher.topk_logprobs}
        return Rows(_agree_sparse, ("topk_ids", "topk_logprobs"), extras=extras)
    return Rows(_agree, (TEACHER,))


Terms = Callable[..., tuple[mx.array, dict, dict]]


def routed_loss_terms(
    parts: Any,
    trainable: Any,
    out: ModelOutput,
    inputs: Any,
    signals: list[TeacherSignal | None],
    step: int,
    run_terms: Terms,
) -> tuple[mx.array, dict, dict]:
    """(total, {label: term}, {metric: value}) of a routed step (read the module doc).
    ``run_terms(parts, trainable, losses, out, inputs, teacher, step, watch)`` is the
    engine's term loop (``kdcore.engine.step.run_terms``)."""
    route: Route = parts.aggregator
    batch = inputs.batch
    owners = route.owners(batch)
    rows = routed_rows(owners, np.asarray(batch["mask"]), len(parts.teachers))
    plain = [b for b in parts.losses if not b.reads_teacher]
    reading = [b for b in parts.losses if b.reads_teacher]
    total, terms, metrics = mx.array(0.0), {}, {}
    if plain:
        total, terms, metrics = run_terms(parts, trainable, plain, out, inputs, None, step)
    shares = []
    for k, (signal, picked) in enumerate(zip(signals, rows)):
        count = 0.0
        if signal is not None and len(picked):
            teacher = route.aligned(k, signal)
            sub = take_rows(batch, picked)
            mine = sub["mask"] * mx.array((owners[picked] == k).astype(np.float32))
            aligned = position_mask(teacher)
            count = float((mine if aligned is None else mine * aligned).sum().item())
            if count > 0:
                sub_out = output_rows(out, picked)
                sub_inputs = attrs.evolve(inputs, student=sub_out, batch={**sub, "mask": mine})
                shares.append((k, count, teacher, sub_out, sub_inputs))
        metrics[f"route/{route.labels[k]}/tokens"] = mx.array(count)
    routed = sum(count for _, count, *_ in shares)
    values: dict[str, dict[str, mx.array]] = {}
    for k, count, teacher, sub_out, sub_inputs in shares:
        name, share = route.labels[k], count / routed
        agree = agreement_rows(teacher)
        watch = [(f"route/{name}/agreement", agree)] if agree is not None else []
        t_total, t_terms, t_metrics = run_terms(
            parts, trainable, reading, sub_out, sub_inputs, teacher, step, watch
        )
        total = total + share * t_total
        values[name] = t_terms
        for key, value in t_metrics.items():
            if key.startswith("route/"):
                metrics[key] = value
            else:  # a loss's own metrics: the token-weighted mean over teachers
                metrics[key] = metrics.get(key, 0.0) + share * value
        for label, value in t_terms.items():
            terms[label] = terms.get(label, 0.0) + share * value
    zero = mx.array(0.0)
    for name in route.labels:  # every key at every step (processes average them together)
        for built in reading:
            metrics[f"route/{name}/{built.label}"] = values.get(name, {}).get(built.label, zero)
        metrics.setdefault(f"route/{name}/agreement", zero)
    terms = {b.label: terms.get(b.label, zero) for b in parts.losses}
    return total, terms, metrics
