"""The plugin manager and the component registry.

Built-ins are registered through the same hooks as third-party plugins. Entry points of
the group ``kdcore`` are loaded one by one so that a broken plugin is reported (``kd
plugins`` lists it with its traceback summary) without taking the others down.

Environment:
    KD_DISABLE_PLUGINS: comma-separated entry-point or distribution names not to load.
    KD_STRICT_PLUGINS: when "1", a plugin that fails to load is a fatal error (for CI), and
        so is a ``kd_report_sections`` implementation that raises (after the report, with
        the error in it, is written).
    KD_TRACE_PLUGINS: when "1", print each hook call and the components it returned.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import pluggy

from kdcore.errors import RegistryError
from kdcore.registry import hookspecs
from kdcore.registry.components import KINDS, Component

GROUP = "kdcore"
hookimpl = pluggy.HookimplMarker(GROUP)

HOOK_OF_KIND = {
    "loss": "kd_losses",
    "teacher_aggregator": "kd_teacher_aggregators",
    "student_initializer": "kd_student_initializers",
    "vocab_aligner": "kd_vocab_aligners",
    "scheduler": "kd_schedulers",
    "model": "kd_models",
    "dataset": "kd_datasets",
    "teacher_source": "kd_teacher_sources",
    "metric": "kd_metrics",
    "run_callback": "kd_run_callbacks",
}
assert set(HOOK_OF_KIND) == set(KINDS)

BUILTIN_DIST = "kdcore"


@attrs.frozen
class LoadFailure:
    entry_point: str
    distribution: str
    error: str
    traceback: str


@attrs.frozen
class SectionFailure:
    """A ``kd_report_sections`` implementation that raised."""

    plugin: str
    distribution: str
    error: str
    traceback: str

    def markdown(self) -> list[str]:
        return [
            f"> **report section failed**: {self.plugin} ({self.distribution}): {self.error}",
            "",
            "```",
            *self.traceback.rstrip().splitlines(),
            "```",
            "",
        ]


@attrs.frozen
class Registered:
    """A component together with the distribution that contributed it."""

    component: Component
    kind: str
    distribution: str
    version: str


def _split_env(name: str) -> set[str]:
    return {part.strip() for part in os.environ.get(name, "").split(",") if part.strip()}


class Registry:
    """Every component of every kind, and where each came from."""

    def __init__(
        self,
        pm: pluggy.PluginManager,
        failures: list[LoadFailure],
        origins: dict[int, tuple[str, str]],
    ):
        self.pm = pm
        self.failures = failures
        self._origins = origins  # id(plugin object) -> (distribution, version)
        self._by_kind: dict[str, dict[str, Registered]] = {}
        for kind in KINDS:
            self._by_kind[kind] = self._collect(kind)

    def _distribution_of(self, plugin: object) -> tuple[str, str]:
        return self._origins.get(id(plugin), (BUILTIN_DIST, _kdcore_version()))

    def _collect(self, kind: str) -> dict[str, Registered]:
        hook_name = HOOK_OF_KIND[kind]
        trace = os.environ.get("KD_TRACE_PLUGINS") == "1"
        found: dict[str, Registered] = {}
        # Call implementations one by one so each record is tied to its distribution.
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            dist, version = self._distribution_of(impl.plugin)
            records = impl.function() or []
            for component in records:
                if not isinstance(component, Component):
                    raise RegistryError(
                        f"{dist}: {hook_name} returned {type(component).__name__}, "
                        "expected kdcore.Component"
                    )
                if trace:
                    print(f"[kd trace] {dist} {hook_name} -> {component.name}", file=sys.stderr)
                if component.name in found:
                    other = found[component.name].distribution
                    raise RegistryError(
                        f"{kind} {component.name!r} is registered twice: by {other} and by {dist}"
                    )
                found[component.name] = Registered(component, kind, dist, version)
        return found

    def report_sections(
        self, run_dir: Path, figures_dir: Path
    ) -> tuple[list[str], list[SectionFailure]]:
        """The Markdown lines of every ``kd_report_sections`` implementation, in registration
        order, and the implementations that raised (their lines say so; the others run)."""
        trace = os.environ.get("KD_TRACE_PLUGINS") == "1"
        arguments = {"run_dir": Path(run_dir), "figures_dir": Path(figures_dir)}
        lines: list[str] = []
        failures: list[SectionFailure] = []
        for impl in reversed(self.pm.hook.kd_report_sections.get_hookimpls()):
            dist, _version = self._distribution_of(impl.plugin)
            name = impl.plugin_name if not impl.plugin_name.isdigit() else dist
            try:
                section = impl.function(**{k: arguments[k] for k in impl.argnames})
                if section is not None and (
                    isinstance(section, str)
                    or not isinstance(section, (list, tuple))
                    or not all(isinstance(line, str) for line in section)
                ):
                    raise RegistryError(
                        f"kd_report_sections returned {type(section).__name__}, "
                        "expected a list of Markdown lines or None"
                    )
            except Exception as exc:  # a broken section must not lose the report
                tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
                failure = SectionFailure(
                    name, dist, f"{type(exc).__name__}: {exc}", "".join(tb[-3:])
                )
                failures.append(failure)
                lines += failure.markdown()
                continue
            if trace:
                print(
                    f"[kd trace] {dist} kd_report_sections -> "
                    f"{'None' if section is None else f'{len(section)} lines'}",
                    file=sys.stderr,
                )
            if section:
                lines += [*section, ""]
        return lines, failures

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def entries(self, kind: str) -> list[Registered]:
        return [self._by_kind[kind][name] for name in self.names(kind)]

    def get(self, kind: str, name: str) -> Component:
        return self.lookup(kind, name).component

    def lookup(self, kind: str, name: str) -> Registered:
        if kind not in self._by_kind:
            raise KeyError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")
        try:
            return self._by_kind[kind][name]
        except KeyError:
            raise KeyError(unknown_name_message(kind, name, self.names(kind))) from None

    def find(self, name: str) -> list[Registered]:
        """All components called ``name``, of any kind."""
        return [by[name] for by in self._by_kind.values() if name in by]

    def distributions(self) -> dict[str, dict[str, Any]]:
        """Distribution -> version and component names per kind (for ``kd plugins``)."""
        out: dict[str, dict[str, Any]] = {}
        for kind in KINDS:
            for reg in self._by_kind[kind].values():
                entry = out.setdefault(reg.distribution, {"version": reg.version, "components": {}})
                entry["components"].setdefault(kind, []).append(reg.component.name)
        for dist, version in self._origins.values():
            out.setdefault(dist, {"version": version, "components": {}})
        for entry in out.values():
            for names in entry["components"].values():
                names.sort()
        return dict(sorted(out.items(), key=lambda kv: (kv[0] != BUILTIN_DIST, kv[0])))


def unknown_name_message(kind: str, name: str, installed: Iterable[str]) -> str:
    installed = sorted(installed)
    close = difflib.get_close_matches(name, installed, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(installed) if installed else "none installed"
    return f"unknown {kind.replace('_', ' ')} {name!r}{hint} (installed: {listing})"


def _kdcore_version() -> str:
    try:
        return importlib.metadata.version("kdcore")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _load_entry_points(
    pm: pluggy.PluginManager, origins: dict[int, tuple[str, str]]
) -> list[LoadFailure]:
    blocked = _split_env("KD_DISABLE_PLUGINS")
    strict = os.environ.get("KD_STRICT_PLUGINS") == "1"
    failures: list[LoadFailure] = []
    seen: set[tuple[str, str]] = set()
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != GROUP:
                continue
            dist_name = dist.metadata["name"]
            key = (dist_name, ep.name)
            if key in seen:  # the same distribution on sys.path twice
                continue
            seen.add(key)
            if ep.name in blocked or dist_name in blocked:
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
                origins[id(plugin)] = (dist_name, dist.version)
            except Exception as exc:  # a broken plugin must not take the others down
                if strict:
                    raise RegistryError(
                        f"plugin {ep.name!r} from {dist_name} failed to load: {exc!r}"
                    ) from exc
                tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
                failures.append(
                    LoadFailure(
                        ep.name, dist_name, f"{type(exc).__name__}: {exc}", "".join(tb[-3:])
                    )
                )
    return failures


def build_registry(
    builtins: Iterable[object] = (), extra_plugins: Iterable[tuple[object, str]] = ()
) -> Registry:
    """A fresh registry: the ``builtins`` plugin modules, installed entry points, then
    ``(plugin, distribution)`` extras."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    for module in builtins:
        pm.register(module, name=module.__name__)
    origins: dict[int, tuple[str, str]] = {}
    failures = _load_entry_points(pm, origins)
    for plugin, dist in extra_plugins:
        pm.register(plugin)
        origins[id(plugin)] = (dist, "0+local")
    pm.check_pending()  # a misspelt kd_ hook is an error, not a silent no-op
    return Registry(pm, failures, origins)


_builtins: list[object] = []
_registry: Registry | None = None


def use_builtins(modules: Iterable[object]) -> None:
    """Hand the plugin manager the core's own plugin modules (``kdcore`` does this on
    import); the next registry built registers them before any entry point."""
    global _registry
    _builtins[:] = list(modules)
    _registry = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    if _registry is None:
        _registry = build_registry(_builtins)
    return _registry


def reset_registry(extra_plugins: Iterable[tuple[object, str]] = ()) -> Registry:
    """Rebuild the process-wide registry, e.g. with in-process ``(plugin, dist)`` extras."""
    global _registry
    _registry = build_registry(_builtins, extra_plugins)
    return _registry
