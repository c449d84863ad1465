"""Docs that are generated must match what they are generated from, and the plugin
authors' guide works when followed as printed."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

import kdcore
from kdcore import testing
from kdcore.cli import docgen

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

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


# ---------------------------------------------------------------- docs/authoring-plugins.md

AUTHORING = ROOT / "docs" / "authoring-plugins.md"


def doc_files(page: str) -> dict[str, str]:
    """The files the page prints whole: a line "`PATH`:" and the fenced block after it."""
    pattern = re.compile(r"^`([\w./-]+)`:\n\n```\w*\n(.*?)^```$", re.M | re.S)
    return dict(pattern.findall(page))


def doc_blocks(page: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", page, re.M | re.S)


def test_the_authoring_guide_plugin_installs_lists_and_passes_its_tests_as_printed(
    tmp_path, corpus
):
    """Follow section 1 literally: write the files it shows, run the commands of its
    "without touching your environment" block (in a temporary folder), then train with the
    spec tables it shows, temperature scheduled."""
    page = AUTHORING.read_text(encoding="utf-8")
    files = doc_files(page)
    assert {
        "kd-tempered-kl/pyproject.toml",
        "kd-tempered-kl/kd_tempered_kl/__init__.py",
        "kd-tempered-kl/tests/test_tempered_kl.py",
    } <= set(files)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    # the whole pyproject.toml: a build system, the project table and the entry point
    project = tomllib.loads(files["kd-tempered-kl/pyproject.toml"])
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    assert project["project"]["entry-points"]["kdcore"] == {"tempered_kl": "kd_tempered_kl"}
    assert project["project"]["license"] == "MIT"  # SPDX: no setuptools deprecation warning

    site = tmp_path / "kd-site"
    commands = next(b for b in doc_blocks(page, "bash") if "--target /tmp/kd-site" in b)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    outputs = []
    for line in commands.strip().splitlines():
        argv = shlex.split(line.replace("/tmp/kd-site", str(site)), comments=True)
        extra = {}
        while "=" in argv[0]:  # VAR=value before the command
            key, value = argv.pop(0).split("=", 1)
            extra[key] = value
        assert argv[0] in ("pip", "python"), line
        argv = [sys.executable, *(["-m", "pip"] if argv[0] == "pip" else []), *argv[1:]]
        proc = subprocess.run(
            argv, cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
        outputs.append((line, proc.stdout))
    listed = next(out for line, out in outputs if "components --kind loss" in line)
    assert re.search(r"loss\s+tempered_kl\s+kd-tempered-kl", listed), listed

    # the spec tables of section 1 train: the scheduled temperature reaches inputs.params
    spec_toml = next(b for b in doc_blocks(page, "toml") if 'name = "tempered_kl"' in b)
    tables = tomllib.loads(spec_toml)
    teacher = testing.save_random_model(tmp_path / "teacher", dim=16, max_seq_len=32)
    tables["teachers"][0]["path"] = str(teacher)
    spec = testing.tiny_spec(corpus, [{"name": "ce"}, *tables["losses"]], steps=3)
    spec["teachers"] = tables["teachers"]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "kdcore.cli", "distill", "spec.json", "--output", "run"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    temperatures = [r["tempered_kl/temperature"] for r in records if "eval" not in r]
    assert temperatures[0] == 4.0 and temperatures[-1] < 4.0


def test_the_authoring_guide_says_what_a_plugin_author_needs():
    page = AUTHORING.read_text(encoding="utf-8")
    # where the test goes and how to run it
    assert "tests/test_tempered_kl.py" in page and "python -m pytest" in page
    # sparse_ok, and what training from a cache takes
    assert "sparse_ok" in page and "kd cache" in page and 'cache = "DIR"' in page
    # a scheduled float arrives in inputs.params, and the kit checks that
    assert "inputs.params" in page and "never from the `config`" in page
    kit = " ".join(page.split("## 8.")[1].split("## 9.")[0].split())
    assert "a loss that reads a scheduled float from its factory's `config`" in kit


# ---------------------------------------------------------------- the kit and scheduled floats


@attrs.define
class TemperatureConfig:
    temperature: float = 2.0


def _tempered_ce(logits, inputs, temperature):
    ce = kdcore.token_cross_entropy(logits / temperature, inputs.batch["labels"])
    return kdcore.masked_mean(ce, inputs.batch["mask"]), {}


def reads_params(config, setup):
    return lambda inputs: _tempered_ce(inputs.student.logits, inputs, inputs.params.temperature)


def reads_config(config, setup):
    # wrong: with temperature scheduled, config.temperature is a app.Schedule
    return lambda inputs: _tempered_ce(inputs.student.logits, inputs, config.temperature)


def reads_config_when_built(config, setup):
    temperature = float(config.temperature)  # wrong too: fails as soon as the run builds it
    return lambda inputs: _tempered_ce(inputs.student.logits, inputs, temperature)


def ignores_a_schedule(config, setup):
    # wrong and silent: a schedule is replaced by 1.0 instead of failing
    t = config.temperature if isinstance(config.temperature, float) else 1.0
    return lambda inputs: _tempered_ce(inputs.student.logits, inputs, t)


class TemperaturePlugin:
    @kdcore.hookimpl
    def kd_losses(self):
        return [
            kdcore.Component(name, factory, TemperatureConfig, doc=name)
            for name, factory in [
                ("reads_params", reads_params),
                ("reads_config", reads_config),
                ("reads_config_when_built", reads_config_when_built),
                ("ignores_a_schedule", ignores_a_schedule),
            ]
        ]


def test_the_conformance_kit_fails_a_loss_that_reads_a_scheduled_float_from_its_config():
    with testing.plugins(TemperaturePlugin()):
        testing.check_loss("reads_params", max_examples=3)
        testing.check_loss("reads_params", temperature=3.0, max_examples=3)
        for name in ("reads_config", "reads_config_when_built", "ignores_a_schedule"):
            with pytest.raises(AssertionError) as failed:
                testing.check_loss(name, temperature=3.0, max_examples=3)
            message = str(failed.value)
            assert message.startswith(f"{name}: ") and "temperature" in message, message
            assert "inputs.params" in message, message


# ---------------------------------------------------------------- set-up says what it does

PYPROJECTS = [
    ROOT / "pyproject.toml",
    *sorted(ROOT.glob("plugins/*/pyproject.toml")),
    ROOT / "examples" / "third_party_plugin" / "pyproject.toml",
]


@pytest.mark.parametrize(
    "pyproject", PYPROJECTS, ids=lambda p: p.parent.relative_to(ROOT).as_posix() or "kdcore"
)
def test_every_distribution_builds_without_setuptools_warnings(pyproject, tmp_path):
    """The license is an SPDX string (a table gave 28 deprecation warnings per set-up), and
    the build requires a setuptools that takes one. The metadata is built from a copy, so
    nothing is written into the checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (pyproject.parent / name).exists():
            (source / name).write_text((pyproject.parent / name).read_text(encoding="utf-8"))
    out = tmp_path / "metadata"
    out.mkdir()
    build = (
        "import sys; from setuptools import build_meta; "
        "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", build, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert "Warning" not in log, log
    dist_info = out / proc.stdout.strip().splitlines()[-1]
    assert "License-Expression: MIT" in (dist_info / "METADATA").read_text()
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    assert data["project"]["license"] == "MIT", pyproject
    assert "setuptools>=77" in data["build-system"]["requires"], pyproject


def fake_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of scripts/setup.sh in a folder of its own, with two plugin folders and a
    .venv whose python logs each call, answers pip itself and hands everything else to the
    real interpreter: the script runs end to end without installing anything, and the
    checkout's own .venv is never touched (this holds for any version of the script)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "setup.sh").write_text((ROOT / "scripts" / "setup.sh").read_text())
    for name in ("alpha", "beta"):
        (repo / "plugins" / name).mkdir(parents=True)
    log = tmp_path / "python-calls.log"
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    stub = f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {shlex.quote(str(log))}
if [ "$1 $2" = "-m pip" ]; then echo "(pip $3 ran here)"; exit 0; fi
if [ "$*" = "-m kdcore.cli.fastpath --path" ] && [ -n "${{FAKE_NO_OPENBLAS:-}}" ]; then exit 1; fi
exec {shlex.quote(sys.executable)} "$@"
"""
    (bin_dir / "python").write_text(stub)
    (bin_dir / "python").chmod(0o755)
    # apt-get must never run for real here: a stand-in that fails, as without a network
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "apt-get").write_text("#!/bin/sh\necho 'apt-get: no network' >&2\nexit 100\n")
    (tools / "apt-get").chmod(0o755)
    return repo, log


def run_setup(tmp_path: Path, **env: str) -> tuple[str, list[str]]:
    repo, log = fake_checkout(tmp_path)
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONPATH")}
    base["PATH"] = f"{tmp_path / 'tools'}:{base['PATH']}"
    proc = subprocess.run(
        ["bash", str(repo / "scripts" / "setup.sh")],
        cwd=tmp_path,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr, log.read_text().splitlines()


def fast_path_in_use(**env: str) -> bool:
    """The truth: does a plain python process with this environment run MLX on OpenBLAS?"""
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    check = (
        "import sys, mlx.core; from kdcore.cli.fastpath import fast_path_active; "
        "sys.exit(0 if fast_path_active() else 1)"
    )
    return subprocess.run([sys.executable, "-c", check], env={**base, **env}).returncode == 0


def test_setup_names_each_stage_and_lets_pip_show_its_progress(tmp_path):
    output, calls = run_setup(tmp_path, FAKE_NO_OPENBLAS="1")
    pips = [c for c in calls if c.startswith("-m pip install")]
    assert len(pips) == 2, calls
    for call in pips:
        assert not {"-q", "--quiet"} & set(call.split()), f"a silent install: {call}"
    assert "setuptools>=77" in pips[0]
    stages = [line for line in output.splitlines() if line.startswith("setup: ")]
    assert len(stages) >= 3, output
    # each install is announced before pip starts, naming what it installs
    runs = [m.start() for m in re.finditer(r"\(pip install ran here\)", output)]
    announce = output.index("installing kdcore")
    assert output.index("upgrading pip") < runs[0] < announce < runs[1], output
    assert "alpha" in output[announce : runs[1]] and "beta" in output[announce : runs[1]]


def test_setup_says_truthfully_whether_the_fast_path_is_in_use(tmp_path):
    from kdcore.cli import fastpath

    # without the library: set-up cannot preload it, so it must say that it is not in use
    output, _ = run_setup(tmp_path / "without", FAKE_NO_OPENBLAS="1")
    assert not fast_path_in_use()
    assert "OpenBLAS fast path: not in use" in output, output
    assert "OpenBLAS fast path: in use" not in output
    lib = fastpath.openblas_path()
    if lib is None:
        pytest.skip("no OpenBLAS on this machine: the 'in use' half cannot be checked")
    # with it (as here): set-up preloads it for what runs after it, and says so
    output, _ = run_setup(tmp_path / "with")
    assert fast_path_in_use(LD_PRELOAD=lib)
    assert f"OpenBLAS fast path: in use ({lib} preloaded" in output, output


def test_kd_doctor_says_whether_the_fast_path_is_in_use_and_why_not(tmp_path):
    from kdcore.cli import fastpath

    if not sys.platform.startswith("linux") or fastpath.openblas_path() is None:
        pytest.skip("needs Linux with OpenBLAS installed")
    kd = Path(sys.executable).with_name("kd")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "_KD_REEXEC")}

    def doctor(**extra: str) -> str:
        proc = subprocess.run(
            [str(kd), "doctor"], env={**env, **extra}, capture_output=True, text=True, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    # through kd, as a user runs it: kd preloaded it, and doctor says it is in use
    assert "fast path: OpenBLAS is in use" in doctor()
    # turned off: not "use it through kd" (this was kd), but what turned it off
    off = doctor(KD_NO_FASTPATH="1")
    assert "fast_path_active: False" in off
    assert "KD_NO_FASTPATH=1" in off and "through `kd`" not in off, off
