"""The cattrs converter of specs: strict types, unknown keys refused, any float may be a
schedule, and errors rendered as ``message @ $.path`` lines."""

from __future__ import annotations

import contextvars
import difflib
import math
import re
import sys
import types
import typing
from typing import Any

import attrs
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


# Set while a schedule's own parameters are structured: they are plain numbers.
_IN_SCHEDULE: contextvars.ContextVar[bool] = contextvars.ContextVar("in_schedule", default=False)

# Integers a spec may hold: anything wider than 64 bits is a typo or an attack (a 5,000-digit
# integer), and NumPy, MLX and the seeds all stop at 64 bits.
INT_LIMIT = 1 << 64


def _structure_float(value: Any, _type: Any) -> float | Schedule:
    # Every float of every spec and component config comes through here: the one place
    # that refuses NaN and inf (``nan > 0`` is False, so range validators miss NaN).
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise SpecValueError(
            f"expected a number or {{schedule = ...}}, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, dict):
        if _IN_SCHEDULE.get():
            raise SpecValueError(
                "a schedule's parameters are plain numbers: a schedule inside a schedule is "
                "not supported"
            )
        return _structure_schedule(value)
    try:
        number = float(value)
    except OverflowError:
        raise SpecValueError(
            f"expected a finite number, got an integer of {len(str(value))} digits"
        ) from None
    if not math.isfinite(number):
        raise SpecValueError(f"expected a finite number, got {number}")
    return number


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
    token = _IN_SCHEDULE.set(True)
    try:
        config = converter.structure(table, component.config)
    finally:
        _IN_SCHEDULE.reset(token)
    return Schedule(name=name, config=config, fn=component.factory(config, None))


def _structure_int(value: Any, _type: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        else:
            raise SpecValueError(f"expected an integer, got {type(value).__name__} {value!r}")
    if not -INT_LIMIT < value < INT_LIMIT:
        raise SpecValueError(
            f"expected an integer of at most 64 bits, got one of {value.bit_length()} bits"
        )
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


# Markers between _format_exception and structure_errors: cattrs reports an unknown key and
# an attrs validator's error at the table, not at the key; these carry the key down.
_KEY = "\x00key\x00"
_FIELD = "\x00field\x00"
# attrs validators here and in plugins word their errors "<field> must ..."
_FIELD_MESSAGE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*) must ")


def _unknown_keys(exc: ForbiddenExtraKeysError) -> str:
    """One marked entry per unknown key, each with a did-you-mean from the table's fields."""
    fields = [f.name for f in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
    parts = []
    for key in sorted(exc.extra_fields):
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parts.append(f"{_KEY}{key}{_KEY}{hint}")
    return "".join(parts)


def _format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, SpecValueError):
        return str(exc)
    if typing.get_origin(type_) is typing.Literal:
        allowed = ", ".join(repr(a) for a in typing.get_args(type_))
        return f"expected one of {allowed}"
    if isinstance(exc, ForbiddenExtraKeysError):
        return _unknown_keys(exc)
    if isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, ClassValidationError):
        # attrs validators: keep the validator's own words
        text = str(exc)
        if text and "invalid value" not in text:
            m = _FIELD_MESSAGE.match(text)
            return f"{_FIELD}{m.group(1)}{_FIELD}{text}" if m else text
    return _cattrs_format_exception(exc, type_)


def _place(line: str) -> list[str]:
    """Move a marked key or field from the message into the path."""
    message, _, path = line.rpartition(" @ ")
    if message.startswith(_KEY):
        entries = message.split(_KEY)[1:]
        return [
            f"unknown key{hint} @ {path}.{key}" for key, hint in zip(entries[::2], entries[1::2])
        ]
    if message.startswith(_FIELD):
        _, field, text = message.split(_FIELD, 2)
        return [f"{text} @ {path}.{field}"]
    return [line]


def structure_errors(exc: BaseException, path: str) -> list[str]:
    """One ``message @ $.path`` line per problem in a cattrs error."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        lines = transform_error(exc, path=path, format_exception=_format_exception)
    else:
        lines = [f"{_format_exception(exc, None)} @ {path}"]
    return [placed for line in lines for placed in _place(line)]


def structure_config(component, params: dict, path: str) -> tuple[Any, list[str]]:
    """Structure ``params`` into ``component.config``; (config, error lines)."""
    if not isinstance(params, dict):
        return None, [f"params must be a table, got {type(params).__name__} @ {path}"]
    try:
        return converter.structure(params, component.config), []
    except Exception as exc:
        return None, structure_errors(exc, path)
