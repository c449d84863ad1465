"""Composition checks: what a spec asks for that its parts cannot give, found without
loading anything (a loss that needs a teacher and none is given, dense logits from a top-k
cache, and the like)."""

from __future__ import annotations

from kdcore.registry.manager import get_registry
from kdcore.spec.schema import RunSpec


def check_composition(spec: RunSpec) -> list[str]:
    """Problems visible without loading anything: a loss that needs a teacher and none is
    given, a loss that needs dense logits fed from a top-k cache, and the like."""
    registry = get_registry()
    problems = []
    sources = [ref.source_name for ref in spec.teachers]
    # A top-k cache holds log-probabilities only, for the dataset's own token rows.
    not_from_cache = {"hidden_states", "attentions", "student_samples"}
    if "cache" in sources:
        try:
            aggregator = registry.get("teacher_aggregator", spec.aggregator.name)
            if aggregator.requires & not_from_cache:
                problems.append(
                    f"aggregator {spec.aggregator.name!r} needs "
                    f"{', '.join(sorted(aggregator.requires & not_from_cache))}, which a top-k "
                    "cache does not hold @ $.aggregator.name"
                )
        except KeyError:
            pass
    for i, ref in enumerate(spec.losses):
        try:
            component = registry.get("loss", ref.name)
        except KeyError:
            continue
        if ({"teacher", "dense_teacher"} & component.requires) and not spec.teachers:
            problems.append(f"loss {ref.name!r} needs a teacher and the spec has none @ $.teachers")
        if "cache" in sources and component.requires & not_from_cache:
            problems.append(
                f"loss {ref.name!r} needs {', '.join(sorted(component.requires & not_from_cache))}"
                f", which a top-k cache does not hold @ $.losses[{i}].name"
            )
            continue
        needs_dense = "dense_teacher" in component.requires
        sparse_ok = "sparse_ok" in component.properties
        if (
            "cache" in sources
            and (needs_dense or not sparse_ok)
            and ({"teacher", "dense_teacher"} & component.requires)
        ):
            problems.append(
                f"loss {ref.name!r} cannot work from a top-k cache (it needs full teacher "
                f"logits); use a live teacher or a sparse-aware loss @ $.losses[{i}].name"
            )
    return problems
