"""Reading a spec: file -> ``--set`` overrides -> phase one (RunSpec, component params as
plain tables) -> phase two (each component's params into its own config class). Every
problem of both phases is reported at once, one ``message @ $.path`` line each."""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from kdcore.errors import SpecError
from kdcore.registry.manager import get_registry
from kdcore.spec.convert import converter, structure_config, structure_errors
from kdcore.spec.schedules import Schedule
from kdcore.spec.schema import SLOTS, RunSpec, default_source

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# A spec is a few kilobytes; reading stops past this (a spec path of /dev/zero must not fill
# memory).
MAX_SPEC_BYTES = 16 << 20
# A spec nests a handful of tables deep; past this it is not a spec (and deeper data would
# overflow the stack of the parser, the --set overrides or the converter).
MAX_DEPTH = 64


def read_spec_file(path: str | os.PathLike) -> dict:
    """A TOML or JSON file as a table; every way it can be unreadable is a SpecError."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"spec file not found: {path}")
    if path.is_dir():
        raise SpecError(f"{path} is a directory, not a spec file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"cannot read the spec: {exc.strerror or exc}", source=str(path)) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"larger than {MAX_SPEC_BYTES >> 20} MiB: not a spec", source=str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(
            f"line {line} is not valid UTF-8 (byte {exc.start}); a spec is UTF-8 text",
            source=str(path),
        ) from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except RecursionError:
        raise SpecError(
            f"cannot parse: nested too deeply (a spec nests at most {MAX_DEPTH} levels)",
            source=str(path),
        ) from None
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors, and so is
        # an integer past Python's digit limit
        raise SpecError(f"cannot parse: {_parse_message(exc)}", source=str(path)) from None
    if not isinstance(data, dict):
        raise SpecError("the top level must be a table", source=str(path))
    check_depth(data, str(path))
    return data


def _parse_message(exc: ValueError) -> str:
    text = str(exc)
    if "integer string conversion" in text:  # Python's own words name a setting of Python
        digits = re.search(r"value has (\d+) digits", text)
        return f"an integer of {digits.group(1) if digits else 'too many'} digits"
    return text


def check_depth(data: Any, source: str | None = None) -> None:
    """Refuse data nested deeper than ``MAX_DEPTH`` (walked without recursion)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SpecError(f"nested more than {MAX_DEPTH} levels deep: not a spec", source=source)
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


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
    except RecursionError:
        raise SpecError(f"--set {item!r}: the value is nested too deeply") from None
    except ValueError:  # not a TOML literal (or an integer past the digit limit): a string
        value = raw.strip()
    check_depth(value, f"--set {item!r}")
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
    check_depth(data, where)
    spec, problems = structure_spec(data)
    if problems:
        raise SpecError(blame_overrides(problems, overrides or []), source=where)
    spec.base_dir = base
    spec.overrides = list(overrides or [])
    return spec


def override_path(item: str) -> str | None:
    """The path ``--set item`` writes: ``losses.0.weight=1`` -> ``$.losses[0].weight``."""
    try:
        keys, _value = parse_override(item)
    except SpecError:
        return None
    return "$" + "".join(f"[{k}]" if k.isdigit() else f".{k}" for k in keys)


def blame_overrides(problems: list[str], overrides: list[str]) -> list[str]:
    """Say ``(from --set KEY=VALUE)`` on each problem at or under a path an override wrote
    (the last override of a path wins, as it does when they are applied)."""
    paths = [(override_path(item), item) for item in overrides]
    out = []
    for line in problems:
        message, sep, where = line.rpartition(" @ ")
        culprit = None
        for path, item in paths:
            if path and sep and (where == path or where.startswith((path + ".", path + "["))):
                culprit = item
        out.append(f"{message} (from --set {culprit}) @ {where}" if culprit else line)
    return out


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
    for slot in SLOTS:
        for path, entry in slot.raw_entries(data):
            if slot.kind == "teacher_source":  # named by source, or by server/cache/path
                source = default_source(
                    entry.get("source"), entry.get("cache"), entry.get("server")
                )
                entry = {**entry, "name": source}
            yield slot.kind, path, entry


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
    for slot in SLOTS:
        yield from slot.refs(spec)


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


def read_config(source: str | os.PathLike | dict, cls: type, overrides: list[str] | None = None):
    """A TOML/JSON file (or a dict) with ``--set`` overrides, structured into the attrs class
    ``cls`` by the spec converter; raises SpecError listing every problem."""
    if isinstance(source, dict):
        data, where = source, "<config>"
    else:
        data, where = read_spec_file(source), str(source)
    data = apply_overrides(data, overrides or [])
    check_depth(data, where)
    try:
        return converter.structure(data, cls)
    except Exception as exc:
        problems = blame_overrides(structure_errors(exc, "$"), overrides or [])
        raise SpecError(problems, source=where) from None


def to_plain(value: Any) -> Any:
    """An attrs config (schedules included) as plain JSON/TOML data."""
    return converter.unstructure(value)
