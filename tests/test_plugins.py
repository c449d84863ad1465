"""The plugin manager: entry points, duplicates, load failures, blocking, misspelt hooks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest

import kdcore
from kdcore import app, testing
from kdcore.registry.manager import build_registry
from kdcore.spec.load import load_spec

ROOT = Path(__file__).resolve().parents[1]


def _fake_distribution(
    root: Path, dist: str, module: str, source: str, entry_point: str | None = None
) -> None:
    """A real installed distribution as importlib.metadata sees it: a module and a
    dist-info with an entry point (named ``entry_point``, default the module's name) in the
    kdcore group."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[kdcore]\n{entry_point or module} = {module}\n")


def _run_kd(args: list[str], path: Path, env_extra: dict | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KD_")}
    env.update(PYTHONPATH=str(path), **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "kdcore.cli", *args], capture_output=True, text=True, env=env
    )


GOOD = """
import attrs
import kdcore

@attrs.define
class Config:
    scale: float = 1.0

def factory(config, setup):
    def loss(inputs):
        return kdcore.masked_mean(inputs.student.logits.mean(-1) * 0, inputs.batch["mask"]), {}
    return loss

@kdcore.hookimpl
def kd_losses():
    return [kdcore.Component("{name}", factory, Config, doc="test loss")]
"""


def test_entry_point_plugin_is_listed_with_its_distribution(tmp_path):
    _fake_distribution(tmp_path, "kd-fake", "kd_fake", GOOD.replace("{name}", "fake"))
    proc = _run_kd(["plugins", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["distributions"]["kd-fake"]["components"]["loss"] == ["fake"]
    assert data["distributions"]["kd-fake"]["version"] == "1.0"


def test_same_name_twice_names_both_distributions(tmp_path):
    """A component name registered twice keeps the first and makes the other plugin a load
    failure naming both distributions; the rest of kd works. Strict mode: fatal."""
    _fake_distribution(tmp_path, "kd-one", "kd_one", GOOD.replace("{name}", "twin"))
    _fake_distribution(tmp_path, "kd-two", "kd_two", GOOD.replace("{name}", "twin"))
    proc = _run_kd(["plugins", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    (failure,) = [f for f in data["failures"] if f["distribution"] in ("kd-one", "kd-two")]
    assert "kd-one" in failure["error"] and "kd-two" in failure["error"]
    assert "'twin'" in failure["error"]
    kept = {"kd-one", "kd-two"} - {failure["distribution"]}
    assert data["distributions"][kept.pop()]["components"]["loss"] == ["twin"]
    assert failure["distribution"] not in data["distributions"]

    proc = _run_kd(["components"], tmp_path, {"KD_STRICT_PLUGINS": "1"})
    assert proc.returncode == 1
    assert "kd-one" in proc.stderr and "kd-two" in proc.stderr and "'twin'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_broken_plugin_is_reported_and_others_keep_working(tmp_path):
    _fake_distribution(tmp_path, "kd-broken", "kd_broken", "raise ImportError('no numpy here')\n")
    _fake_distribution(tmp_path, "kd-fine", "kd_fine", GOOD.replace("{name}", "fine"))
    proc = _run_kd(["plugins", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert "fine" in data["distributions"]["kd-fine"]["components"]["loss"]
    failure = next(f for f in data["failures"] if f["distribution"] == "kd-broken")
    assert "no numpy here" in failure["error"]
    assert "ImportError" in failure["traceback"]


def test_strict_mode_makes_a_broken_plugin_fatal(tmp_path):
    _fake_distribution(tmp_path, "kd-broken", "kd_broken", "raise ImportError('boom')\n")
    proc = _run_kd(["plugins"], tmp_path, {"KD_STRICT_PLUGINS": "1"})
    assert proc.returncode == 1
    assert "kd-broken" in proc.stderr and "boom" in proc.stderr


def test_blocked_plugin_is_not_loaded(tmp_path):
    _fake_distribution(tmp_path, "kd-fake", "kd_fake", GOOD.replace("{name}", "fake"))
    proc = _run_kd(["plugins", "--json"], tmp_path, {"KD_DISABLE_PLUGINS": "kd-fake"})
    assert "kd-fake" not in json.loads(proc.stdout)["distributions"]


def _component(name: str) -> kdcore.Component:
    return kdcore.Component(name, lambda config, setup: None, doc="test component")


class _Fine:
    """A working plugin that must survive a broken one next to it."""

    @kdcore.hookimpl
    def kd_losses(self):
        return [_component("still_here")]


def _failure_of(registry, dist: str):
    (failure,) = [f for f in registry.failures if f.distribution == dist]
    return failure


def test_misspelt_hook_is_an_error(monkeypatch):
    """A misspelt hook (pluggy's check_pending) makes that plugin a load failure saying
    which hook and what was meant; the others load. Strict mode: a RegistryError."""

    class Typo:
        @kdcore.hookimpl
        def kd_loss(self):  # should be kd_losses
            return [_component("typo_loss")]

        @kdcore.hookimpl
        def kd_metrics(self):  # a right hook of a broken plugin is dropped with it
            return [_component("typo_metric")]

    monkeypatch.delenv("KD_STRICT_PLUGINS", raising=False)
    typo = Typo()
    registry = build_registry(extra_plugins=[(typo, "typo"), (_Fine(), "fine")])
    failure = _failure_of(registry, "typo")
    assert "kd_loss" in failure.error and "did you mean 'kd_losses'" in failure.error
    assert "still_here" in registry.names("loss")
    assert "typo_metric" not in registry.names("metric")
    assert typo not in registry.pm.get_plugins()
    assert "typo" not in registry.distributions()

    monkeypatch.setenv("KD_STRICT_PLUGINS", "1")
    with pytest.raises(app.RegistryError, match="typo.*kd_loss"):
        build_registry(extra_plugins=[(Typo(), "typo")])


def test_non_component_record_is_an_error(monkeypatch):
    class Bad:
        @kdcore.hookimpl
        def kd_losses(self):
            return [_component("bad_first"), "not a component"]

    monkeypatch.delenv("KD_STRICT_PLUGINS", raising=False)
    registry = build_registry(extra_plugins=[(Bad(), "bad-dist"), (_Fine(), "fine")])
    failure = _failure_of(registry, "bad-dist")
    assert "kd_losses returned str" in failure.error and "kdcore.Component" in failure.error
    assert "bad_first" not in registry.names("loss")  # its partial records are dropped
    assert "still_here" in registry.names("loss")

    monkeypatch.setenv("KD_STRICT_PLUGINS", "1")
    with pytest.raises(app.RegistryError, match="bad-dist"):
        build_registry(extra_plugins=[(Bad(), "bad-dist")])


def test_raising_hook_is_a_load_failure_of_that_plugin(monkeypatch):
    class Raising:
        @kdcore.hookimpl
        def kd_metrics(self):
            return [_component("raising_metric")]

        @kdcore.hookimpl
        def kd_losses(self):
            raise RuntimeError("no weights here")

    monkeypatch.delenv("KD_STRICT_PLUGINS", raising=False)
    raising = Raising()
    registry = build_registry(extra_plugins=[(raising, "kd-raising"), (_Fine(), "fine")])
    failure = _failure_of(registry, "kd-raising")
    assert "kd_losses" in failure.error and "RuntimeError: no weights here" in failure.error
    assert "no weights here" in failure.traceback and "line" in failure.traceback
    assert "raising_metric" not in registry.names("metric")
    assert "still_here" in registry.names("loss")
    assert raising not in registry.pm.get_plugins()

    monkeypatch.setenv("KD_STRICT_PLUGINS", "1")
    with pytest.raises(app.RegistryError, match="kd-raising.*no weights here"):
        build_registry(extra_plugins=[(Raising(), "kd-raising")])


def test_duplicate_of_a_builtin_keeps_the_builtin(monkeypatch):
    class Dup:
        @kdcore.hookimpl
        def kd_losses(self):
            return [_component("dup_extra"), _component("ce")]

    monkeypatch.delenv("KD_STRICT_PLUGINS", raising=False)
    with testing.plugins(Dup(), distribution="kd-dup") as registry:
        assert registry.lookup("loss", "ce").distribution == "kdcore"
        assert "dup_extra" not in registry.names("loss")
        failure = _failure_of(registry, "kd-dup")
        assert "'ce'" in failure.error and "kdcore" in failure.error
        assert "kd-dup" in failure.error


def test_system_exit_at_import_is_a_load_failure(tmp_path):
    """``sys.exit`` in a plugin's import used to end every kd command (silently)."""
    _fake_distribution(tmp_path, "kd-exits", "kd_exits", "import sys\nsys.exit(3)\n")
    _fake_distribution(tmp_path, "kd-fine", "kd_fine", GOOD.replace("{name}", "fine"))
    proc = _run_kd(["plugins", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    failure = next(f for f in data["failures"] if f["distribution"] == "kd-exits")
    assert failure["error"] == "SystemExit: 3" and failure["entry_point"] == "kd_exits"
    assert data["distributions"]["kd-fine"]["components"]["loss"] == ["fine"]

    proc = _run_kd(["plugins"], tmp_path)
    assert "FAILED kd-exits (entry point kd_exits): SystemExit: 3" in proc.stdout

    proc = _run_kd(["doctor", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (listed,) = json.loads(proc.stdout)["plugin_failures"]
    assert listed["distribution"] == "kd-exits" and listed["error"] == "SystemExit: 3"

    proc = _run_kd(["plugins"], tmp_path, {"KD_STRICT_PLUGINS": "1"})
    assert proc.returncode == 1 and "kd-exits" in proc.stderr and "SystemExit" in proc.stderr


def test_same_entry_point_name_in_two_distributions_is_never_skipped(tmp_path):
    """Both load when their components differ; a clash is a failure naming both."""
    for dist, module, name in [("kd-hinton", "kd_h1", "h_one"), ("kd-other", "kd_h2", "h_two")]:
        _fake_distribution(tmp_path, dist, module, GOOD.replace("{name}", name), "hinton")
    proc = _run_kd(["plugins", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["distributions"]["kd-hinton"]["components"]["loss"] == ["h_one"]
    assert data["distributions"]["kd-other"]["components"]["loss"] == ["h_two"]
    assert not [f for f in data["failures"] if f["entry_point"] == "hinton"]

    clash = tmp_path / "clash"
    clash.mkdir()
    for dist, module in [("kd-hinton", "kd_h1"), ("kd-other", "kd_h2")]:
        _fake_distribution(clash, dist, module, GOOD.replace("{name}", "same"), "hinton")
    data = json.loads(_run_kd(["plugins", "--json"], clash).stdout)
    (failure,) = [f for f in data["failures"] if f["entry_point"] == "hinton"]
    assert "kd-hinton" in failure["error"] and "kd-other" in failure["error"]

    # Two distributions whose entry points load one module: registered once, the other
    # reported (registering it twice would register each component twice).
    same = tmp_path / "same"
    same.mkdir()
    _fake_distribution(same, "kd-hinton", "kd_same", GOOD.replace("{name}", "once"), "hinton")
    info = same / "kd_other-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kd-other\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kdcore]\nhinton = kd_same\n")
    data = json.loads(_run_kd(["plugins", "--json"], same).stdout)
    (failure,) = [f for f in data["failures"] if f["entry_point"] == "hinton"]
    assert "kd-hinton" in failure["error"] and "kd-other" in failure["error"]


def test_spec_naming_a_component_of_a_failed_plugin_says_why(monkeypatch, corpus):
    class Half:
        @kdcore.hookimpl
        def kd_losses(self):
            return [_component("orphan")]

        @kdcore.hookimpl
        def kd_metrics(self):
            raise RuntimeError("metrics broke")

    class Lossless:
        @kdcore.hookimpl
        def kd_losses(self):
            raise ValueError("losses broke")

    monkeypatch.delenv("KD_STRICT_PLUGINS", raising=False)
    with testing.plugins(Half(), distribution="kd-half"):
        with pytest.raises(kdcore.SpecError) as info:
            load_spec(testing.tiny_spec(corpus, [{"name": "orphan"}]))
    message = str(info.value)
    assert "'orphan'" in message and "kd-half" in message and "failed to load" in message
    assert "RuntimeError: metrics broke" in message and "$.losses[0].name" in message

    # A hook that raised: which names it had is unknown, so the failure is named as a cause.
    with testing.plugins(Lossless(), distribution="kd-lossless"):
        with pytest.raises(kdcore.SpecError) as info:
            load_spec(testing.tiny_spec(corpus, [{"name": "lost"}]))
    message = str(info.value)
    assert "unknown loss 'lost'" in message and "kd-lossless" in message
    assert "ValueError: losses broke" in message


def test_spec_naming_a_component_of_a_plugin_that_failed_to_import(tmp_path, corpus):
    _fake_distribution(tmp_path, "kd-broken", "kd_broken", "raise ImportError('no numpy')\n")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(testing.tiny_spec(corpus, [{"name": "broken_loss"}])))
    proc = _run_kd(["validate", str(spec)], tmp_path)
    assert proc.returncode == 2
    assert "unknown loss 'broken_loss'" in proc.stderr and "@ $.losses[0].name" in proc.stderr
    assert "kd-broken" in proc.stderr and "ImportError: no numpy" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_component_validates_its_fields():
    @attrs.define
    class C:
        pass

    with pytest.raises(ValueError):
        kdcore.Component("Bad Name", lambda c, s: None, C)
    with pytest.raises(ValueError):
        kdcore.Component("ok", lambda c, s: None, C, requires={"telepathy"})
    with pytest.raises(TypeError):
        kdcore.Component("ok", lambda c, s: None, dict)


def test_builtins_come_through_the_hooks():
    registry = app.get_registry()
    builtin_plugins = [
        p
        for p in registry.pm.get_plugins()
        if getattr(p, "__name__", "").startswith("kdcore.builtins")
    ]
    assert builtin_plugins, "built-ins must be registered as plugins"
    assert registry.lookup("loss", "ce").distribution == "kdcore"


def _clean_site(tmp_path: Path) -> Path:
    """A site-packages view with this environment's dependencies but no kd plugins."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path / "site"
    view.mkdir()
    for entry in site.iterdir():
        lowered = entry.name.lower()
        if lowered.startswith(("kd_", "__editable__.kd_", "__editable___kd_")):
            continue  # the plugins' dist-infos and editable finders
        (view / entry.name).symlink_to(entry)
    return view


def test_fresh_environment_lists_builtins_then_an_installed_plugin(tmp_path):
    """A new venv with only the core lists only built-ins; installing plugins/minillm
    into it (a real pip install) makes kd-minillm appear with no other step."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    view = _clean_site(tmp_path)
    # The view goes on sys.path first; .pth files (editable installs of the core) only run
    # from a real site directory, so they are linked into the new venv's.
    (Path(site) / "00deps.pth").write_text(str(view) + "\n")
    for pth in view.glob("*.pth"):
        (Path(site) / pth.name).symlink_to(pth.resolve())

    def plugins():
        out = subprocess.run(
            [python, "-m", "kdcore.cli", "plugins", "--json"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["distributions"]

    assert list(plugins()) == ["kdcore"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            site,
            str(ROOT / "plugins" / "minillm"),
        ],
        check=True,
        capture_output=True,
    )
    assert set(plugins()) == {"kdcore", "kd-minillm"}


def test_a_raising_kd_add_commands_loses_only_that_plugins_commands(monkeypatch, capsys):
    from kdcore.cli.main import build_parser
    from kdcore.testing import plugins

    class Broken:
        @kdcore.hookimpl
        def kd_add_commands(self, subparsers):
            raise RuntimeError("no parser for you")

    monkeypatch.delenv("KD_STRICT_PLUGINS", raising=False)
    with plugins(Broken(), distribution="kd-broken-cli"):
        parser = build_parser()
        assert parser.parse_args(["components"]).func is not None
        assert "kd-broken-cli" in capsys.readouterr().err
        monkeypatch.setenv("KD_STRICT_PLUGINS", "1")
        with pytest.raises(app.RegistryError, match="no parser for you"):
            build_parser()
