"""The ``quantize`` initializer's parameters (:class:`QuantizeConfig`, its per-layer
``layers`` entries) and what it records on the student (:class:`QuantizeRecord`); the
initializer itself is :mod:`kdcore.models.quantize`."""

from __future__ import annotations

import re
from typing import Any, Literal

import attrs
import mlx.core as mx

from kdcore.spec.convert import SpecValueError, converter
from kdcore.spec.validators import non_negative

MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")
# The group size each mode defaults to (mx.quantize's table of quantization modes).
DEFAULT_GROUP_SIZE = {"affine": 64, "mxfp4": 32, "mxfp8": 32, "nvfp4": 16}


def _probe(mode: str, bits: int, group_size: int) -> str | None:
    """MLX's own refusal of (mode, bits, group size), or None if it quantizes with them.

    mx.quantize checks its arguments when the op is built (nothing is computed), so the
    supported set is MLX's, not a copy of its table that could go stale."""
    try:
        mx.quantize(mx.zeros((1, 32 * group_size)), group_size, bits, mode=mode)
    except ValueError as exc:
        return str(exc).removeprefix("[quantize] ").strip()
    return None


def _check_bits(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {value!r}")


def _check_group_size(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"group_size must be a positive integer, got {value!r}")


def _bits(instance, attribute, value) -> None:
    _check_bits(value)
    problem = _probe(instance.mode, value, DEFAULT_GROUP_SIZE[instance.mode])
    if problem is not None and "bits" in problem:
        raise ValueError(f"bits must suit mode {instance.mode!r}: {problem}")


def _group_size(instance, attribute, value) -> None:
    if value is None:
        return
    _check_group_size(value)
    if _probe(instance.mode, instance.bits, DEFAULT_GROUP_SIZE[instance.mode]) is not None:
        return  # bits is reported; a group size cannot be judged without valid bits
    problem = _probe(instance.mode, instance.bits, value)
    if problem is not None:
        raise ValueError(f"group_size must suit mode {instance.mode!r}: {problem}")


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"{pattern!r}: {exc}"
    return None


def _patterns(instance, attribute, value) -> None:
    for pattern in value:
        if (problem := _regex_problem(pattern)) is not None:
            raise ValueError(f"skip must hold regexes: {problem}")


def _pattern(instance, attribute, value) -> None:
    if (problem := _regex_problem(value)) is not None:
        raise ValueError(f"pattern must be a regex: {problem}")


def _layer_bits(instance, attribute, value) -> None:
    if value is not None:
        _check_bits(value)


def _layer_group_size(instance, attribute, value) -> None:
    if value is not None:
        _check_group_size(value)


@attrs.define
class LayerQuant:
    """One entry of ``layers``: the layers whose path ``pattern`` finds take these
    parameters (None: the top-level one)."""

    pattern: str = attrs.field(validator=_pattern)  # re.search on layer paths, as skip's
    bits: int | None = attrs.field(default=None, validator=_layer_bits)
    group_size: int | None = attrs.field(default=None, validator=_layer_group_size)


def _structure_entry(value: Any, type_: Any) -> LayerQuant:
    # a table keyed by pattern (mlx-lm's config.json shape) would otherwise reach cattrs as
    # its keys, each an "unknown error"
    if not isinstance(value, dict):
        raise SpecValueError(
            f'expected a table {{ pattern = "REGEX", bits = N, group_size = N }}, got '
            f"{type(value).__name__} {value!r}: layers is a list of them (the first that "
            "matches a layer wins), not a table keyed by pattern"
        )
    return _structure_fields(value, type_)


_structure_fields = converter.get_structure_hook(LayerQuant)
converter.register_structure_hook(LayerQuant, _structure_entry)


def _layers(instance, attribute, value) -> None:
    """Each entry's widths checked with the mode, as the top-level ones (which the
    validators before this one have passed)."""
    mode = instance.mode
    for i, entry in enumerate(value):
        name = f"layers[{i}] ({entry.pattern!r})"
        if entry.bits is None and entry.group_size is None:
            raise ValueError(f"layers must give bits or group_size: {name} gives neither")
        bits = entry.bits if entry.bits is not None else instance.bits
        problem = _probe(mode, bits, DEFAULT_GROUP_SIZE[mode])
        if problem is not None and "bits" in problem:
            raise ValueError(f"layers must suit mode {mode!r}: {name} bits = {bits}: {problem}")
        groups = entry.group_size or instance.groups
        problem = _probe(mode, bits, groups)
        if problem is not None:
            raise ValueError(
                f"layers must suit mode {mode!r}: {name} group_size = {groups} "
                f"(bits = {bits}): {problem}"
            )


@attrs.define
class QuantizeConfig:
    bits: int = attrs.field(default=4, validator=_bits)  # 2..8, as the mode allows
    group_size: int | None = attrs.field(default=None, validator=_group_size)  # None: mode's
    mode: Literal["affine", "mxfp4", "mxfp8", "nvfp4"] = "affine"  # as mx.quantize takes it
    skip: list[str] = attrs.field(factory=list, validator=_patterns)  # re.search on layer paths
    # per-layer bits/group_size, the first matching pattern wins (see quantize.py)
    layers: list[LayerQuant] = attrs.field(factory=list, validator=_layers)
    start: Literal["auto", "teacher", "student"] = "auto"  # what is quantized (see quantize.py)
    teacher: int = attrs.field(default=0, validator=non_negative)  # for start = "teacher"

    def teacher_model(self, student_loaded: bool) -> int | None:
        """kdcore.ReadsTeacherModel: the teacher copied before quantizing, as ``_start``
        decides (``auto`` copies it unless the student was loaded from a folder)."""
        if self.start == "teacher" or (self.start == "auto" and not student_loaded):
            return self.teacher
        return None

    @property
    def groups(self) -> int:
        return self.group_size or DEFAULT_GROUP_SIZE[self.mode]


@attrs.frozen
class QuantizeRecord:
    """What the initializer applied, kept on the student for refreezing and saving: the
    top-level parameters and every quantized layer's own (``layers`` entries, or the
    model's ``quant_predicate``, give some layers others)."""

    bits: int
    group_size: int
    mode: str
    # path (the student's parameter names) -> {"group_size", "bits", "mode"}
    layers: dict[str, dict[str, Any]]

    @property
    def top(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}
