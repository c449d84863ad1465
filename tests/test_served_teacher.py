"""A teacher behind a server: ``kd serve`` (kdcore's protocol and the OpenAI completions
form), the ``server`` teacher source, and the faults a run must survive."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import mlx.core as mx
import numpy as np
import pytest
from served_helpers import (
    DATA,
    ENV,
    TOKEN,
    K,
    batch_ids,
    free_port,
    losses_by_step,
    open_served,
    post,
    served_entry,
    spec_dict,
)

from kdcore import app
from kdcore.cache.write import topk_logprobs, write_cache
from kdcore.cli.main import main as kd_main
from kdcore.cli.serve import Limits, Scorer, TeacherServer
from kdcore.errors import ServerError, SpecError
from kdcore.models.io import load_model
from kdcore.registry.manager import get_registry
from kdcore.spec.compose import check_composition
from kdcore.spec.tomlwrite import dumps as toml_dumps
from kdcore.teachers import openai

pytestmark = pytest.mark.usefixtures("server_token")  # the served teacher's token, in its env var

# ---------------------------------------------------------------- the signal


def test_served_top_k_equals_the_local_teachers(world, corpus):
    ids = batch_ids(world, corpus)
    model = load_model(world["teacher"])[0]
    want = [np.array(a) for a in topk_logprobs(model(mx.array(ids)).logits, K)]
    for protocol in ("kd", "openai"):
        teacher = open_served(world, corpus, served_entry(world, protocol))
        signal = teacher.signal({"input_ids": mx.array(ids)})
        assert signal.is_sparse and signal.vocab_size == 256
        got = [np.array(signal.topk_ids), np.array(signal.topk_logprobs)]
        got.append(np.array(signal.tail_logmass))
        assert got[0].shape == (4, 32, K)
        np.testing.assert_array_equal(got[0], want[0], err_msg=protocol)
        np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=0, err_msg=protocol)
        np.testing.assert_allclose(got[2], want[2], atol=1e-5, rtol=0, err_msg=protocol)


@pytest.fixture(scope="module")
def served_run(world, corpus):
    """An uninterrupted run from the server: its losses, and its folder."""
    os.environ[ENV] = TOKEN
    out = world["root"] / "served-run"
    app.distill(spec_dict(world, corpus, served_entry(world)), output=out, progress=False)
    return losses_by_step(out), out


def test_a_served_run_has_the_losses_of_a_run_from_a_cache_of_the_teacher(
    world, corpus, served_run
):
    spec = app.load_spec(spec_dict(world, corpus, {"path": str(world["teacher"])}))
    cache = world["root"] / "cache"
    write_cache(spec, cache, top_k=K, dtype="float32", batch_size=4, progress=False)
    out = world["root"] / "cached-run"
    app.distill(spec_dict(world, corpus, {"cache": str(cache)}), output=out, progress=False)
    cached, (served, folder) = losses_by_step(out), served_run
    assert sorted(served) == [1, 2, 3, 4]
    np.testing.assert_allclose([served[s] for s in served], [cached[s] for s in served], rtol=1e-5)
    # the run folder names the variable, never the token
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files and not [p for p in files if TOKEN.encode() in p.read_bytes()]
    assert ENV in (folder / "spec.toml").read_text()


def test_a_server_killed_mid_run_stops_it_with_a_checkpoint_and_it_resumes(
    world, corpus, served_run, tmp_path, capsys
):
    scorer, server = world["scorer"], world["server"]
    port = server.server_address[1]
    calls = []

    def dying(ids, k):
        calls.append(1)
        if len(calls) == 3:  # the third step's request: the server goes away
            threading.Thread(target=server.close).start()
            raise RuntimeError("killed")
        return Scorer.topk(scorer, ids, k)

    spec = spec_dict(world, corpus, served_entry(world, backoff_s=0.2))
    spec_path, out = tmp_path / "spec.toml", tmp_path / "run"
    spec_path.write_text(toml_dumps(spec))
    scorer.topk = dying
    try:
        assert kd_main(["distill", str(spec_path), "--output", str(out)]) == 1
    finally:
        del scorer.topk
    err = capsys.readouterr().err
    assert f"teacher server {world['url']}: no answer after 3 tries" in err
    assert f"training stopped at step 2, state saved to {out}/checkpoints/step-0000002" in err
    assert f"resume with: kd distill {spec_path} --output {out} --resume" in err
    world["server"] = TeacherServer(scorer, "127.0.0.1", port, TOKEN, world["limits"]).start()
    assert kd_main(["distill", str(spec_path), "--output", str(out), "--resume"]) == 0
    assert losses_by_step(out) == served_run[0]  # bit for bit


# ---------------------------------------------------------------- the OpenAI form


def test_the_client_reads_a_recorded_openai_reply():
    """A reply ``kd serve`` recorded (tests/data): ids keyed ``token_id:N`` as vLLM's
    ``return_tokens_as_token_ids`` gives them; then the same as token strings (llama.cpp)
    with one more entry per position (vLLM adds the prompt token's)."""
    recorded = json.loads((DATA / "openai_completions_echo.json").read_text())
    request, reply = recorded["request"], recorded["reply"]
    ids = np.array([row[:-1] for row in request["prompt"]])
    assert openai.completions_request(ids, 3, "tiny-llama") == request
    top_ids, logprobs, tail = openai.parse_completions(reply, ids, 3)
    assert top_ids.shape == logprobs.shape == (2, 3, 3) and tail.shape == (2, 3)
    first = reply["choices"][1]["logprobs"]["top_logprobs"][1]
    assert top_ids[1, 0].tolist() == [int(key.split(":")[1]) for key in first]
    np.testing.assert_allclose(logprobs[1, 0], list(first.values()), rtol=1e-6)
    np.testing.assert_allclose(tail, np.log1p(-np.exp(logprobs.astype(np.float64)).sum(-1)))

    text = json.loads(json.dumps(reply).replace('"token_id:', '"tok'))
    for choice in text["choices"]:
        for entry in choice["logprobs"]["top_logprobs"][1:]:
            entry.setdefault("tok7", -30.0)  # an entry past the top-k, as vLLM adds
    lookup = {f"tok{i}": i for i in range(256)}.get
    again = openai.parse_completions(text, ids, 3, lookup)
    np.testing.assert_array_equal(again[0], top_ids)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        openai.parse_completions(text, ids, 3)
    with pytest.raises(ValueError, match="where top_k = 4 were asked"):
        openai.parse_completions(reply, ids, 4)
    with pytest.raises(ValueError, match="add a BOS token"):
        openai.parse_completions(reply, ids[:, ::-1], 3)


def test_kd_serve_answers_the_recorded_form(world):
    recorded = json.loads((DATA / "openai_completions_echo.json").read_text())
    request = {k: v for k, v in recorded["request"].items() if k != "model"}
    status, reply = post(world["url"] + "/v1/completions", request)
    assert status == 200

    def shape(value):
        if isinstance(value, dict) and not all(k.startswith("token_id:") for k in value):
            return {k: shape(v) for k, v in value.items() if k not in ("text",)}
        if isinstance(value, list):
            return [shape(v) for v in value]
        return type(value).__name__

    assert shape(reply) == shape(recorded["reply"])
    # a text prompt is scored on its tokens; generation is not what kd serve does
    status, text = post(world["url"] + "/v1/completions", {**request, "prompt": ["Hi!!", "\nThh"]})
    assert status == 200 and text["choices"] == reply["choices"]
    for bad, words in (
        ({"prompt": [["Hello"]]}, "token ids"),
        ({"prompt": [1], "max_tokens": 9}, "0 or 1"),
    ):
        status, error = post(world["url"] + "/v1/completions", bad)
        assert status == 400 and words in error["error"]["message"]


# ---------------------------------------------------------------- faults


def test_a_reply_of_the_wrong_shape_or_vocabulary_is_refused(world, corpus, monkeypatch):
    ids = batch_ids(world, corpus)
    scorer = world["scorer"]
    with pytest.raises(ServerError, match="it serves 'teacher', and the spec asks for model"):
        open_served(world, corpus, served_entry(world, model="another"))
    monkeypatch.setattr(scorer, "vocab_size", 128)
    with pytest.raises(ServerError, match=r"its vocabulary \(128\) is smaller than the run's"):
        open_served(world, corpus, served_entry(world))
    monkeypatch.setattr(scorer, "vocab_size", 256)
    teacher = open_served(world, corpus, served_entry(world))
    monkeypatch.setattr(scorer, "vocab_size", 300)
    with pytest.raises(ServerError, match="is it serving another model") as wrong:
        teacher.score(ids)
    assert world["url"] in str(wrong.value)
    monkeypatch.setattr(scorer, "vocab_size", 256)
    monkeypatch.setattr(scorer, "topk", lambda i, k: [a[:, :-1] for a in Scorer.topk(scorer, i, k)])
    with pytest.raises(ServerError, match=r"shape \(4, 31, 8\) for a batch of shape \(4, 32\)"):
        teacher.score(ids)


def test_a_dead_server_is_named_after_its_retries(world, corpus):
    entry = served_entry(world)
    entry["server"] = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ServerError) as dead:
        open_served(world, corpus, entry)
    message = str(dead.value)
    assert entry["server"] in message and "no answer after 3 tries" in message
    assert "is it running?" in message and time.monotonic() - start < 5


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_certificates_are_verified(world, corpus, tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    server = TeacherServer(world["scorer"], "127.0.0.1", 0, TOKEN, world["limits"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.start()
    try:
        entry = {**served_entry(world), "server": server.url.replace("http:", "https:")}
        with pytest.raises(ServerError, match="TLS failed: .*CERTIFICATE_VERIFY_FAILED"):
            open_served(world, corpus, entry)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted: the same server answers
        assert open_served(world, corpus, entry).vocab_size == 256
    finally:
        server.close()


def test_tokens_and_binds(world, corpus, monkeypatch, capsys):
    # a non-loopback bind needs a token, before the model is even loaded
    assert kd_main(["serve", str(world["teacher"]), "--host", "0.0.0.0"]) == 2
    assert "needs a token" in capsys.readouterr().err
    with pytest.raises(SpecError, match="needs a token"):
        TeacherServer(world["scorer"], "0.0.0.0", 0, None, Limits())
    # no token, a wrong one: 401, and the token is never in the message
    status, error = post(world["url"] + "/v1/topk", {"input_ids": [[1, 2]]}, token=None)
    assert status == 401 and "Bearer" in error["error"]["message"]
    monkeypatch.setenv(ENV, "not-the-token-5b1e")
    with pytest.raises(ServerError, match=rf"refused the token in \${ENV} \(HTTP 401") as refused:
        open_served(world, corpus, served_entry(world))
    assert "not-the-token-5b1e" not in str(refused.value)
    monkeypatch.delenv(ENV)
    with pytest.raises(SpecError, match=f"environment variable {ENV}"):
        open_served(world, corpus, served_entry(world))


def test_bad_requests_get_a_4xx_with_the_reason(world):
    url = world["url"]
    cases = [
        ({"input_ids": "abc"}, 400, "token ids"),
        ({"input_ids": [[1, 2], [3]]}, 400, "rows of one length"),
        ({"input_ids": [[1, 999]]}, 400, "outside the vocabulary"),
        ({"input_ids": [[1, 2]], "top_k": 33}, 400, "top_k must be an integer in [0, 32]"),
        ({"input_ids": [[1] * 4097]}, 413, "more than 4096 positions"),
    ]
    for body, code, words in cases:
        status, error = post(url + "/v1/topk", body)
        assert (status, words in error["error"]["message"]) == (code, True), (body, error)
    assert post(url + "/v1/nothing", {})[0] == 404


def test_validate_refuses_what_a_served_teacher_cannot_give(world, corpus):
    registry = get_registry()
    hidden = next(
        n for n in registry.names("loss") if "hidden_states" in registry.get("loss", n).requires
    )
    spec = spec_dict(world, corpus, served_entry(world))
    spec["losses"] = [
        {"name": hidden},
        {"name": "hinton", "params": {"temperature": 2.0, "tail": "tail-bucket"}},
    ]
    problems = "\n".join(check_composition(app.load_spec(spec)))
    assert f"loss '{hidden}' needs hidden_states, which a served teacher" in problems
    assert (
        f"reads the served teacher {world['url']} (k = {K}, captured at temperature 1)" in problems
    )


def test_the_kd_serve_command_serves_and_stops_on_ctrl_c(world):
    port = free_port()
    command = [sys.executable, "-m", "kdcore.cli", "serve", str(world["teacher"])]
    command += ["--port", str(port), "--top-k", "4"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=2) as r:
                    info = json.loads(r.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert (info["protocol"], info["vocab_size"], info["max_top_k"]) == ("kd", 256, 4)
    finally:
        proc.send_signal(signal.SIGINT)
        # generous: a niced suite beside a training job gets little CPU to shut down with
        _out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert f"on http://127.0.0.1:{port}" in err and "terminate" not in err
