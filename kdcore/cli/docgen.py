"""Regenerate the component tables of docs/spec.md from the registry.

    python -m kdcore.cli.docgen docs/spec.md          # rewrite the tables in place
    python -m kdcore.cli.docgen docs/spec.md --check  # exit 1 if they are stale

The tables sit between ``<!-- components:start -->`` and ``<!-- components:end -->``;
the rest of the page is written by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kdcore.cli.commands import describe
from kdcore.registry.components import KINDS
from kdcore.registry.manager import get_registry

START, END = "<!-- components:start -->", "<!-- components:end -->"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def component_tables() -> str:
    registry = get_registry()
    parts = []
    for kind in KINDS:
        entries = registry.entries(kind)
        if not entries:
            continue
        title = kind.replace("_", " ")
        parts.append(f"### {title}es\n" if title.endswith("s") else f"### {title}s\n")
        parts.append("| name | from | parameters (default) | requires | what it does |")
        parts.append("| --- | --- | --- | --- | --- |")
        for reg in entries:
            d = describe(reg)
            params = ", ".join(f"`{p['name']}`={p['default']!r}" for p in d["parameters"]) or "-"
            parts.append(
                f"| `{d['name']}` | {d['distribution']} | {_cell(params)} | "
                f"{', '.join(d['requires']) or '-'} | {_cell(d['doc'])} |"
            )
        parts.append("")
    return "\n".join(parts)


def render(page: str) -> str:
    head, _, rest = page.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{component_tables()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0])
    page = path.read_text()
    if START not in page or END not in page:
        print(f"{path}: markers {START} / {END} not found", file=sys.stderr)
        return 2
    new = render(page)
    if "--check" in argv:
        if new != page:
            print(f"{path}: component tables are stale; run python -m kdcore.cli.docgen {path}")
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
