"""What a component factory is given besides its config, and ``kdcore.build``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs

from kdcore.plugins import get_registry
from kdcore.spec import structure_config


@attrs.define
class Setup:
    """Context for factories: where relative paths start, the seed, the tokenizer, and
    (during a run) the spec, the student's and teachers' sizes and requirements."""

    base_dir: Path = Path(".")
    seed: int = 0
    tokenizer: Any = None
    spec: Any = None
    student_config: Any = None
    teacher_configs: list = attrs.field(factory=list)
    num_teachers: int = 1
    teacher: Any = None  # the TeacherRef a teacher source is built for
    extras: dict = attrs.field(factory=dict)

    def resolve(self, path: str | os.PathLike) -> Path:
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else self.base_dir / p


def build(kind: str, name: str, setup: Setup | None = None, **params: Any) -> Any:
    """Build a component by name, as a spec would: ``build("loss", "hinton", temperature=2.0)``.

    Parameters are structured and validated like a spec's ``params``; errors raise
    ``SpecError``.
    """
    from kdcore.errors import SpecError

    component = get_registry().get(kind, name)
    config, problems = structure_config(component, params, f"$.{kind}.{name}.params")
    if problems:
        raise SpecError(problems)
    return component.factory(config, setup or Setup())


def make_config(kind: str, name: str, **params: Any) -> Any:
    """Just the structured config of a component."""
    from kdcore.errors import SpecError

    component = get_registry().get(kind, name)
    config, problems = structure_config(component, params, f"$.{kind}.{name}.params")
    if problems:
        raise SpecError(problems)
    return config
