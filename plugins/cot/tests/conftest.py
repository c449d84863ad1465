from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def arithmetic(tmp_path: Path) -> dict[str, Path]:
    """A small synthetic arithmetic task: train / test / longer JSONL files."""
    from kd_cot.synthetic import make_task

    return make_task(tmp_path / "data", seed=3, train=120, test=12, digits=(2,))
