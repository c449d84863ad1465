"""The plugin manager: entry points, duplicates, load failures, blocking, misspelt hooks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pluggy
import pytest

import kdcore
from kdcore.registry.manager import build_registry

ROOT = Path(__file__).resolve().parents[1]


def _fake_distribution(root: Path, dist: str, module: str, source: str) -> None:
    """A real installed distribution as importlib.metadata sees it: a module and a
    dist-info with an entry point in the kdcore group."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[kdcore]\n{module} = {module}\n")


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
    _fake_distribution(tmp_path, "kd-one", "kd_one", GOOD.replace("{name}", "twin"))
    _fake_distribution(tmp_path, "kd-two", "kd_two", GOOD.replace("{name}", "twin"))
    proc = _run_kd(["components"], tmp_path)
    assert proc.returncode == 1
    assert "kd-one" in proc.stderr and "kd-two" in proc.stderr and "'twin'" in proc.stderr


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


def test_misspelt_hook_is_an_error():
    class Typo:
        @kdcore.hookimpl
        def kd_loss(self):  # should be kd_losses
            return []

    with pytest.raises(pluggy.PluginValidationError):
        build_registry(extra_plugins=[(Typo(), "typo")])


def test_non_component_record_is_an_error():
    class Bad:
        @kdcore.hookimpl
        def kd_losses(self):
            return ["not a component"]

    with pytest.raises(kdcore.RegistryError, match="bad-dist"):
        build_registry(extra_plugins=[(Bad(), "bad-dist")])


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
    registry = kdcore.get_registry()
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
