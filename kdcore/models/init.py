"""Student initializers: the model's own random init, and ``from-teacher`` (teacher tensors
copied through a layer map, truncated or interpolated where shapes differ)."""

from __future__ import annotations

import re
from typing import Literal

import attrs
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from kdcore.errors import SpecError


@attrs.define
class RandomConfig:
    pass


def random_init(config: RandomConfig, setup=None):
    """Keep the model's own random initialisation (seeded by the run's seed)."""

    def init(student, teachers):
        return {"initialised_tensors": 0, "from": "random"}

    return init


@attrs.define
class FromTeacherConfig:
    teacher: int = 0  # which teacher, in spec order
    layer_map: str | list[int] = "uniform"  # "uniform" or student layer i <- teacher layer map[i]
    mismatch: Literal["skip", "truncate", "interpolate"] = "truncate"


_LAYER = re.compile(r"^(blocks|layers|model\.layers|h)\.(\d+)\.(.*)$")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Spread the student's layers evenly over the teacher's, first and last included."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def _resize(value: np.ndarray, shape: tuple[int, ...], mode: str) -> np.ndarray | None:
    if value.shape == shape:
        return value
    if mode == "skip" or value.ndim != len(shape):
        return None
    if mode == "truncate":
        if any(t < s for t, s in zip(value.shape, shape)):
            return None
        return value[tuple(slice(0, s) for s in shape)]
    out = value
    for axis, size in enumerate(shape):  # linear interpolation along each axis
        if out.shape[axis] == size:
            continue
        src = np.linspace(0, out.shape[axis] - 1, size)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, out.shape[axis] - 1)
        frac = (src - lo).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, lo, axis) * (1 - frac) + np.take(out, hi, axis) * frac
    return out


def from_teacher(config: FromTeacherConfig, setup=None):
    """Copy the teacher's tensors into the student: embeddings and norms by name, blocks
    through a layer map; tensors of other shapes are truncated, interpolated or skipped."""

    def init(student, teachers):
        if not teachers or teachers[config.teacher] is None:
            raise SpecError(
                "initializer 'from-teacher' needs a teacher model "
                f"(teachers[{config.teacher}] has none) @ $.student.init.params.teacher"
            )
        teacher_params = dict(tree_flatten(teachers[config.teacher].parameters()))
        student_params = dict(tree_flatten(student.parameters()))

        def layers(params):
            return 1 + max(  # noqa: E731
                [int(m.group(2)) for k in params if (m := _LAYER.match(k))], default=-1
            )

        s_layers, t_layers = layers(student_params), layers(teacher_params)
        if config.layer_map == "uniform":
            mapping = uniform_layer_map(s_layers, t_layers) if s_layers else []
        elif isinstance(config.layer_map, list):
            mapping = list(config.layer_map)
            if len(mapping) != s_layers or any(not 0 <= m < t_layers for m in mapping):
                raise SpecError(
                    f"layer_map needs {s_layers} teacher layer indices in [0, {t_layers}), "
                    f"got {mapping} @ $.student.init.params.layer_map"
                )
        else:
            raise SpecError(
                f"layer_map must be 'uniform' or a list, got {config.layer_map!r} "
                "@ $.student.init.params.layer_map"
            )
        new, skipped = {}, []
        for name, value in student_params.items():
            m = _LAYER.match(name)
            source = f"{m.group(1)}.{mapping[int(m.group(2))]}.{m.group(3)}" if m else name
            if source not in teacher_params:
                skipped.append(name)
                continue
            resized = _resize(np.array(teacher_params[source]), tuple(value.shape), config.mismatch)
            if resized is None:
                skipped.append(name)
                continue
            new[name] = mx.array(resized.astype(np.float32)).astype(value.dtype)
        student.update(tree_unflatten(list(new.items())))
        return {
            "initialised_tensors": len(new),
            "skipped_tensors": len(skipped),
            "layer_map": mapping,
        }

    return init
