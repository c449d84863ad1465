"""The component registry that the plugin manager builds, and its records.

A :class:`Registry` holds every component of every kind with the distribution that
contributed it, the plugins that failed to load (:class:`LoadFailure`, listed by ``kd
plugins`` and ``kd doctor``), the native row kernels, and the pluggy manager the working
plugins stay registered with, for the hooks that are called later (``kd_add_commands``,
``kd_report_sections``): :meth:`Registry.each` calls those one plugin at a time.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pluggy

from kdcore.registry.components import KINDS, Component

BUILTIN_DIST = "kdcore"

# The hook that contributes each kind of component.
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
        """The failure as one sentence, for messages and ``KD_STRICT_PLUGINS``."""
        return f"plugin {self.entry_point!r} from {self.distribution} failed to load: {self.error}"


@attrs.frozen
class SectionFailure:
    """A ``kd_report_sections`` implementation that raised or returned something else."""

    plugin: str
    distribution: str
    error: str
    traceback: str

    def markdown(self) -> list[str]:
        """The lines that stand in the report for the section that failed."""
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


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_name_message(kind: str, name: str, installed: Iterable[str]) -> str:
    """``unknown loss 'x'; did you mean 'y'? (installed: ...)``."""
    installed = sorted(installed)
    listing = ", ".join(installed) if installed else "none installed"
    return (
        f"unknown {kind.replace('_', ' ')} {name!r}{did_you_mean(name, installed)} "
        f"(installed: {listing})"
    )


def kdcore_version() -> str:
    """The installed kdcore's version (``0+unknown`` when run from a bare checkout)."""
    try:
        return importlib.metadata.version("kdcore")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# Frames of these files come before a plugin's own in its tracebacks and say nothing about it.
_OWN_FRAMES = (__file__, os.path.join(os.path.dirname(__file__), "manager.py"))
_PLUGGY_DIR = os.path.dirname(pluggy.__file__) + os.sep


def short_traceback(exc: BaseException) -> str:
    """The last two frames and the exception, without the registry's or pluggy's frames
    (the plugin's are the ones worth reading)."""
    tb = exc.__traceback__
    while tb is not None and (
        tb.tb_frame.f_code.co_filename in _OWN_FRAMES
        or tb.tb_frame.f_code.co_filename.startswith(_PLUGGY_DIR)
    ):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)[-3:])


def only(pm: pluggy.PluginManager, hook: str, plugin: object) -> pluggy.HookCaller:
    """Hook ``hook`` as pluggy calls it, with every plugin but ``plugin`` left out: one
    plugin's call, so that its exception is its own and cannot stop the others'."""
    others = [p for p in pm.get_plugins() if p is not plugin]
    return pm.subset_hook_caller(hook, remove_plugins=others)


class Registry:
    """Every component of every kind, and where each came from.

    ``plugins`` are the loaded plugin objects in registration order (pluggy's
    ``get_plugins()`` is a set); ``origins`` maps ``id(plugin)`` to its (distribution,
    version).
    """

    def __init__(
        self,
        pm: pluggy.PluginManager,
        plugins: list[object],
        origins: dict[int, tuple[str, str]],
        failures: list[LoadFailure],
        by_kind: dict[str, dict[str, Registered]],
        row_kernels: dict[str, RowKernel] | None = None,
    ):
        self.pm = pm
        self.plugins = plugins
        self.failures = failures
        self._origins = origins
        self._by_kind = by_kind
        self._row_kernels = dict(row_kernels or {})

    def row_kernels(self) -> dict[str, RowKernel]:
        """Name -> the native row kernel registered for it (``kd_row_kernels``)."""
        return dict(self._row_kernels)

    def distribution_of(self, plugin: object) -> str:
        """The distribution that registered ``plugin`` (``kdcore`` for the built-ins)."""
        return self._origins.get(id(plugin), (BUILTIN_DIST, ""))[0]

    def plugin_name(self, plugin: object) -> str:
        """``plugin``'s name for messages: its entry point's or module's, else (for an
        in-process extra, which pluggy names by its id) its distribution."""
        name = self.pm.get_name(plugin) or ""
        return name if name and not name.isdigit() else self.distribution_of(plugin)

    def each(self, hook: str, **kwargs: Any) -> Iterator[tuple[object, list[Any] | Exception]]:
        """Call ``hook`` through pluggy one plugin at a time, in pluggy's call order (the
        last registered first), so that one that raises does not stop the others: yields
        (plugin, its non-None results) or (plugin, the Exception it raised)."""
        for plugin in reversed(self.plugins):
            caller = only(self.pm, hook, plugin)
            if not caller.get_hookimpls():
                continue
            try:
                results = caller(**kwargs)
            except Exception as exc:  # the caller decides what a failure costs
                yield plugin, exc
            else:
                yield plugin, results

    def report_sections(
        self, run_dir: Path, figures_dir: Path
    ) -> tuple[list[str], list[SectionFailure]]:
        """The Markdown lines of every ``kd_report_sections`` implementation, in pluggy's
        call order, and the implementations that raised or returned something other than
        lines (their lines say so; the others run)."""
        lines: list[str] = []
        failures: list[SectionFailure] = []
        calls = self.each(
            "kd_report_sections", run_dir=Path(run_dir), figures_dir=Path(figures_dir)
        )
        for plugin, outcome in calls:
            name, dist = self.plugin_name(plugin), self.distribution_of(plugin)
            if isinstance(outcome, Exception):
                error, tb = f"{type(outcome).__name__}: {outcome}", short_traceback(outcome)
            else:
                bad = [section for section in outcome if not _lines(section)]
                if not bad:
                    lines += [line for section in outcome if section for line in (*section, "")]
                    continue
                error = (
                    f"RegistryError: kd_report_sections returned {type(bad[0]).__name__}, "
                    "expected a list of Markdown lines or None"
                )
                tb = ""
            failure = SectionFailure(name, dist, error, tb)
            failures.append(failure)
            lines += failure.markdown()
        return lines, failures

    def names(self, kind: str) -> list[str]:
        """The names of every ``kind`` component, sorted."""
        return sorted(self._by_kind[kind])

    def entries(self, kind: str) -> list[Registered]:
        """Every ``kind`` component with its distribution, sorted by name."""
        return [self._by_kind[kind][name] for name in self.names(kind)]

    def get(self, kind: str, name: str) -> Component:
        """The ``kind`` component called ``name`` (KeyError: :meth:`unknown_message`)."""
        return self.lookup(kind, name).component

    def lookup(self, kind: str, name: str) -> Registered:
        """The ``kind`` component called ``name`` with its distribution."""
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


def traced(origins: dict[int, tuple[str, str]]) -> Callable[..., None]:
    """pluggy's hook-call monitoring for ``KD_TRACE_PLUGINS=1``: after each call, one line
    per implementation's result, naming the distribution."""

    def after(outcome: Any, hook_name: str, hook_impls: list, _kwargs: Any) -> None:
        if not hook_impls:
            return
        dists = sorted({origins.get(id(i.plugin), (BUILTIN_DIST, ""))[0] for i in hook_impls})
        if outcome.exception is not None:
            said = [f"raised {type(outcome.exception).__name__}"]
        else:
            said = [_summary(result) for result in outcome.get_result()] or ["None"]
        for what in said:
            print(f"[kd trace] {', '.join(dists)} {hook_name} -> {what}", file=sys.stderr)

    return after


def _summary(result: Any) -> str:
    """What one implementation returned, without consuming it (a generator stays unread)."""
    if isinstance(result, Mapping):
        return ", ".join(map(str, result))
    if isinstance(result, (list, tuple)) and all(isinstance(r, str) for r in result):
        return f"{len(result)} lines"
    if isinstance(result, (list, tuple)):
        return ", ".join(str(getattr(r, "name", r)) for r in result)
    return type(result).__name__


def _lines(section: object) -> bool:
    """Whether a report section is a list (or tuple) of Markdown lines."""
    return isinstance(section, (list, tuple)) and all(isinstance(s, str) for s in section)
