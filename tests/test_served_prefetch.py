"""A served teacher's requests for the next batches, in flight while the student trains
(``params.prefetch``): the same numbers as without, the wait gone when the server is fast
enough, failures raised at the step that needs the batch, on-policy batches scored when
sampled, and the server's throughput in the log."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import served_helpers as S

from kdcore import app
from kdcore.cli.serve import Scorer
from kdcore.data.build import build_dataset
from kdcore.engine.onpolicy import draw
from kdcore.errors import ServerError

pytestmark = pytest.mark.usefixtures("server_token")  # the served teacher's token, in its env var


@pytest.fixture
def requests_seen(world, monkeypatch):
    """Every batch the server scored, as (rows, first row's ids), in the order it came."""
    scorer, seen, lock = world["scorer"], [], threading.Lock()

    def recording(ids, k):
        with lock:
            seen.append(np.array(ids))
        return Scorer.topk(scorer, ids, k)

    monkeypatch.setattr(scorer, "topk", recording)
    return seen


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def losses(records: list[dict]) -> list[dict]:
    """The loss and its terms of each record (not the wall-clock figures)."""
    return [{k: v for k, v in r.items() if k.split("/")[0] == "loss"} for r in records]


def test_prefetch_changes_nothing_but_the_wait(world, corpus, tmp_path, requests_seen):
    runs = {}
    for depth in (0, 2):
        spec = S.spec_dict(world, corpus, S.served_entry(world, prefetch=depth), steps=5)
        start = len(requests_seen)
        app.distill(spec, output=tmp_path / f"p{depth}", progress=False)
        runs[depth] = records(tmp_path / f"p{depth}")
    # the same losses, bit for bit, with and without requests sent ahead
    assert losses(runs[2]) == losses(runs[0]) and len(runs[2]) == 5
    # each training batch asked for once, in the data's order, none past the last step
    dataset = build_dataset(app.load_spec(spec))
    sent = requests_seen[start:]
    where = []
    for i in range(7):
        rows = np.asarray(dataset.batch(i, 4)["input_ids"])
        where.append([n for n, r in enumerate(sent) if np.array_equal(r, rows)])
    assert all(len(w) == 1 for w in where[:5]) and where[5:] == [[], []], where
    assert [w[0] for w in where[:5]] == sorted(w[0] for w in where[:5])
    # the server's throughput and the steps' wait are in every record and the summary
    for record in runs[2]:
        assert record["server/tokens_per_s"] > 0 and record["server/wait_s"] >= 0
    summary = json.loads((tmp_path / "p2" / "summary.json").read_text())
    served = summary["teacher_servers"]["teachers[0]"]
    assert served["prefetch"] == 2 and served["tokens"] >= 5 * 4 * 32


def test_prefetch_with_micro_batches_asks_for_each_once(world, corpus, tmp_path, requests_seen):
    runs = {}
    for depth in (0, 1):
        spec = S.spec_dict(world, corpus, S.served_entry(world, prefetch=depth), steps=3)
        spec["train"]["grad_accum"] = 2
        start = len(requests_seen)
        app.distill(spec, output=tmp_path / f"p{depth}", progress=False)
        runs[depth] = records(tmp_path / f"p{depth}")
    assert losses(runs[1]) == losses(runs[0]) and len(runs[1]) == 3
    dataset = build_dataset(app.load_spec(spec))
    sent = requests_seen[start:]
    for i in range(8):  # 3 steps of 2 micro-batches: batches 0..5, never 6 or 7
        rows = np.asarray(dataset.batch(i, 4)["input_ids"])
        asked = sum(np.array_equal(r, rows) for r in sent)
        assert asked == (1 if i < 6 else 0), (i, asked)


def test_a_fast_enough_server_never_stalls_the_step(world, corpus, monkeypatch):
    scorer = world["scorer"]

    def slow(ids, k):  # each request takes 0.2 s
        time.sleep(0.2)
        return Scorer.topk(scorer, ids, k)

    spec = app.load_spec(S.spec_dict(world, corpus, S.served_entry(world)))
    dataset = build_dataset(spec)
    batches = [(i, np.asarray(dataset.batch(i, 4)["input_ids"])) for i in range(3)]
    ahead = S.open_served(world, corpus, S.served_entry(world, prefetch=2))
    plain = S.open_served(world, corpus, S.served_entry(world, prefetch=0))
    monkeypatch.setattr(scorer, "topk", slow)
    ahead.prefetch(batches)
    time.sleep(1.5)  # the student's steps: the three requests are answered meanwhile
    got = [ahead.signal({"input_ids": ids}) for _i, ids in batches]
    assert ahead.traffic()["wait_s"] < 0.15, ahead.traffic()
    want = [plain.signal({"input_ids": ids}) for _i, ids in batches]
    assert plain.traffic()["wait_s"] > 3 * 0.2 * 0.9  # each step waited for its request
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.array(a.topk_ids), np.array(b.topk_ids))
        np.testing.assert_array_equal(np.array(a.topk_logprobs), np.array(b.topk_logprobs))
    ahead.close()
    plain.close()


def test_a_prefetched_request_that_fails_raises_at_the_step_that_needs_it(
    world, corpus, monkeypatch
):
    scorer = world["scorer"]
    spec = app.load_spec(S.spec_dict(world, corpus, S.served_entry(world)))
    dataset = build_dataset(spec)
    batches = [(i, np.asarray(dataset.batch(i, 4)["input_ids"])) for i in range(3)]

    def failing(ids, k):  # the server fails on batch 1 only
        if np.array_equal(ids, batches[1][1]):
            raise RuntimeError("out of memory")
        return Scorer.topk(scorer, ids, k)

    teacher = S.open_served(world, corpus, S.served_entry(world, prefetch=2))
    monkeypatch.setattr(scorer, "topk", failing)
    teacher.prefetch(batches)
    first = teacher.signal({"input_ids": batches[0][1]})  # batch 0 is fine
    assert first.topk_ids.shape == (4, 32, S.K)
    with pytest.raises(ServerError, match="no answer after 3 tries .*out of memory"):
        teacher.signal({"input_ids": batches[1][1]})
    assert teacher.signal({"input_ids": batches[2][1]}).topk_ids.shape == (4, 32, S.K)
    teacher.close()


def test_on_policy_batches_are_scored_when_sampled(world, corpus, tmp_path, requests_seen):
    lines = [x.strip() for x in corpus.read_text(encoding="utf-8").splitlines() if x.strip()]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": a[: 2 + i % 10] + ":", "response": " " + b[:12] + "\n"}) + "\n"
            for i, (a, b) in enumerate(zip(lines[0:200:2], lines[1:200:2]))
        )
    )
    runs = {}
    for depth in (0, 2):
        spec = S.spec_dict(world, corpus, S.served_entry(world, prefetch=depth), steps=6)
        spec["data"] = {
            "name": "jsonl",
            "params": {"path": str(pairs), "seq_len": 32, "val_fraction": 0.1},
        }
        spec["data"]["params"]["tokenizer"] = str(world["teacher"])
        spec["train"]["on_policy"] = {"lmbda": 0.5, "max_new_tokens": 6, "stop_tokens": [10]}
        start = len(requests_seen)
        app.distill(spec, output=tmp_path / f"p{depth}", progress=False)
        runs[depth] = records(tmp_path / f"p{depth}")
    sampled = [i for i in range(6) if draw(0, i) < 0.5]
    assert 0 < len(sampled) < 6  # both kinds of batch in the run
    assert [r["on_policy"] for r in runs[2]] == [float(i in sampled) for i in range(6)]
    assert losses(runs[2]) == losses(runs[0])
    # the dataset rows of a sampled batch were never sent: its samples were, at its step
    dataset = build_dataset(app.load_spec(spec))
    sent = requests_seen[start:]
    for i in range(6):
        rows = np.asarray(dataset.batch(i, 4)["input_ids"])
        asked = sum(np.array_equal(r, rows) for r in sent)
        assert asked == (0 if i in sampled else 1), (i, asked)
