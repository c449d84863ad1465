"""Shared fixtures: a tiny corpus, a tiny saved teacher, and spec builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdcore import testing

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt"

os.environ.setdefault("KD_HYPOTHESIS_PROFILE", "fast")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first 40k characters of the bundled corpus."""
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def tiny_spec(corpus: Path, **sections) -> dict:
    """The core tests' tiny run: six steps of ``kdcore.testing.tiny_spec``."""
    return testing.tiny_spec(corpus, steps=6, **sections)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, corpus) -> Path:
    """A small teacher trained for a few steps with the project itself."""
    out = tmp_path_factory.mktemp("teacher-run")
    return testing.train_tiny_teacher(corpus, out, steps=30, heads=4, log_every=10)


@pytest.fixture
def make_spec(corpus):
    def make(**sections):
        return tiny_spec(corpus, **sections)

    return make
