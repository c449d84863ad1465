"""What the served-teacher tests share: a tiny mlx-lm teacher behind ``kd serve`` on
loopback (the ``world`` fixture), its token, and spec builders for a ``server`` teacher.
Importable from every test module (``pythonpath = ["tests"]`` in pyproject.toml); its fixtures
are registered by tests/conftest.py. A module whose tests talk to the server sets
``pytestmark = pytest.mark.usefixtures("server_token")``."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kdcore import app, testing
from kdcore.cli.serve import Limits, Scorer, TeacherServer
from kdcore.data.build import build_dataset
from kdcore.models.mlxlm import create_mlxlm_dir
from kdcore.registry.manager import get_registry
from kdcore.registry.setup import Setup

DATA = Path(__file__).with_name("data")
TINY = dict(
    model_type="llama",
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=256,
    tie_word_embeddings=False,
)
TOKEN = "kd-test-token-7f3a9c"
ENV = "KD_TEST_SERVER_TOKEN"
K = 8
# short backoffs and waits for the fault tests; a request's timeout long enough that a
# loaded machine (a niced suite beside a training job) never times a healthy server out
QUICK = {"retries": 2, "backoff_s": 0.05, "timeout_s": 20.0, "wait_s": 5.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny mlx-lm teacher behind ``kd serve`` on loopback, with a token."""
    root = tmp_path_factory.mktemp("served")
    teacher = create_mlxlm_dir(root / "teacher", TINY, seed=1)
    scorer = Scorer(str(teacher))
    limits = Limits(max_top_k=32, max_tokens=4096, timeout_s=10.0)
    box = {"root": root, "teacher": teacher, "scorer": scorer, "limits": limits}
    box["server"] = TeacherServer(scorer, "127.0.0.1", 0, TOKEN, limits).start()
    box["url"] = box["server"].url
    yield box
    box["server"].close()


@pytest.fixture
def server_token(monkeypatch):
    monkeypatch.setenv(ENV, TOKEN)


def spec_dict(world, corpus, teacher: dict, steps: int = 4) -> dict:
    data = {
        "name": "text",
        "params": {
            "path": str(corpus),
            "seq_len": 32,
            "val_fraction": 0.1,
            "max_chars": 4000,
            "tokenizer": str(world["teacher"]),
        },
    }
    losses = [{"name": "hinton", "params": {"temperature": 2.0}}, {"name": "ce"}]
    return testing.tiny_spec(corpus, losses, steps=steps, teachers=[teacher], data=data)


def served_entry(world, protocol: str = "kd", **params) -> dict:
    params = {"protocol": protocol, "token_env": ENV, "top_k": K, **QUICK, **params}
    return {"server": world["url"], "params": params}


def open_served(world, corpus, entry: dict):
    """The ``server`` teacher source as a run builds it."""
    spec = app.load_spec(spec_dict(world, corpus, entry))
    ref = spec.teachers[0]
    setup = Setup(base_dir=Path("."), seed=0, spec=spec, teacher=ref)
    return get_registry().get("teacher_source", "server").factory(ref.config, setup)


def batch_ids(world, corpus) -> np.ndarray:
    spec = app.load_spec(spec_dict(world, corpus, served_entry(world)))
    return np.asarray(build_dataset(spec).batch(0, 4)["input_ids"])


def losses_by_step(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and "step" in record:
            out[record["step"]] = record["loss"]  # a resumed run's records win
    return out


def post(url: str, body: dict, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
