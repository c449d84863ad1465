"""The cattrs converter of specs: strict types, unknown keys refused, any float may be a
schedule, and errors rendered as ``message @ $.path`` lines."""

from __future__ import annotations

import re
import sys
import types
import typing
from typing import Any

import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.v import format_exception as _cattrs_format_exception
from cattrs.v import transform_error

from kdcore.registry.manager import get_registry
from kdcore.spec.schedules import Schedule

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass


class SpecValueError(ValueError):
    """A value error whose message is shown to the user as it is."""


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
