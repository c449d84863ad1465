"""The house: no import cycle in kdcore, a short flat top level, and plugins written
against the public API alone (``kdcore``'s ``__all__`` and ``kdcore.testing``)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import kdcore
import kdcore.app

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kdcore"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in ``path``, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    """kdcore module -> the kdcore modules it imports (``from pkg import submodule`` counts
    as importing the submodule)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names, _line in _imports(path):
            if not module.startswith("kdcore"):
                continue
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            if not targets and module in modules:
                targets = [module]
            graph[name].update(t for t in targets if t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_kdcore():
    graph = import_graph()
    assert len(graph) > 50  # the scan really saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_at_most_twelve_modules_sit_flat_in_kdcore():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(flat) <= 12, flat


def _private_uses(path: Path) -> list[str]:
    """Each import or attribute use of kdcore in ``path`` that is not public API."""
    public = set(kdcore.__all__) | {"testing", "app"}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    problems = []
    for module, names, line in _imports(path):
        if module == "kdcore":
            problems += [f"{path}:{line}: from kdcore import {n}" for n in names if n not in public]
        elif module == "kdcore.app":
            problems += [
                f"{path}:{line}: from kdcore.app import {n}"
                for n in names
                if n not in kdcore.app.__all__
            ]
        elif module.startswith("kdcore.") and module != "kdcore.testing":
            problems.append(f"{path}:{line}: {module}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "kdcore"
            and node.attr not in public
            and not node.attr.startswith("__")
        ):
            problems.append(f"{path}:{node.lineno}: kdcore.{node.attr}")
    return problems


def test_the_scan_sees_a_private_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import kdcore\nfrom kdcore.engine.step import gradients\n"
        "from kdcore import Component, docgen\nkdcore.spec\nkdcore.LossInputs\n"
    )
    found = _private_uses(sample)
    assert len(found) == 3, found


def test_plugins_and_the_third_party_example_use_only_the_public_api():
    files = sorted((ROOT / "plugins").glob("*/**/*.py"))
    files += sorted((ROOT / "examples" / "third_party_plugin").rglob("*.py"))
    files = [f for f in files if "build" not in f.parts and ".egg-info" not in str(f)]
    assert len(files) > 40
    problems = [p for f in files for p in _private_uses(f)]
    assert not problems, "private kdcore names used:\n" + "\n".join(problems)


def test_every_public_name_exists():
    missing = [name for name in kdcore.__all__ if not hasattr(kdcore, name)]
    missing += [name for name in kdcore.app.__all__ if not hasattr(kdcore.app, name)]
    assert not missing


def test_the_plugin_api_is_short_and_documented_where_defined():
    """At most 40 names; every class, function and module among them has its own
    docstring (what a plugin author reads with help())."""
    assert len(kdcore.__all__) <= 40, len(kdcore.__all__)
    undocumented = []
    for name in kdcore.__all__:
        obj = getattr(kdcore, name)
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
            if not (obj.__doc__ or "").strip():
                undocumented.append(name)
    assert not undocumented, undocumented
    # the application API is its own module, and not part of the plugin API
    assert not set(kdcore.__all__) & {"distill", "evaluate", "open_run", "load_spec"}
    assert {"distill", "evaluate", "open_run", "load_spec"} <= set(kdcore.app.__all__)


def test_no_module_is_too_big_for_one_concept():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
        for p in PACKAGE.rglob("*.py")
    }
    assert {p: n for p, n in sizes.items() if n > 600} == {}
    assert sizes["kdcore/registry/manager.py"] <= 300


def test_one_on_policy_sampler():
    """``train.on_policy`` and minillm draw from the same function."""
    defined = [
        p
        for p in [*PACKAGE.rglob("*.py"), *(ROOT / "plugins").glob("*/kd_*/*.py")]
        if re.search(r"^def sample_continuations\(", p.read_text(encoding="utf-8"), re.M)
    ]
    assert [str(p.relative_to(ROOT)) for p in defined] == ["kdcore/engine/onpolicy.py"]


def test_no_plugin_keeps_a_full_logit_twin_of_a_row_loss():
    """A loss written as rows is not written again on full logits in the same module."""
    twins = []
    for path in (ROOT / "plugins").glob("*/kd_*/*.py"):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "RowLoss":
                if len(node.args) + len(node.keywords) != 1:
                    twins.append(f"{path}:{node.lineno}: RowLoss with a second form")
        if "teacher_rows(" in text and "token_divergence(" in text:
            twins.append(f"{path}: a divergence both as rows and on full logits")
    assert not twins, twins


def test_the_layers_contract_holds():
    """pyproject.toml's import-linter contract: each stage imports only the ones below."""
    import subprocess
    import sys

    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 kept, 0 broken" in proc.stdout
