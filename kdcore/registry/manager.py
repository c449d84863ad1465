"""The plugin manager: pluggy's, each plugin loaded and asked on its own.

Each plugin (a built-in module, an entry point of the group ``kdcore``, an in-process
extra) is registered, checked with ``check_pending`` and asked for its components through
``pm.subset_hook_caller`` (its implementations alone), so that a broken one -- an import
that raises or exits, a misspelt hook, a hook that raises or returns something other than
``Component`` records, a name another plugin registered first -- is a ``LoadFailure`` of
that plugin alone: unregistered, none of its components kept, listed by ``kd plugins``
and ``kd doctor``. The records and the ``Registry`` are in ``kdcore.registry.registry``.

Environment:
    KD_DISABLE_PLUGINS: comma-separated entry-point or distribution names not to load.
    KD_STRICT_PLUGINS: when "1", a plugin that fails to load is a fatal error (for CI; the
        RegistryError lists every failure), and so is a ``kd_report_sections``
        implementation that raises (after the report, with the error in it, is written).
    KD_TRACE_PLUGINS: when "1", print each hook call and the components it returned.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Iterable, Mapping

import pluggy

from kdcore.errors import RegistryError
from kdcore.registry import hookspecs
from kdcore.registry.components import KINDS, Component
from kdcore.registry.registry import (
    BUILTIN_DIST,
    HOOK_OF_KIND,
    LoadFailure,
    Registered,
    Registry,
    RowKernel,
    did_you_mean,
    kdcore_version,
    only,
    short_traceback,
    traced,
)
from kdcore.registry.registry import unknown_name_message as unknown_name_message  # re-export

GROUP = "kdcore"
hookimpl = pluggy.HookimplMarker(GROUP)


class _Broken(Exception):
    """A plugin broke a rule of the registry (as opposed to raising from its own code);
    ``plugin_traceback`` is that of the plugin's own exception behind it, if any."""

    def __init__(self, message: str, plugin_traceback: str = ""):
        super().__init__(message)
        self.plugin_traceback = plugin_traceback


class _Loader:
    """Registers plugins one at a time; a plugin that fails any step becomes a
    ``LoadFailure`` and leaves nothing behind (not even the components it returned before
    failing), so the registry is always what the working plugins make."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.plugins: list[object] = []  # registration order: pluggy keeps a set
        self.origins: dict[int, tuple[str, str]] = {}  # id(plugin) -> (distribution, version)
        self.failures: list[LoadFailure] = []
        self.by_kind: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        self.row_kernels: dict[str, RowKernel] = {}
        self.hook_names = sorted(n for n, c in vars(pm.hook).items() if c.has_spec())
        self.labels: dict[int, str] = {}  # id(plugin) -> entry point, for messages

    def add(self, load: Callable[[], object], name: str | None, dist: str, version: str) -> None:
        """Load (``load()``), register under ``name`` and collect one plugin."""
        plugin: object = None
        label = name  # the entry point's or module's name; an extra's is its class's
        registered = False
        offered: dict[str, list[str]] = {}
        unknown: tuple[str, ...] = KINDS
        try:
            plugin = load()
            label = name or getattr(plugin, "__name__", None) or type(plugin).__name__
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
            self.origins[id(plugin)] = (dist, version)  # before any call: the trace reads it
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
                error, tb = f"{type(exc).__name__}: {exc}", short_traceback(exc)
            error = " ".join(error.split())  # one line
            self.failures.append(LoadFailure(str(label), dist, error, tb, offered, unknown))
            return
        self.plugins.append(plugin)
        for reg in found:
            self.by_kind[reg.kind][reg.component.name] = reg
        self.row_kernels.update(kernels)

    def _check_hooks(self, plugin: object) -> None:
        """pluggy's ``check_pending``: a ``kd_`` hook implementation with no specification
        is a misspelling that would otherwise do nothing. Every plugin registered before
        passed it, so what it finds is this plugin's; the message says what was meant."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            unknown = [
                caller.name
                for caller in self.pm.get_hookcallers(plugin) or []
                if not caller.has_spec()
                and any(i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls())
            ]
            hints = [f"{n} is not a kdcore hook{did_you_mean(n, self.hook_names)}" for n in unknown]
            raise _Broken("; ".join(hints) or str(exc)) from None

    def _collect(
        self, plugin: object, dist: str, version: str
    ) -> tuple[list[Registered], dict[str, list[str]], tuple[str, ...], list[str], str]:
        """Every component ``plugin`` returns, the names it offered, the kinds whose hook
        failed, what went wrong and the first traceback of its own code. Each hook is
        called even after one fails, so that a spec naming any component it offered is
        told why it is missing."""
        found: list[Registered] = []
        offered: dict[str, list[str]] = {}
        unknown: list[str] = []
        problems: list[str] = []
        first_tb = ""
        for kind in KINDS:
            hook = HOOK_OF_KIND[kind]
            try:
                for records in only(self.pm, hook, plugin)():  # pluggy leaves out None
                    if isinstance(records, (str, bytes, Component)) or not isinstance(
                        records, Iterable
                    ):
                        raise _Broken(
                            f"{hook} returned {type(records).__name__}, "
                            "expected a list of kdcore.Component"
                        )
                    for component in records:
                        if not isinstance(component, Component):
                            raise _Broken(
                                f"{hook} returned {type(component).__name__}, "
                                "expected kdcore.Component"
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
                problems.append(f"{hook} raised {type(exc).__name__}: {exc}")
                first_tb = first_tb or short_traceback(exc)
        return found, offered, tuple(unknown), problems, first_tb

    def _collect_row_kernels(self, plugin: object, dist: str, version: str) -> dict[str, RowKernel]:
        """The ``kd_row_kernels`` mapping of ``plugin``; a hook that raises or returns
        something else, or a name another distribution registered first, breaks the plugin
        (as for components, the first registration is kept)."""
        try:
            tables = only(self.pm, "kd_row_kernels", plugin)()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            raise _Broken(
                f"kd_row_kernels raised {type(exc).__name__}: {exc}", short_traceback(exc)
            ) from exc
        found: dict[str, RowKernel] = {}
        for table in tables:
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
                problems.append(
                    f"{reg.kind.replace('_', ' ')} {reg.component.name!r} is registered twice: "
                    f"by {other} and by {dist} (the one from {other} is kept)"
                )
            seen[key] = dist
        if problems:
            raise _Broken("; ".join(problems))


def _load_entry_points(loader: _Loader) -> None:
    blocked = {p.strip() for p in os.environ.get("KD_DISABLE_PLUGINS", "").split(",")} - {""}
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
            loader.add(ep.load, ep.name, dist_name, dist.version)


def build_registry(
    builtins: Iterable[object] = (), extra_plugins: Iterable[tuple[object, str]] = ()
) -> Registry:
    """A fresh registry: the ``builtins`` plugin modules, installed entry points, then
    ``(plugin, distribution)`` extras; a plugin that fails to load is in ``failures``
    (under ``KD_STRICT_PLUGINS=1``, a RegistryError listing every failure)."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    loader = _Loader(pm)
    if os.environ.get("KD_TRACE_PLUGINS") == "1":
        pm.add_hookcall_monitoring(lambda *_: None, traced(loader.origins))
    for module in builtins:
        loader.add(lambda m=module: m, module.__name__, BUILTIN_DIST, kdcore_version())
    _load_entry_points(loader)
    for plugin, dist in extra_plugins:
        loader.add(lambda p=plugin: p, None, dist, "0+local")
    if loader.failures and os.environ.get("KD_STRICT_PLUGINS") == "1":
        raise RegistryError("\n".join(f.line() for f in loader.failures))
    return Registry(
        pm, loader.plugins, loader.origins, loader.failures, loader.by_kind, loader.row_kernels
    )


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
