"""The plugin manager and the component registry.

Built-ins are registered through the same hooks as third-party plugins. Each plugin (an
entry point of the group ``kdcore``, a built-in module or an in-process extra) is loaded,
checked and asked for its components on its own, so that a broken one -- an import that
raises or exits, a misspelt hook, a hook that raises or returns something other than
``Component`` records, a component name another plugin already registered -- is a
``LoadFailure`` of that plugin alone: it is unregistered, none of its components are kept,
and ``kd plugins`` and ``kd doctor`` list it with its error.

Environment:
    KD_DISABLE_PLUGINS: comma-separated entry-point or distribution names not to load.
    KD_STRICT_PLUGINS: when "1", a plugin that fails to load is a fatal error (for CI; the
        RegistryError lists every failure), and
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
from collections.abc import Callable, Iterable, Mapping
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
    """A plugin that did not load: it is unregistered and none of its components are kept.

    Attributes:
        entry_point: the entry point's name (a module's or class's name for a plugin
            registered in-process).
        distribution: the distribution that provides it.
        error: one line saying what went wrong.
        traceback: the last frames of the plugin's exception ("" when the plugin broke a
            rule of the registry rather than raising).
        components: kind -> names it offered before it failed, so that a spec naming one
            is told this plugin failed rather than that the name is unknown.
        unknown_kinds: kinds whose names are unknown because it failed before or while
            returning them (every kind when it did not even import).
    """

    entry_point: str
    distribution: str
    error: str
    traceback: str
    components: dict[str, list[str]] = attrs.field(factory=dict)
    unknown_kinds: tuple[str, ...] = KINDS

    def line(self) -> str:
        return f"plugin {self.entry_point!r} from {self.distribution} failed to load: {self.error}"


class _Broken(Exception):
    """A plugin broke a rule of the registry (as opposed to raising from its own code);
    ``plugin_traceback`` is that of the plugin's own exception behind it, if any."""

    def __init__(self, message: str, plugin_traceback: str = ""):
        super().__init__(message)
        self.plugin_traceback = plugin_traceback


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


@attrs.frozen
class RowKernel:
    """A native row kernel (hook ``kd_row_kernels``): its name, factory and distribution."""

    name: str
    factory: Callable[..., Any]
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
        by_kind: dict[str, dict[str, Registered]],
        row_kernels: dict[str, RowKernel] | None = None,
    ):
        self.pm = pm
        self.failures = failures
        self._origins = origins  # id(plugin object) -> (distribution, version)
        self._by_kind = by_kind
        self._row_kernels = dict(row_kernels or {})

    def row_kernels(self) -> dict[str, RowKernel]:
        """Name -> the native row kernel registered for it (``kd_row_kernels``)."""
        return dict(self._row_kernels)

    def _distribution_of(self, plugin: object) -> tuple[str, str]:
        return self._origins.get(id(plugin), (BUILTIN_DIST, _kdcore_version()))

    def distribution_of(self, plugin: object) -> str:
        """The distribution that registered ``plugin`` (``kdcore`` for the built-ins)."""
        return self._distribution_of(plugin)[0]

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
            raise KeyError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        """Why ``name`` is not a ``kind``: a plugin that offered it failed to load (and
        why), or a did-you-mean, plus the failed plugins that might have provided it."""
        words = kind.replace("_", " ")
        for failure in self.failures:
            if name in failure.components.get(kind, ()):
                return f"{words} {name!r} is from {failure.line()}"
        message = unknown_name_message(kind, name, self.names(kind))
        for f in self.failures:
            if kind in f.unknown_kinds:
                message += (
                    f"; plugin {f.entry_point!r} from {f.distribution}, which may provide it, "
                    f"failed to load: {f.error}"
                )
        return message

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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _short_traceback(exc: BaseException) -> str:
    """The last two frames and the exception, without the registry's own frames (the
    plugin's are the ones worth reading)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)[-3:])


class _Loader:
    """Registers plugins one at a time; a plugin that fails any step becomes a
    ``LoadFailure`` and leaves nothing behind (not even the components it returned before
    failing), so the registry is always what the working plugins make."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.origins: dict[int, tuple[str, str]] = {}
        self.failures: list[LoadFailure] = []
        self.by_kind: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        self.row_kernels: dict[str, RowKernel] = {}
        self.hook_names = sorted(n for n, c in vars(pm.hook).items() if c.has_spec())
        self.labels: dict[int, str] = {}  # id(plugin) -> entry point, for messages

    def add(
        self,
        load: Callable[[], object],
        name: str | None,
        label: str | None,
        dist: str,
        version: str,
    ) -> None:
        """Load (``load()``), register under ``name`` and collect one plugin."""
        plugin: object = None
        registered = False
        offered: dict[str, list[str]] = {}
        unknown: tuple[str, ...] = KINDS
        try:
            plugin = load()
            label = label or getattr(plugin, "__name__", None) or type(plugin).__name__
            if self.pm.is_registered(plugin):
                # Two entry points naming one object (say, one module under two
                # distributions): registering it twice would double every component.
                first = self.labels.get(id(plugin), self.pm.get_name(plugin))
                first_dist = self.origins.get(id(plugin), (BUILTIN_DIST, ""))[0]
                raise _Broken(
                    f"{dist}'s entry point {label!r} loads the object already loaded as "
                    f"plugin {first!r} from {first_dist}"
                )
            if name is not None and self.pm.get_plugin(name) is not None:
                # Another distribution has an entry point of the same name: both load
                # (a clash of their components is reported below), neither is skipped.
                name = f"{dist}:{name}"
            self.pm.register(plugin, name=name)
            registered = True
            self.origins[id(plugin)] = (dist, version)
            self.labels[id(plugin)] = label
            self._check_hooks(plugin)
            found, offered, unknown, problems, tb = self._collect(plugin, dist, version)
            if problems:
                raise _Broken("; ".join(problems), tb)
            unknown = ()  # every name it offered is known from here on
            self._check_duplicates(found, dist)
            kernels = self._collect_row_kernels(plugin, dist, version)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: one plugin must not end every kd
            if registered:
                self.pm.unregister(plugin)
                self.origins.pop(id(plugin), None)
                self.labels.pop(id(plugin), None)
            if isinstance(exc, _Broken):
                error, tb = str(exc.args[0]), exc.plugin_traceback
            else:
                error, tb = f"{type(exc).__name__}: {exc}", _short_traceback(exc)
            self.failures.append(
                LoadFailure(label or str(name), dist, _one_line(error), tb, offered, unknown)
            )
            return
        for reg in found:
            self.by_kind[reg.kind][reg.component.name] = reg
        self.row_kernels.update(kernels)

    def _check_hooks(self, plugin: object) -> None:
        """pluggy's ``check_pending`` for one plugin: a ``kd_`` hook implementation with no
        hook specification is a misspelling that would otherwise do nothing."""
        problems = []
        for caller in self.pm.get_hookcallers(plugin) or []:
            if caller.has_spec():
                continue
            if any(i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls()):
                close = difflib.get_close_matches(caller.name, self.hook_names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(f"{caller.name} is not a kdcore hook{hint}")
        if problems:
            raise _Broken("; ".join(problems))

    def _collect(
        self, plugin: object, dist: str, version: str
    ) -> tuple[list[Registered], dict[str, list[str]], tuple[str, ...], list[str], str]:
        """Every component ``plugin`` returns, the names it offered, the kinds whose hook
        failed, what went wrong and the first traceback of its own code. Each hook is
        called even after one fails, so that a spec naming any component it offered is
        told why it is missing."""
        trace = os.environ.get("KD_TRACE_PLUGINS") == "1"
        found: list[Registered] = []
        offered: dict[str, list[str]] = {}
        unknown: list[str] = []
        problems: list[str] = []
        first_tb = ""
        for kind in KINDS:
            hook_name = HOOK_OF_KIND[kind]
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    records = impl.function()
                    if records is None:
                        continue
                    if isinstance(records, (str, bytes, Component)) or not isinstance(
                        records, Iterable
                    ):
                        raise _Broken(
                            f"{hook_name} returned {type(records).__name__}, "
                            "expected a list of kdcore.Component"
                        )
                    for component in records:
                        if not isinstance(component, Component):
                            raise _Broken(
                                f"{hook_name} returned {type(component).__name__}, "
                                "expected kdcore.Component"
                            )
                        if trace:
                            print(
                                f"[kd trace] {dist} {hook_name} -> {component.name}",
                                file=sys.stderr,
                            )
                        offered.setdefault(kind, []).append(component.name)
                        found.append(Registered(component, kind, dist, version))
                except KeyboardInterrupt:
                    raise
                except _Broken as exc:
                    unknown.append(kind)
                    problems.append(str(exc))
                except BaseException as exc:
                    unknown.append(kind)
                    problems.append(f"{hook_name} raised {type(exc).__name__}: {exc}")
                    first_tb = first_tb or _short_traceback(exc)
        return found, offered, tuple(unknown), problems, first_tb

    def _collect_row_kernels(self, plugin: object, dist: str, version: str) -> dict[str, RowKernel]:
        """The ``kd_row_kernels`` mapping of ``plugin``; a hook that raises or returns
        something else, or a name another distribution registered first, breaks the plugin
        (as for components, the first registration is kept)."""
        found: dict[str, RowKernel] = {}
        for impl in self.pm.hook.kd_row_kernels.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            try:
                table = impl.function()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                raise _Broken(
                    f"kd_row_kernels raised {type(exc).__name__}: {exc}", _short_traceback(exc)
                ) from exc
            if table is None:
                continue
            if not isinstance(table, Mapping) or not all(
                isinstance(name, str) and callable(factory) for name, factory in table.items()
            ):
                raise _Broken(
                    f"kd_row_kernels returned {type(table).__name__}, expected a mapping of "
                    "row function names to factories"
                )
            for name, factory in table.items():
                kept = self.row_kernels.get(name) or found.get(name)
                if kept is not None:
                    raise _Broken(
                        f"row kernel {name!r} is registered twice: by {kept.distribution} and "
                        f"by {dist} (the one from {kept.distribution} is kept)"
                    )
                if os.environ.get("KD_TRACE_PLUGINS") == "1":
                    print(f"[kd trace] {dist} kd_row_kernels -> {name}", file=sys.stderr)
                found[name] = RowKernel(name, factory, dist, version)
        return found

    def _check_duplicates(self, found: list[Registered], dist: str) -> None:
        """The first registration of a name is kept (built-ins register first); a later
        one makes its plugin a failure naming both distributions."""
        seen: dict[tuple[str, str], str] = {}
        problems = []
        for reg in found:
            key = (reg.kind, reg.component.name)
            kept = self.by_kind[reg.kind].get(reg.component.name)
            other = kept.distribution if kept is not None else seen.get(key)
            if other is not None:
                words = reg.kind.replace("_", " ")
                problems.append(
                    f"{words} {reg.component.name!r} is registered twice: by {other} "
                    f"and by {dist} (the one from {other} is kept)"
                )
            seen[key] = dist
        if problems:
            raise _Broken("; ".join(problems))


def _load_entry_points(loader: _Loader) -> None:
    blocked = _split_env("KD_DISABLE_PLUGINS")
    seen: set[tuple[str, str]] = set()
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != GROUP:
                continue
            dist_name = str(dist.metadata["name"] or "<unnamed distribution>")
            key = (dist_name, ep.name)
            if key in seen:  # the same distribution on sys.path twice
                continue
            seen.add(key)
            if ep.name in blocked or dist_name in blocked:
                continue
            loader.add(ep.load, ep.name, ep.name, dist_name, dist.version)


def build_registry(
    builtins: Iterable[object] = (), extra_plugins: Iterable[tuple[object, str]] = ()
) -> Registry:
    """A fresh registry: the ``builtins`` plugin modules, installed entry points, then
    ``(plugin, distribution)`` extras; a plugin that fails to load is in ``failures``
    (under ``KD_STRICT_PLUGINS=1``, a RegistryError listing every failure)."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    loader = _Loader(pm)
    for module in builtins:
        loader.add(lambda m=module: m, module.__name__, None, BUILTIN_DIST, _kdcore_version())
    _load_entry_points(loader)
    for plugin, dist in extra_plugins:
        loader.add(lambda p=plugin: p, None, None, dist, "0+local")
    if loader.failures and os.environ.get("KD_STRICT_PLUGINS") == "1":
        raise RegistryError("\n".join(f.line() for f in loader.failures))
    return Registry(pm, loader.failures, loader.origins, loader.by_kind, loader.row_kernels)


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
