"""``kdcore.app.build`` and ``kdcore.app.make_config``: a component or its config by name, with
params validated exactly as a spec's."""

from __future__ import annotations

from typing import Any

from kdcore.registry.manager import get_registry
from kdcore.registry.setup import Setup
from kdcore.spec.convert import structure_config


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
