"""Docs that are generated must match what they are generated from."""

from pathlib import Path

from kdcore.cli import docgen

ROOT = Path(__file__).resolve().parents[1]


def test_spec_reference_component_tables_are_current():
    page = (ROOT / "docs" / "spec.md").read_text()
    assert docgen.render(page) == page, "run: python -m kdcore.cli.docgen docs/spec.md"


def test_every_hookspec_has_a_documented_example():
    from kdcore.registry import hookspecs

    for name in dir(hookspecs):
        if name.startswith("kd_"):
            doc = getattr(hookspecs, name).__doc__ or ""
            assert "Example::" in doc, f"{name} has no example in its docstring"
