"""Shared fixtures: a tiny corpus, a tiny saved teacher, and spec builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import real_models

from kdcore import testing

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt"

os.environ.setdefault("KD_HYPOTHESIS_PROFILE", "fast")
# the served-teacher fixtures (world, server_token): tests/served_helpers.py
pytest_plugins = ["served_helpers"]


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


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF (the real-model tier, ``tests/real_models.py``)."""
    return real_models.smollm2_gguf()


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M's Q4_K_M GGUF (the real-model tier, ``tests/real_models.py``)."""
    return real_models.gemma3_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported by ``kd import`` (Q4_1/Q8_0 kept quantized)."""
    from kdcore.gguf.convert import import_gguf

    return import_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "model")
