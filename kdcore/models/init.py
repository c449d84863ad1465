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
from kdcore.models.dtype import dense_weights


@attrs.define
class RandomConfig:
    pass


def random_init(config: RandomConfig, setup=None):
    """Keep the student as the model component made it: its own random initialisation
    (seeded by the run's seed), or the weights it loaded from ``path``."""

    def init(student, teachers):
        # A student loaded from a folder keeps those weights: the summary says so, not
        # "random" (a model component that loads says where from in ``student.source``).
        source = getattr(student, "source", None)
        if source is not None:
            return {"initialised_tensors": 0, "from": "loaded", "path": str(source)}
        return {"initialised_tensors": 0, "from": "random"}

    return init


@attrs.define
class FromTeacherConfig:
    teacher: int = 0  # which teacher, in spec order
    # "uniform", "ends", or a list: student layer i <- teacher layer map[i]
    layer_map: str | list[int] = "uniform"
    mismatch: Literal["skip", "truncate", "interpolate"] = "truncate"
    # A model folder to copy from instead of teachers[teacher]'s model: what a run whose
    # teacher is a top-k cache (no model) names to start from the teacher's weights.
    teacher_path: str | None = None

    def teacher_model(self, student_loaded: bool) -> int | None:
        """kdcore.ReadsTeacherModel: the teacher whose model is copied (None: a folder)."""
        return None if self.teacher_path else self.teacher


_LAYER = re.compile(r"^(blocks|layers|model\.layers|h)\.(\d+)\.(.*)$")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Spread the student's layers evenly over the teacher's, first and last included."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def ends_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher's first ceil(n/2) and last floor(n/2) layers: depth pruning that drops a
    contiguous middle block. On SmolLM2-135M-Instruct (30 layers, 15 kept) it starts at a
    far lower loss than the uniform spread, which breaks every residual step at once."""
    first = (student_layers + 1) // 2
    last = student_layers - first
    return list(range(first)) + list(range(teacher_layers - last, teacher_layers))


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
    through a layer map; tensors of other shapes are truncated, interpolated or skipped.
    ``teacher_path`` names a model folder to copy from instead of ``teachers[teacher]``
    (needed when that teacher is a top-k cache, which holds no weights)."""

    def init(student, teachers):
        if config.teacher_path:
            from kdcore.models.io import load_model

            path = setup.resolve(config.teacher_path) if setup else config.teacher_path
            teacher = load_model(path)[0]
        elif 0 <= config.teacher < len(teachers) and teachers[config.teacher] is not None:
            teacher = teachers[config.teacher]
        else:
            raise SpecError(
                "initializer 'from-teacher' needs a teacher model "
                f"(teachers[{config.teacher}] has none): give a model teacher, or name the "
                "folder to copy with teacher_path @ $.student.init.params.teacher"
            )
        # a quantized teacher (a GGUF import keeps Q4/Q8 layers) is copied dequantized
        teacher_params = dense_weights(teacher)
        student_params = dict(tree_flatten(student.parameters()))

        def layers(params):
            return 1 + max(  # noqa: E731
                [int(m.group(2)) for k in params if (m := _LAYER.match(k))], default=-1
            )

        s_layers, t_layers = layers(student_params), layers(teacher_params)
        if config.layer_map in ("uniform", "ends"):
            rule = uniform_layer_map if config.layer_map == "uniform" else ends_layer_map
            mapping = rule(s_layers, t_layers) if s_layers else []
        elif isinstance(config.layer_map, list):
            mapping = list(config.layer_map)
            if len(mapping) != s_layers or any(not 0 <= m < t_layers for m in mapping):
                raise SpecError(
                    f"layer_map needs {s_layers} teacher layer indices in [0, {t_layers}), "
                    f"got {mapping} @ $.student.init.params.layer_map"
                )
        else:
            raise SpecError(
                f"layer_map must be 'uniform', 'ends' or a list, got {config.layer_map!r} "
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
        report = {
            "from": "teacher",
            "initialised_tensors": len(new),
            "skipped_tensors": len(skipped),
            "layer_map": mapping,
        }
        if config.teacher_path:
            report["teacher_path"] = str(path)
        else:
            report["teacher"] = config.teacher
        return report

    return init
