"""Composition checks: what a spec asks for that its parts cannot give, found without
training (a loss that needs a teacher and none is given, dense logits from a top-k cache, a
file that is not there, a tail-bucket re-tempered away from its capture temperature).

``check_composition`` runs in ``kd validate`` and before ``kd distill`` builds anything;
``check_parameter_groups`` (which builds the student to list its parameter names) runs in
``kd validate`` only, since the run itself builds the student once. Both are part of
``kdcore.engine.build.check_run``, which is what ``kd validate`` runs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from kdcore.errors import CheckpointError
from kdcore.io import read_json
from kdcore.registry.components import TEACHER_NEEDS
from kdcore.registry.manager import get_registry
from kdcore.registry.setup import Setup
from kdcore.spec.load import blame_overrides
from kdcore.spec.schedules import Schedule, value_at
from kdcore.spec.schema import RunSpec

# The cache manifest formats (kdcore/cache/format.py; that layer sits above this one).
CACHE_FORMAT = "kd-teacher-cache"
CACHE_SET_FORMAT = "kd-teacher-cache-set"


def check_composition(spec: RunSpec) -> list[str]:
    """Problems visible without loading anything: a loss that needs a teacher and none is
    given, a loss that needs dense logits fed from a top-k cache, a data, teacher or cache
    path that does not exist, a bad parameter-group regex, a tail-bucket read at another
    temperature than its cache's, and the like."""
    problems = _capability_problems(spec)
    problems += _path_problems(spec)
    problems += _regex_problems(spec)
    problems += _tail_temperature_problems(spec)
    return blame_overrides(problems, spec.overrides)


# Teacher sources that give top-k log-probabilities only: what each cannot give. A cache
# holds the dataset's own rows; a server scores any ids (student samples too).
TOP_K_SOURCES = {
    "cache": ("a top-k cache", {"hidden_states", "attentions", "student_samples"}),
    "server": ("a served teacher (top-k log-probs)", {"hidden_states", "attentions"}),
}


def _capability_problems(spec: RunSpec) -> list[str]:
    registry = get_registry()
    problems = []
    sparse = [TOP_K_SOURCES[r.source_name] for r in spec.teachers if r.source_name in TOP_K_SOURCES]
    what = sparse[0][0] if sparse else ""
    not_from = set().union(*(missing for _what, missing in sparse))
    if sparse:
        try:
            aggregator = registry.get("teacher_aggregator", spec.aggregator.name)
            if aggregator.requires & not_from:
                problems.append(
                    f"aggregator {spec.aggregator.name!r} needs "
                    f"{', '.join(sorted(aggregator.requires & not_from))}, which {what} "
                    "does not hold @ $.aggregator.name"
                )
        except KeyError:
            pass
    for i, ref in enumerate(spec.losses):
        try:
            component = registry.get("loss", ref.name)
        except KeyError:
            continue
        if (TEACHER_NEEDS & component.requires) and not spec.teachers:
            problems.append(f"loss {ref.name!r} needs a teacher and the spec has none @ $.teachers")
        if sparse and component.requires & not_from:
            problems.append(
                f"loss {ref.name!r} needs {', '.join(sorted(component.requires & not_from))}"
                f", which {what} does not hold @ $.losses[{i}].name"
            )
            continue
        needs_dense = "dense_teacher" in component.requires
        sparse_ok = "sparse_ok" in component.properties
        if sparse and (needs_dense or not sparse_ok) and (TEACHER_NEEDS & component.requires):
            problems.append(
                f"loss {ref.name!r} cannot work from {what} (it needs full teacher "
                f"logits); use a live teacher or a sparse-aware loss @ $.losses[{i}].name"
            )
    return problems


# ---------------------------------------------------------------- paths


def _path_problems(spec: RunSpec) -> list[str]:
    """Every file or folder the spec names must exist (read relative to the spec's folder),
    unless it is a hub name (``owner/name``), which resolves through the Hugging Face cache
    when the run starts."""
    from kdcore.hub import hub_reference

    problems = []
    base = Path(spec.base_dir)

    def need(value: Any, what: str, where: str, hub: str | None = "model") -> None:
        if not isinstance(value, str) or spec.path(value).exists():
            return
        if hub is not None and hub_reference(value, base, hub) is not None:
            return
        problems.append(f"{what} not found: {spec.path(value)} @ {where}")

    data = spec.data.config
    path = getattr(data, "path", None)
    need(path, "data file", "$.data.params.path", "dataset")
    if isinstance(path, (list, dict)):  # several sources (the chat dataset)
        named = path.items() if isinstance(path, dict) else enumerate(path)
        for key, value in named:
            where = f".{key}" if isinstance(path, dict) else f"[{key}]"
            need(value, "data file", f"$.data.params.path{where}", "dataset")
    paths = getattr(data, "paths", None)
    if isinstance(paths, list):
        for j, value in enumerate(paths):
            need(value, "data file", f"$.data.params.paths[{j}]", "dataset")
    model = spec.student.model.config
    need(getattr(model, "path", None), "model", "$.student.model.params.path")
    need(getattr(model, "base", None), "model", "$.student.model.params.base")
    need(
        getattr(spec.student.init.config, "teacher_path", None),
        "model to copy",
        "$.student.init.params.teacher_path",
    )
    for i, ref in enumerate(spec.teachers):
        # beside a cache, path names the folder the cache must have been made from
        need(ref.path, "teacher model", f"$.teachers[{i}].path")
        need(ref.cache, "teacher cache", f"$.teachers[{i}].cache", None)
    return problems


def _param_groups(spec: RunSpec) -> list[tuple[str, Any]]:
    """(path, group) of every parameter group, the stages' included."""
    groups = [(f"$.train.param_groups[{j}]", g) for j, g in enumerate(spec.train.param_groups)]
    for s, stage in enumerate(spec.train.stages):
        groups += [
            (f"$.train.stages[{s}].param_groups[{j}]", g) for j, g in enumerate(stage.param_groups)
        ]
    return groups


def _regex_problems(spec: RunSpec) -> list[str]:
    problems = []
    for path, group in _param_groups(spec):
        try:
            re.compile(group.pattern)
        except re.error as exc:
            problems.append(f"bad regex {group.pattern!r}: {exc} @ {path}.pattern")
    for j, pattern in enumerate(spec.train.no_decay):
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"bad regex {pattern!r}: {exc} @ $.train.no_decay[{j}]")
    return problems


# ---------------------------------------------------------------- tail-bucket temperature


def cache_manifests(spec: RunSpec, ref: Any) -> list[tuple[Path, dict]]:
    """(folder, manifest) of each teacher cache a ``cache = DIR`` entry reads."""
    directory = spec.path(ref.cache)
    manifest = read_json(directory / "manifest.json", "cache manifest")
    kind = manifest.get("format") if isinstance(manifest, dict) else None
    if kind == CACHE_FORMAT:
        found = [(directory, manifest)]
    elif kind == CACHE_SET_FORMAT and isinstance(manifest.get("teachers"), list):
        entries = manifest["teachers"]
        pick = getattr(ref.config, "teacher", None)
        if isinstance(pick, int):  # a bad index is the cache source's to report
            entries = entries[pick : pick + 1] if 0 <= pick < len(entries) else []
        found = []
        for entry in entries:
            name = entry.get("dir") if isinstance(entry, dict) else None
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(f"{directory}/manifest.json names a bad teacher folder")
            sub = directory / name
            found.append((sub, read_json(sub / "manifest.json", "cache manifest")))
    else:
        raise CheckpointError(f"{directory}/manifest.json is not a kd teacher cache manifest")
    for folder, m in found:
        ok = isinstance(m, dict) and all(
            isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)
            for key in ("capture_temperature", "k", "vocab_size")
        )
        if not ok:
            raise CheckpointError(
                f"{folder}/manifest.json is damaged: no capture_temperature, k or vocab_size"
            )
    return found


def _total_steps(spec: RunSpec) -> int:
    return sum(s.steps for s in spec.train.stages) if spec.train.stages else spec.train.steps


# Past this many steps a schedule is read at this many evenly spaced steps (and the first
# and last thousand): a smooth schedule that leaves a value shows it on that grid.
_SCHEDULE_SAMPLES = 100_000


def _steps_to_read(total: int) -> list[int]:
    if total <= _SCHEDULE_SAMPLES:
        return list(range(total + 1))
    grid = {round(i * total / _SCHEDULE_SAMPLES) for i in range(_SCHEDULE_SAMPLES + 1)}
    grid |= set(range(1000)) | set(range(total - 1000, total + 1))
    return sorted(grid)


def _first_difference(value: Any, target: float, total: int) -> str | None:
    """Where ``value`` (a number or a schedule) is not ``target``: a phrase, or None."""

    def differs(x: float) -> bool:
        return not math.isclose(x, target, rel_tol=1e-6, abs_tol=1e-9)

    if not isinstance(value, Schedule):
        return f"{float(value):g}" if differs(float(value)) else None
    for step in _steps_to_read(total):
        x = value_at(value, step, total)
        if differs(x):
            return f"{x:g} at step {step} (a {value.name!r} schedule)"
    return None


def _tail_temperature_problems(spec: RunSpec) -> list[str]:
    """A top-k cache stores its tail as one log-mass at the capture temperature ``Tc``. The
    tail is many tokens: at another temperature its mass is not that sum re-tempered as if
    it were one token (``sum_v p_v^(Tc/T)`` is not ``(sum_v p_v)^(Tc/T)``), and the loss
    would be far off (forward KL 3.33 where the coarse-grained value is 0.158, at V = 1999,
    k = 16, T = 2 from Tc = 1). So a tail-bucket is read only at ``Tc``: a single cache read
    with ``tail = "tail-bucket"``, and every cached member of a mixture (which is always read
    with a tail class). With k = V there is no tail and every temperature is exact."""
    caches = [
        (t, ref)
        for t, ref in enumerate(spec.teachers)
        if ref.cache and ref.source_name == "cache" and spec.path(ref.cache).exists()
    ]  # a missing cache is reported by _path_problems
    servers = [(t, ref) for t, ref in enumerate(spec.teachers) if ref.source_name == "server"]
    if not caches and not servers:
        return []
    registry = get_registry()
    # several teachers make a mixture, but for route, whose teachers each keep their own signal
    mixture = len(spec.teachers) > 1 and spec.aggregator.name != "route"
    checks = []
    for i, ref in enumerate(spec.losses):
        try:
            component = registry.get("loss", ref.name)
        except KeyError:
            continue
        config = ref.config
        if not (TEACHER_NEEDS & component.requires) or not hasattr(config, "temperature"):
            continue
        if "sparse_ok" not in component.properties:
            continue  # refused with a cache teacher already
        bucket = getattr(config, "tail", None) == "tail-bucket"
        if bucket or mixture:
            checks.append((i, ref, config.temperature, bucket))
    if not checks:
        return []
    problems, captured = [], []
    for t, ref in caches:
        try:
            for folder, m in cache_manifests(spec, ref):
                captured.append((f"the top-k cache {folder}", m, "recapture with kd cache"))
        except CheckpointError as exc:
            problems.append(f"{exc} @ $.teachers[{t}].cache")
    for _t, ref in servers:  # log-probs at temperature 1; its vocabulary is not known yet
        m = {"capture_temperature": 1.0, "k": getattr(ref.config, "top_k", 0), "vocab_size": 0}
        captured.append((f"the served teacher {ref.server}", m, ""))
    total = _total_steps(spec)
    for i, ref, temperature, bucket in checks:
        for name, m, recapture in captured:
            tc, k, vocab = float(m["capture_temperature"]), int(m["k"]), int(m["vocab_size"])
            if vocab and k >= vocab:
                continue
            where = _first_difference(temperature, tc, total)
            if where is None:
                continue
            how = (
                'with tail = "tail-bucket"'
                if bucket
                else "in a mixture of teachers, which reads each top-k member with a "
                "tail-bucket (whatever tail says)"
            )
            fixes = f"distil at temperature {tc:g}"
            if recapture:
                fixes += f", {recapture} --temperature T"
            if bucket and not mixture:
                fixes += ', or use tail = "renormalize" (exact at every temperature)'
            size = f"k = {k} of {vocab}" if vocab else f"k = {k}"
            problems.append(
                f"loss {ref.name!r} reads {name} ({size}, captured at temperature {tc:g}) "
                f"{how} at temperature {where}: a tail bucket is exact only at the capture "
                "temperature (the tail's mass cannot be re-tempered from its sum); "
                f"{fixes} @ $.losses[{i}].params.temperature"
            )
            break  # one line per loss
    return problems


# ---------------------------------------------------------------- parameter groups


def check_parameter_groups(spec: RunSpec, student: Any = None) -> list[str]:
    """A parameter group whose pattern matches no parameter of the run: it would silently
    do nothing. The student is built (not evaluated: MLX is lazy) to list its parameter
    names, with the learnable aggregator's and losses' under ``aggregator.`` and
    ``losses.lossN.`` as the run names them (``student``: one already built for checks, used
    instead and possibly changed). Nothing is reported when the names cannot be
    known cheaply (a student loaded from a folder, an initializer that may rename, a
    component that needs the run's teachers to be built)."""
    groups = []
    for path, group in _param_groups(spec):
        try:
            groups.append((path, group, re.compile(group.pattern)))
        except re.error:
            continue  # check_composition reports it
    if not groups:
        return []
    names = parameter_names(spec, student)
    if names is None:
        return []
    problems = []
    for path, group, pattern in groups:
        if not any(pattern.search(name) for name in names):
            like = ", ".join(names[:3])
            problems.append(
                f"pattern {group.pattern!r} matches no parameter of the run (re.search on "
                f"dotted names such as {like}) @ {path}.pattern"
            )
    return blame_overrides(problems, spec.overrides)


# Initializers known to keep the model's parameter names.
_NAME_KEEPING_INITS = ("random", "from-teacher")


def parameter_names(spec: RunSpec, student: Any = None) -> list[str] | None:
    """The dotted names of every parameter the run trains or freezes, as the engine's
    parameter groups see them; None when they cannot be known without loading weights.
    ``student``: the spec's student already built (not evaluated), to save building it again."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    registry = get_registry()
    model_ref, init_ref = spec.student.model, spec.student.init
    if getattr(model_ref.config, "path", None):
        return None  # a saved model: its names are in its weights, not worth loading here
    if init_ref.name not in _NAME_KEEPING_INITS and init_ref.name != "lora":
        return None
    setup = Setup(base_dir=Path(spec.base_dir), seed=spec.run.seed, spec=spec)
    try:
        if student is None:
            student = registry.get("model", model_ref.name).factory(model_ref.config, setup)
        if init_ref.name == "lora":
            registry.get("student_initializer", "lora").factory(init_ref.config, setup)(student, [])
    except Exception:  # the run reports a student it cannot build, with its own words
        return None
    names = [f"student.{name}" for name, _ in tree_flatten(student.parameters())]
    # Learnable aggregators and losses train beside the student (engine.build.Trainable).
    setup.student_config = model_ref.config
    setup.num_teachers = max(1, len(spec.teachers))
    setup.teacher_configs = [None] * len(spec.teachers)
    others = [("aggregator", "teacher_aggregator", spec.aggregator)]
    others += [(f"losses.loss{i}", "loss", ref) for i, ref in enumerate(spec.losses)]
    for prefix, kind, ref in others:
        try:
            built = registry.get(kind, ref.name).factory(ref.config, setup)
        except Exception:  # it needs the run (teachers' sizes, ...): names unknown
            return None
        if isinstance(built, nn.Module):
            names += [f"{prefix}.{name}" for name, _ in tree_flatten(built.parameters())]
    return names
