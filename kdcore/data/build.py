"""A spec's dataset, built exactly as ``kd distill`` builds it."""

from __future__ import annotations

from pathlib import Path

import attrs

from kdcore.registry.manager import get_registry
from kdcore.registry.setup import Setup
from kdcore.spec.schema import RunSpec


def build_dataset(spec: RunSpec, setup: Setup | None = None):
    """The spec's dataset, built exactly as ``kd distill`` builds it."""
    base = setup or Setup(base_dir=Path(spec.base_dir), seed=spec.run.seed, spec=spec)
    component = get_registry().get("dataset", spec.data.name)
    return component.factory(spec.data.config, attrs.evolve(base, tokenizer=None))
