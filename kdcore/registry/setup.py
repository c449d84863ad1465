"""What a component factory is given besides its config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs


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
