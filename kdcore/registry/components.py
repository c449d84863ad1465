"""The record every plugin hook returns: one named, documented, configurable component.

A component is data about a factory. The core never calls a plugin's code to learn what
it is: name, config class, requirements and doc are all here, so ``kd components`` and
``kd explain`` work without building anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs

KINDS = (
    "loss",
    "teacher_aggregator",
    "student_initializer",
    "vocab_aligner",
    "scheduler",
    "model",
    "dataset",
    "teacher_source",
    "metric",
    "run_callback",
)

# What a component may ask the engine to compute for it.
REQUIREMENTS = frozenset(
    {
        "teacher",  # a teacher signal (logits or a top-k cache)
        "dense_teacher",  # full-vocabulary teacher logits; a top-k cache will not do
        "hidden_states",  # per-layer hidden states of student and teacher
        "attentions",  # per-layer attention maps of student and teacher
        "pairs",  # chosen/rejected preference pairs in the batch
        "student_samples",  # sequences sampled from the student (on-policy)
        "reasoning_masks",  # separate reasoning and answer masks in the batch
        "reference",  # a frozen reference model (DPO)
    }
)

# Properties a component may declare; the conformance kit tests the ones that are declared.
# What a component's ``requires`` names when it reads the teachers' signal.
TEACHER_NEEDS = frozenset({"teacher", "dense_teacher"})

PROPERTIES = frozenset(
    {
        "zero_at_identity",  # loss is 0 when student and teacher distributions are equal
        "shift_invariant",  # loss is unchanged when a constant is added to the logits
        "sparse_ok",  # loss works from a top-k teacher signal
        "monotone_increasing",  # scheduler: never decreases with step
        "monotone_decreasing",  # scheduler: never increases with step
    }
)

_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")


@attrs.define(frozen=True)
class NoConfig:
    """Config of a component that takes no parameters."""


def _properties(values: Any) -> frozenset[str]:
    """Declared properties; "fused" is dropped: whether a loss runs fused is read from its
    rows (``kdcore.protocols.DeclaresRows``), never declared (older plugins still name it)."""
    return frozenset(values) - {"fused"}


@attrs.frozen
class Component:
    """A named component contributed through one of the ``kd_*`` hooks.

    Attributes:
        name: lower-case identifier used in specs (``[[losses]] name = "hinton"``).
        factory: ``factory(config, setup) -> object``; what the object must do depends on
            the kind (see ``kdcore.registry.hookspecs``).
        config: an attrs class of the component's parameters; spec ``params`` are
            structured into it by cattrs, so unknown keys and wrong types are errors.
        requires: what the engine must compute for it (see ``REQUIREMENTS``).
        properties: declared mathematical properties, tested by ``kdcore.testing``.
        doc: one line that ``kd components`` prints.
    """

    name: str = attrs.field()
    factory: Callable[..., Any]
    config: type = NoConfig
    requires: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    properties: frozenset[str] = attrs.field(default=frozenset(), converter=_properties)
    doc: str = ""

    @name.validator
    def _check_name(self, _attribute: attrs.Attribute, value: str) -> None:
        if not _NAME.match(value):
            raise ValueError(
                f"component name {value!r} must be lower case letters, digits, '_' or '-'"
            )

    def __attrs_post_init__(self) -> None:
        unknown = self.requires - REQUIREMENTS
        if unknown:
            raise ValueError(
                f"component {self.name!r} requires unknown {sorted(unknown)}; "
                f"known: {sorted(REQUIREMENTS)}"
            )
        unknown = self.properties - PROPERTIES
        if unknown:
            raise ValueError(
                f"component {self.name!r} declares unknown properties {sorted(unknown)}"
            )
        if not attrs.has(self.config):
            raise TypeError(f"component {self.name!r}: config must be an attrs class")
