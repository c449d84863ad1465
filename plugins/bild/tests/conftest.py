"""A tiny corpus and a tiny teacher trained with the project, shared by the bild tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcore.testing import tiny_spec, train_tiny_teacher

ROOT = Path(__file__).resolve().parents[3]
CORPUS = ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt"

__all__ = ["tiny_spec"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, corpus) -> Path:
    return train_tiny_teacher(corpus, tmp_path_factory.mktemp("teacher-run"))


@pytest.fixture
def spec_for(corpus):
    def make(losses, **kw):
        return tiny_spec(corpus, losses, **kw)

    return make
