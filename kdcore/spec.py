"""The run spec: TOML or JSON -> attrs classes, with every problem reported at once.

Structuring happens in two phases. First the file is structured into :class:`RunSpec`
(component ``params`` stay plain tables). Then each component entry's ``name`` is looked up
in the registry and its ``params`` are structured into that component's own config class,
with the entry's path as prefix. Errors of both phases are collected and raised together
as one :class:`SpecError`, one ``message @ $.path`` line each.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.v import format_exception as _cattrs_format_exception
from cattrs.v import transform_error

from kdcore.errors import SpecError
from kdcore.plugins import get_registry
from kdcore.schedules import Schedule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class SpecValueError(ValueError):
    """A value error whose message is shown to the user as it is."""


# ---------------------------------------------------------------- spec classes


@attrs.define
class ComponentRef:
    """``{name = "...", params = {...}}``; ``config`` is filled in by :func:`resolve`."""

    name: str
    params: dict[str, Any] = attrs.field(factory=dict)
    config: Any = attrs.field(default=None, init=False, eq=False, repr=False)


@attrs.define
class LossRef:
    name: str
    weight: float = 1.0
    params: dict[str, Any] = attrs.field(factory=dict)
    label: str | None = None  # metric key; defaults to the name (name#2 for repeats)
    config: Any = attrs.field(default=None, init=False, eq=False, repr=False)


@attrs.define
class RunSection:
    name: str = "run"
    seed: int = 0
    output: str | None = None


@attrs.define
class TeacherRef:
    """A teacher: ``path`` (a saved model), ``cache`` (a top-k cache) or a named ``source``."""

    source: str | None = None
    path: str | None = None
    cache: str | None = None
    params: dict[str, Any] = attrs.field(factory=dict)
    label: str | None = None
    config: Any = attrs.field(default=None, init=False, eq=False, repr=False)

    @property
    def source_name(self) -> str:
        if self.source:
            return self.source
        return "cache" if self.cache else "model"


@attrs.define
class StudentSection:
    model: ComponentRef = attrs.field(factory=lambda: ComponentRef("transformer"))
    init: ComponentRef = attrs.field(factory=lambda: ComponentRef("random"))


@attrs.define
class OptimizerSection:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    params: dict[str, Any] = attrs.field(factory=dict)  # extra keyword arguments


@attrs.define
class ParamGroup:
    """Parameters whose dotted name matches ``pattern`` (a regex; first match wins)."""

    pattern: str
    lr_mult: float = 1.0  # 0 freezes the group
    weight_decay: float | None = None


@attrs.define
class Stage:
    steps: int
    name: str | None = None
    param_groups: list[ParamGroup] = attrs.field(factory=list)
    lr: float | None = None


@attrs.define
class TrainSection:
    steps: int = 100
    batch_size: int = 8
    optimizer: OptimizerSection = attrs.field(factory=OptimizerSection)
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    param_groups: list[ParamGroup] = attrs.field(factory=list)
    stages: list[Stage] = attrs.field(factory=list)
    no_decay: list[str] = attrs.field(factory=lambda: ["norm", "bias"])
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2


@attrs.define
class EvalSection:
    every: int = 0  # 0: only at the end
    batches: int = 8


@attrs.define
class RunSpec:
    data: ComponentRef
    student: StudentSection = attrs.field(factory=StudentSection)
    run: RunSection = attrs.field(factory=RunSection)
    teachers: list[TeacherRef] = attrs.field(factory=list)
    aggregator: ComponentRef = attrs.field(factory=lambda: ComponentRef("mean"))
    aligner: ComponentRef = attrs.field(factory=lambda: ComponentRef("identity"))
    losses: list[LossRef] = attrs.field(factory=lambda: [LossRef("ce")])
    train: TrainSection = attrs.field(factory=TrainSection)
    eval: EvalSection = attrs.field(factory=EvalSection)
    callbacks: list[ComponentRef] = attrs.field(factory=list)
    base_dir: str = attrs.field(default=".", init=False, eq=False, repr=False)

    def path(self, relative: str | None) -> Path | None:
        """A path from the spec, relative to the spec file's folder."""
        if relative is None:
            return None
        p = Path(os.path.expanduser(relative))
        return p if p.is_absolute() else Path(self.base_dir) / p


# ---------------------------------------------------------------- converter


def _structure_float(value: Any, _type: Any) -> float | Schedule:
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise SpecValueError(
            f"expected a number or {{schedule = ...}}, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, dict):
        return _structure_schedule(value)
    return float(value)


def _structure_schedule(table: dict) -> Schedule:
    table = dict(table)
    name = table.pop("schedule", None)
    if not isinstance(name, str):
        raise SpecValueError('a schedule table needs schedule = "NAME" (e.g. "cosine")')
    registry = get_registry()
    try:
        component = registry.get("scheduler", name)
    except KeyError as exc:
        raise SpecValueError(exc.args[0]) from None
    config = converter.structure(table, component.config)
    return Schedule(name=name, config=config, fn=component.factory(config, None))


def _structure_int(value: Any, _type: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SpecValueError(f"expected an integer, got {type(value).__name__} {value!r}")
    return value


def _structure_str(value: Any, _type: Any) -> str:
    if not isinstance(value, str):
        raise SpecValueError(f"expected a string, got {type(value).__name__} {value!r}")
    return value


def _structure_bool(value: Any, _type: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecValueError(f"expected true or false, got {value!r}")
    return value


def _is_plain_union(type_: Any) -> bool:
    """A union other than ``X | None`` (which cattrs handles itself)."""
    args = [a for a in typing.get_args(type_) if a is not type(None)]
    origin = typing.get_origin(type_)
    return origin in (typing.Union, types.UnionType) and len(args) > 1


def _union_hook(conv: cattrs.Converter):
    def factory(type_: Any):
        members = typing.get_args(type_)

        def structure(value: Any, _type: Any) -> Any:
            if value is None and type(None) in members:
                return None
            for member in members:
                if member is type(None):
                    continue
                try:
                    return conv.structure(value, member)
                except Exception:
                    continue
            names = " or ".join(getattr(m, "__name__", str(m)) for m in members)
            raise SpecValueError(f"expected {names}, got {type(value).__name__} {value!r}")

        return structure

    return factory


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook_factory(_is_plain_union, _union_hook(conv))
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_unstructure_hook(Schedule, lambda s: conv.unstructure(s.to_dict()))
    return conv


converter = make_converter()


def _format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, SpecValueError):
        return str(exc)
    if typing.get_origin(type_) is typing.Literal:
        allowed = ", ".join(repr(a) for a in typing.get_args(type_))
        return f"expected one of {allowed}"
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"unknown key(s) {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, ClassValidationError):
        # attrs validators: keep the validator's own words
        text = str(exc)
        if text and "invalid value" not in text:
            return text
    return _cattrs_format_exception(exc, type_)


def structure_errors(exc: BaseException, path: str) -> list[str]:
    """One ``message @ $.path`` line per problem in a cattrs error."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        lines = transform_error(exc, path=path, format_exception=_format_exception)
        # cattrs reports extra keys at the table; name the key itself in the path
        out = []
        for line in lines:
            m = re.match(r"unknown key\(s\) (.+) @ (.+)$", line)
            if m:
                out.extend(f"unknown key @ {m.group(2)}.{key}" for key in m.group(1).split(", "))
            else:
                out.append(line)
        return out
    if isinstance(exc, ForbiddenExtraKeysError):
        return [f"unknown key @ {path}.{key}" for key in sorted(exc.extra_fields)]
    return [f"{_format_exception(exc, None)} @ {path}"]


def structure_config(component, params: dict, path: str) -> tuple[Any, list[str]]:
    """Structure ``params`` into ``component.config``; (config, error lines)."""
    if not isinstance(params, dict):
        return None, [f"params must be a table, got {type(params).__name__} @ {path}"]
    try:
        return converter.structure(params, component.config), []
    except Exception as exc:
        return None, structure_errors(exc, path)


# ---------------------------------------------------------------- loading


def read_spec_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise SpecError(f"spec file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"cannot parse: {exc}", source=str(path)) from exc
    if not isinstance(data, dict):
        raise SpecError("the top level must be a table", source=str(path))
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.steps=10"`` -> (["train", "steps"], 10). The value is a TOML literal;
    a bare word that is not one is taken as a string."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise SpecError(f"--set {item!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return keys, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node: Any = data
        for i, key in enumerate(keys[:-1]):
            nxt_is_index = keys[i + 1].isdigit()
            node = _child(node, key, [] if nxt_is_index else {}, item)
        last = keys[-1]
        if isinstance(node, list):
            index = int(last)
            if index >= len(node):
                raise SpecError(f"--set {item!r}: index {index} is past the end")
            node[index] = value
        else:
            node[last] = value
    return data


def _child(node: Any, key: str, empty: Any, item: str) -> Any:
    if isinstance(node, list):
        if not key.isdigit() or int(key) >= len(node):
            raise SpecError(f"--set {item!r}: {key!r} is not an index of a list of {len(node)}")
        return node[int(key)]
    if not isinstance(node, dict):
        raise SpecError(f"--set {item!r}: {key!r} is inside a value, not a table")
    return node.setdefault(key, empty)


def load_spec(source: str | os.PathLike | dict, overrides: list[str] | None = None) -> RunSpec:
    """Read, override, structure and resolve a spec; raise SpecError listing every problem."""
    if isinstance(source, dict):
        data, where, base = source, "<spec>", "."
    else:
        data, where, base = read_spec_file(source), str(source), str(Path(source).parent)
    data = apply_overrides(data, overrides or [])
    spec, problems = structure_spec(data)
    if problems:
        raise SpecError(problems, source=where)
    spec.base_dir = base
    return spec


def structure_spec(data: dict) -> tuple[RunSpec | None, list[str]]:
    problems: list[str] = []
    spec = None
    try:
        spec = converter.structure(data, RunSpec)
    except Exception as exc:
        problems.extend(structure_errors(exc, "$"))
    problems.extend(_resolve_raw(data, spec))
    return spec, _dedupe(problems)


def _dedupe(lines: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for line in lines:
        seen.setdefault(line, None)
    return list(seen)


def _component_entries(data: dict):
    """(kind, path, raw entry) for every component entry in a raw spec table."""

    def table(value):
        return value if isinstance(value, dict) else None

    if table(data.get("data")):
        yield "dataset", "$.data", data["data"]
    student = table(data.get("student")) or {}
    yield "model", "$.student.model", table(student.get("model")) or {"name": "transformer"}
    yield "student_initializer", "$.student.init", table(student.get("init")) or {"name": "random"}
    yield "teacher_aggregator", "$.aggregator", table(data.get("aggregator")) or {"name": "mean"}
    yield "vocab_aligner", "$.aligner", table(data.get("aligner")) or {"name": "identity"}
    for i, entry in enumerate(_as_list(data.get("losses", [{"name": "ce"}]))):
        if table(entry):
            yield "loss", f"$.losses[{i}]", entry
    for i, entry in enumerate(_as_list(data.get("teachers"))):
        if table(entry):
            source = entry.get("source") or ("cache" if entry.get("cache") else "model")
            yield "teacher_source", f"$.teachers[{i}]", {**entry, "name": source}
    for i, entry in enumerate(_as_list(data.get("callbacks"))):
        if table(entry):
            yield "run_callback", f"$.callbacks[{i}]", entry


def _as_list(value):
    return value if isinstance(value, list) else []


def _resolve_raw(data: dict, spec: RunSpec | None) -> list[str]:
    """Phase two: look up each component and structure its params; fill ``config``."""
    registry = get_registry()
    problems: list[str] = []
    refs = dict(_refs_by_path(spec)) if spec is not None else {}
    for kind, path, entry in _component_entries(data):
        name = entry.get("name")
        if not isinstance(name, str):
            if kind != "teacher_source":
                problems.append(f"missing component name @ {path}.name")
            continue
        try:
            component = registry.get(kind, name)
        except KeyError as exc:
            name_path = f"{path}.source" if kind == "teacher_source" else f"{path}.name"
            problems.append(f"{exc.args[0]} @ {name_path}")
            continue
        config, errors = structure_config(
            component, entry.get("params", {}) or {}, f"{path}.params"
        )
        problems.extend(errors)
        if path in refs and config is not None:
            refs[path].config = config
    return problems


def _refs_by_path(spec: RunSpec):
    yield "$.data", spec.data
    yield "$.student.model", spec.student.model
    yield "$.student.init", spec.student.init
    yield "$.aggregator", spec.aggregator
    yield "$.aligner", spec.aligner
    for i, ref in enumerate(spec.losses):
        yield f"$.losses[{i}]", ref
    for i, ref in enumerate(spec.teachers):
        yield f"$.teachers[{i}]", ref
    for i, ref in enumerate(spec.callbacks):
        yield f"$.callbacks[{i}]", ref


def loss_labels(spec: RunSpec) -> list[str]:
    """The metric key of each loss: its label, or its name (``name#2`` for repeats)."""
    labels, counts = [], {}
    for ref in spec.losses:
        base = ref.label or ref.name
        counts[base] = counts.get(base, 0) + 1
        labels.append(base if counts[base] == 1 else f"{base}#{counts[base]}")
    return labels


def spec_to_dict(spec: RunSpec) -> dict:
    """The resolved spec as plain data (params filled with their defaults)."""
    data = converter.unstructure(spec)
    for path, ref in _refs_by_path(spec):
        if ref.config is not None:
            node = _node_at(data, path)
            node["params"] = converter.unstructure(ref.config)
    return _drop_none(data)


def _node_at(data: dict, path: str) -> dict:
    node: Any = data
    for part in re.findall(r"\.(\w+)|\[(\d+)\]", path):
        key, index = part
        node = node[int(index)] if index else node[key]
    return node


def _drop_none(value: Any) -> Any:
    if isinstance(value, Schedule):
        return _drop_none(value.to_dict())
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None and k != "config"}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value
