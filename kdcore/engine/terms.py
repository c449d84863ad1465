"""The loss terms of a run, each built once as a :class:`BuiltLoss`: its label, weight,
config, component, callable, whether it reads the teacher, and the path it takes (fused
with the output heads, or on full logits, and why). The step, ``kd validate``, the
report and the summary all read these records.

A loss runs fused (``kdcore.kernels.fused``: logits one chunk of tokens at a time, never
``[tokens, vocab]``) when all of these hold, else it is called on full logits (the
fallback, exact and unchanged):

- ``train.fused_loss`` is true (the default);
- the loss declares rows (``kdcore.protocols.DeclaresRows``) and returns some for the step;
- the loss has no parameters of its own to train (the kernel differentiates only the
  student's hidden states and head);
- the student's output is hidden states and a plain head (the built-in transformer and
  mlx-lm's plain-head families; not a quantized head): read from the spec here, and from
  the student's actual output at each step;
- for a loss that reads the teacher: no learnable aggregator (the kernel treats the teacher
  as a constant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from kdcore.io import read_json
from kdcore.models.mlxlm import PLAIN_HEAD_TYPES
from kdcore.protocols import DeclaresRows, Learnable
from kdcore.registry.components import TEACHER_NEEDS, Component
from kdcore.registry.manager import get_registry
from kdcore.registry.setup import Setup
from kdcore.spec.load import loss_labels
from kdcore.spec.schedules import scheduled_fields, value_at

FUSED = "fused"


@attrs.frozen(eq=False)
class BuiltLoss:
    """One term of the run's total loss. ``key``: its name among the learnable parts
    (``trainable.losses``, checkpoints, parameter groups); ``reason``: why it does not run
    fused (None: it does, whenever its rows come back for a step)."""

    index: int
    label: str
    name: str
    weight: Any  # a float or a schedule
    config: Any  # its params, schedules unresolved
    component: Component
    loss: Any
    reads_teacher: bool
    reason: str | None

    @property
    def key(self) -> str:
        return f"loss{self.index}"

    @property
    def path(self) -> str:
        return FUSED if self.reason is None else f"full logits ({self.reason})"

    def weight_at(self, step: int, total: int) -> float:
        return value_at(self.weight, step, total)

    def params_at(self, step: int, total: int) -> Any:
        """The config at ``step``: every scheduled float replaced by its value (0-d array)."""
        fields = scheduled_fields(self.config)
        if not fields:
            return self.config
        return attrs.evolve(
            self.config,
            **{k: mx.array(value_at(v, step, total), dtype=mx.float32) for k, v in fields.items()},
        )


def learns(module: Any) -> bool:
    """Whether ``module`` has parameters of its own to train."""
    return isinstance(module, nn.Module) and bool(tree_flatten(module.trainable_parameters()))


def learnable_teacher(aggregator: Any) -> bool:
    """Whether gradients must reach the teacher signal: an aggregator that trains (one
    that declares ``learnable = False`` is frozen by every stage)."""
    if isinstance(aggregator, Learnable) and not aggregator.learnable:
        return False
    return learns(aggregator)


def fused_reason(
    spec: Any, loss: Any, reads_teacher: bool, head: str | None, learnable_teacher: bool
) -> str | None:
    """Why this loss will not run fused (None: it will): the one place that decides."""
    if not spec.train.fused_loss:
        return "train.fused_loss is false"
    if not isinstance(loss, DeclaresRows):
        return "the loss declares no rows"
    if learns(loss):
        return "the loss has parameters of its own to train"
    if head is not None:
        return head
    if reads_teacher and learnable_teacher:
        return "a learnable aggregator needs gradients through the teacher"
    return None


def model_head_reason(spec_model: Any, init_name: str | None, base_dir: str = ".") -> str | None:
    """Why a student built from this model spec will not run fused (None: it will), read
    from the spec alone (no weights)."""
    if init_name == "quantize":
        return "a quantized student's head is not a plain matrix"
    if spec_model.name == "transformer":
        return None
    if spec_model.name == "mlx-lm":
        params = spec_model.params or {}
        config = params.get("config") or {}
        if not config.get("model_type") and (params.get("path") or params.get("base")):
            named = params.get("path") or params.get("base")
            if str(named).lower().endswith(".gguf"):
                return None  # kd import writes llama/qwen/gemma3: decided when built
            try:
                config = {**read_json(Path(base_dir) / named / "config.json"), **config}
            except Exception:
                return None  # unreadable here: decided when the run builds
        model_type = config.get("model_type")
        if model_type and model_type not in PLAIN_HEAD_TYPES:
            return f"mlx-lm model type {model_type!r} has no plain head kdcore can split off"
        return None
    return f"model {spec_model.name!r}: decided when the run builds"


def build_losses(spec: Any, setup: Setup, learnable_teacher: bool) -> list[BuiltLoss]:
    """Every ``[[losses]]`` entry built (its factory called once) into a record."""
    registry = get_registry()
    head = model_head_reason(spec.student.model, spec.student.init.name, spec.base_dir)
    built = []
    for i, (ref, label) in enumerate(zip(spec.losses, loss_labels(spec))):
        component = registry.get("loss", ref.name)
        loss = component.factory(ref.config, setup)
        reads = bool(TEACHER_NEEDS & component.requires)
        built.append(
            BuiltLoss(
                index=i,
                label=label,
                name=ref.name,
                weight=ref.weight,
                config=ref.config,
                component=component,
                loss=loss,
                reads_teacher=reads,
                reason=fused_reason(spec, loss, reads, head, learnable_teacher),
            )
        )
    return built


def spec_losses(spec: Any) -> list[BuiltLoss]:
    """The run's loss records from the spec and the registry alone, for ``kd validate``:
    each loss and the aggregator are built (cheap: no model is loaded)."""
    setup = Setup(base_dir=Path(spec.base_dir), seed=spec.run.seed, spec=spec)
    setup = attrs.evolve(setup, num_teachers=max(1, len(spec.teachers)))
    return build_losses(spec, setup, _learnable_aggregator(spec, setup))


def _learnable_aggregator(spec: Any, setup: Setup) -> bool:
    if len(spec.teachers) < 2:
        return False
    component = get_registry().get("teacher_aggregator", spec.aggregator.name)
    try:
        aggregator = component.factory(spec.aggregator.config, setup)
    except Exception:
        return False  # it fails again, with its own message, when the run builds
    return learnable_teacher(aggregator)
