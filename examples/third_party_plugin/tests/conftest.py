"""The tests run against the installed plugin (found through its entry point) and, from a
checkout where it is not installed, against the module next to them, registered in-process
for the session."""

import importlib.util
import sys
from pathlib import Path

import pytest

from kdcore import app, testing

SOURCE = Path(__file__).resolve().parents[1] / "kd_cosine_hint" / "__init__.py"


@pytest.fixture(autouse=True, scope="session")
def cosine_hint_plugin():
    if "cosine_hint" in app.get_registry().names("loss"):
        yield  # installed
        return
    spec = importlib.util.spec_from_file_location("kd_cosine_hint", SOURCE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    with testing.plugins(module, distribution="kd-cosine-hint"):
        yield
