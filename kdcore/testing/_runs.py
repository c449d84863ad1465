"""Tiny runs, engine drivers and pytest fixtures of ``kdcore.testing`` (see the package
docstring)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from kdcore import app

# ---------------------------------------------------------------- tiny runs


def tiny_spec(
    corpus: str | os.PathLike,
    losses: list[dict] | None = None,
    *,
    steps: int = 20,
    dim: int = 32,
    teachers: list[dict] | None = None,
    **sections: Any,
) -> dict:
    """A spec (as a dict) for a run of a few seconds on the text file ``corpus``: 32-byte
    rows, batches of 4, a 2-layer student of width ``dim``; ``losses`` default to ``ce``.
    Each keyword in ``sections`` replaces that whole top-level table::

        spec = testing.tiny_spec(corpus, [{"name": "hinton"}], teachers=[{"path": str(t)}])
        app.distill(spec, output=tmp_path / "run", progress=False)
    """
    spec = {
        "run": {"name": "tiny", "seed": 0},
        "data": {
            "name": "text",
            "params": {"path": str(corpus), "seq_len": 32, "val_fraction": 0.1},
        },
        "student": {
            "model": {
                "name": "transformer",
                "params": {"dim": dim, "layers": 2, "heads": 2, "max_seq_len": 32},
            }
        },
        "losses": losses if losses is not None else [{"name": "ce"}],
        "train": {
            "steps": steps,
            "batch_size": 4,
            "log_every": 1,
            "optimizer": {"name": "adamw", "lr": 3e-3},
        },
        "eval": {"batches": 2},
    }
    if teachers is not None:
        spec["teachers"] = teachers
    spec.update(sections)
    return spec


def train_tiny_teacher(
    corpus: str | os.PathLike,
    output: str | os.PathLike,
    *,
    steps: int = 40,
    dim: int = 48,
    heads: int = 2,
    log_every: int = 1,
) -> os.PathLike:
    """Train a small teacher on ``corpus`` with the project itself (cross-entropy, a few
    seconds); returns its model directory ``output/student``."""

    spec = tiny_spec(corpus, steps=steps, dim=dim)
    spec["student"]["model"]["params"]["heads"] = heads
    spec["train"]["log_every"] = log_every
    app.distill(spec, output=output, progress=False)
    return Path(output) / "student"


def save_random_model(
    output: str | os.PathLike,
    *,
    dim: int = 16,
    layers: int = 1,
    heads: int = 2,
    max_seq_len: int = 64,
    seed: int = 3,
) -> Path:
    """An untrained byte-level transformer saved as a model directory (config, weights and
    tokenizer) at ``output``; returns ``output``."""
    from kdcore.models.io import save_model
    from kdcore.models.transformer import Transformer, TransformerConfig
    from kdcore.tokenizers.simple import ByteTokenizer, save_tokenizer

    mx.random.seed(seed)
    config = TransformerConfig(
        vocab_size=256, dim=dim, layers=layers, heads=heads, max_seq_len=max_seq_len
    )
    model = Transformer(config)
    mx.eval(model.parameters())
    save_model(model, output, "transformer", config)
    save_tokenizer(ByteTokenizer(), output)
    return Path(output)


# ---------------------------------------------------------------- driving the engine


def run_kd(*args: Any) -> int:
    """``kd ARGS...`` in this process (each argument through ``str``); its exit status."""
    from kdcore.cli.main import main

    return main([str(a) for a in args])


@contextlib.contextmanager
def plugins(*objects: object, distribution: str = "kdcore-testing") -> Iterator[Any]:
    """The process-wide registry rebuilt from the built-ins, the installed plugins and
    ``objects`` (modules or objects with ``kd_*`` hook implementations, recorded as coming
    from ``distribution``); yields it and restores the previous registry on exit. With no
    objects: the installed plugins only. Its native row kernels are installed meanwhile
    (as a run installs its registry's), the previous ones restored on exit::

        with testing.plugins(MyPlugin()):
            app.distill(spec, output=tmp_path / "run", progress=False)
    """
    from kdcore.kernels.native import use_row_kernels
    from kdcore.registry import manager

    saved = manager._registry
    try:
        registry = manager.reset_registry([(obj, distribution) for obj in objects])
        kernels = use_row_kernels(registry.row_kernels())
        try:
            yield registry
        finally:
            use_row_kernels(kernels)
    finally:
        manager._registry = saved


def build_run(spec: Any) -> Any:
    """A run's built parts from a spec (a dict, a path or a ``app.RunSpec``), as
    ``kd distill`` builds them, without training: ``dataset``, ``student``, ``teachers``,
    ``aggregator``, ``aligner``, ``losses``, ``total``..."""
    from kdcore.engine.build import build_parts
    from kdcore.spec.load import load_spec
    from kdcore.spec.schema import RunSpec

    return build_parts(spec if isinstance(spec, RunSpec) else load_spec(spec))


def prepare_batch(parts: Any, rows: dict[str, np.ndarray], step: int) -> dict[str, mx.array]:
    """The batch of step ``step`` from dataset ``rows``, as MLX arrays after every loss's
    ``prepare_batch`` (what the engine's step does before the teachers run)."""
    from kdcore.engine.step import prepare_batch as engine_prepare_batch

    return engine_prepare_batch(parts, rows, step)


# ---------------------------------------------------------------- fixtures

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "shakespeare" / "data"
CORPUS = CORPUS / "tinyshakespeare.txt"
CORPUS_CHARS = 20_000


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first 20k characters of the bundled tiny Shakespeare (``$KD_TEST_CORPUS``, when
    set, names another text file)."""
    source = Path(os.environ.get("KD_TEST_CORPUS", CORPUS))
    if not source.exists():
        pytest.fail(f"no test corpus at {source}: set KD_TEST_CORPUS to a text file")
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(source.read_text(encoding="utf-8")[:CORPUS_CHARS], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, corpus) -> Path:
    """A tiny teacher trained on ``corpus`` (:func:`train_tiny_teacher`), once a session."""
    return train_tiny_teacher(corpus, tmp_path_factory.mktemp("teacher-run"))


@pytest.fixture
def spec_for(corpus) -> Callable[..., dict]:
    """``spec_for(losses=None, **kw)``: :func:`tiny_spec` on ``corpus``."""

    def make(losses: list[dict] | None = None, **kw: Any) -> dict:
        return tiny_spec(corpus, losses, **kw)

    return make


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    """An untrained byte-level model directory (:func:`save_random_model`)."""
    return save_random_model(tmp_path_factory.mktemp("random-model") / "model")
