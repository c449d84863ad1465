"""Fixtures: tiny domain corpora and two tiny teachers trained by the project itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcore import testing

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "examples" / "multi_teacher" / "data"


@pytest.fixture(scope="session")
def domains(tmp_path_factory) -> dict[str, Path]:
    """Two small domain files: Shakespeare and GSM8K (the experiment's bundled slices)."""
    folder = tmp_path_factory.mktemp("domains")
    out = {}
    for name in ("shakespeare", "gsm8k"):
        path = folder / f"{name}.txt"
        path.write_text((DATA / f"{name}.txt").read_text(encoding="utf-8")[:12_000])
        out[name] = path
    return out


@pytest.fixture(scope="session")
def teachers(tmp_path_factory, domains) -> dict[str, Path]:
    """Two tiny teachers of different widths, one per domain."""
    return {
        name: testing.train_tiny_teacher(
            path, tmp_path_factory.mktemp(f"teacher-{name}"), steps=6, dim=dim, log_every=3
        )
        for (name, path), dim in zip(domains.items(), (32, 24))
    }
