"""Chat datasets against hostile input: a byte-order mark, text the tokenizer refuses, a
chat template that never ends, a train split that carries no loss, and one huge record.
Each breaks ``kd data inspect`` or ``kd distill`` in its own way; each must end in rejected
lines or one clear error, never a traceback, a hang or a silent run on nothing."""

from __future__ import annotations

import codecs
import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kdcore
from kdcore import app, testing
from kdcore.data.datasets import open_text, read_jsonl
from kdcore.io import write_json
from kdcore.tokenizers.hf import train_bpe_tokenizer_json, write_hf_tokenizer

pytest.importorskip("mlx_lm")

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt"
BOM = codecs.BOM_UTF8

# ChatML without tool calls: a turn whose content is not a string (a tool_calls turn) makes
# Jinja's ``+`` fail, so the template refuses the record.
CHATML = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Loops 10^10 times on a record whose first turn is "LOOP" (Jinja's sandbox caps one range
# at 100,000, not two nested ones).
NESTED_LOOP = "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}"
LOOPS_ON_LOOP = "{%- if messages[0].content == 'LOOP' %}" + NESTED_LOOP + "{%- endif %}" + CHATML


def make_tokenizer(folder: Path, template: str = CHATML) -> Path:
    """A byte-level BPE (vocabulary 400, trained on Shakespeare) with ChatML's special
    tokens and ``template`` as its chat template."""
    text = CORPUS.read_text(encoding="utf-8")[:20_000]
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    write_hf_tokenizer(folder, train_bpe_tokenizer_json(text, 400, specials), "<|im_end|>")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    write_json(folder / "tokenizer_config.json", {**config, "chat_template": template})
    return folder


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("chatml-tokenizer"))


def dialogues(count: int, start: int = 0) -> list[dict]:
    lines = [x.strip() for x in CORPUS.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [
        {
            "messages": [
                {"role": "user", "content": f"Say line {i}."},
                {"role": "assistant", "content": lines[i]},
            ]
        }
        for i in range(start, start + count)
    ]


def jsonl(records: list) -> bytes:
    """Records as JSONL bytes; a string is written as the line it is (hostile JSON)."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def write(path: Path, body: bytes) -> Path:
    path.write_bytes(gzip.compress(body) if path.suffix == ".gz" else body)
    return path


def chat(path: Path, tokenizer: Path, **params):
    return app.build("dataset", "chat", path=str(path), tokenizer=str(tokenizer), **params)


def inspect_json(capsys, path: Path, tokenizer: Path, *sets: str) -> tuple[int, dict | str]:
    """``kd data inspect PATH --format chat --json``: (status, the report or stderr)."""
    capsys.readouterr()
    argv = ["data", "inspect", path, "--format", "chat", "--set", f"tokenizer={tokenizer}"]
    for item in sets:
        argv += ["--set", item]
    code = testing.run_kd(*argv, "--json")
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else err


def chat_spec(tmp_path: Path, path: Path, tokenizer: Path, seq_len: int = 64, **params) -> Path:
    spec = testing.tiny_spec(path, steps=2)
    spec["data"] = {
        "name": "chat",
        "params": {"path": str(path), "tokenizer": str(tokenizer), "seq_len": seq_len, **params},
    }
    spec["student"]["model"]["params"]["max_seq_len"] = seq_len
    spec["eval"] = {"batches": 1}
    out = tmp_path / "spec.json"
    out.write_text(json.dumps(spec))
    return out


# ---------------------------------------------------------------- 1. a byte-order mark


@pytest.mark.parametrize("name", ["chat.jsonl", "chat.jsonl.gz"])
def test_a_bom_keeps_the_first_record_of_a_chat_file(tmp_path, tok, capsys, name):
    records = dialogues(12)
    path = write(tmp_path / name, BOM + jsonl(records))
    dataset = chat(path, tok, seq_len=64)
    assert dataset.rejected == [] and dataset.records == 12
    assert "Say line 0." in dataset.render(0)
    code, report = inspect_json(capsys, path, tok, "seq_len=64")
    assert code == 0, report
    assert report["rejected_count"] == 0 and report["samples"][0]["line"] == 1
    # the same rows as the file without a mark (a BOM is not part of the data)
    plain = chat(write(tmp_path / f"plain-{name}", jsonl(records)), tok, seq_len=64)
    assert plain.fingerprint() == dataset.fingerprint()


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz"])
def test_a_bom_keeps_the_first_record_of_a_jsonl_file(tmp_path, name):
    body = jsonl([{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)])
    records, rejected = read_jsonl(write(tmp_path / name, BOM + body))
    assert rejected == [] and [n for n, _ in records] == [1, 2, 3]
    assert records[0][1] == {"prompt": "p0", "response": "r0"}


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.txt.gz"])
def test_a_bom_is_not_read_as_text(tmp_path, name):
    path = write(tmp_path / name, BOM + b"First Citizen:\nBefore we proceed\n")
    assert open_text(path) == "First Citizen:\nBefore we proceed\n"
    assert open_text(path, max_chars=5) == "First"


# ---------------------------------------------------------------- 2. text the tokenizer refuses

# Valid JSON whose string holds a lone surrogate: Python reads it, the Rust tokenizer refuses.
SURROGATE_CHAT = (
    '{"messages": [{"role": "user", "content": "a\\ud800b"}, '
    '{"role": "assistant", "content": "ok"}]}'
)
SURROGATE_TEXT = '{"text": "caf\\udce9 au lait"}'
# a pair written as two escapes is one character (U+1F642), not a lone surrogate
PAIR = '{"messages": [{"role": "user", "content": "\\ud83d\\ude42"}, {"role": "assistant", "content": "ok"}]}'  # noqa: E501


def test_a_lone_surrogate_is_a_rejected_line_in_inspect(tmp_path, tok, capsys):
    lines = [SURROGATE_CHAT, *dialogues(10), SURROGATE_TEXT, PAIR, *dialogues(8, 20)]
    path = write(tmp_path / "chat.jsonl", jsonl(lines))
    code, report = inspect_json(capsys, path, tok, "seq_len=64")
    assert code == 0, report  # no traceback: the other records are inspected
    reasons = {r["line"]: r["reason"] for r in report["rejected"]}
    assert sorted(reasons) == [1, 12] and report["rejected_count"] == 2
    assert all("lone surrogate" in r and "\\ud" in r for r in reasons.values()), reasons
    assert report["samples"][0]["line"] == 2 and report["records"] == 19
    assert report["loss_tokens"]["train"] > 0


def test_a_lone_surrogate_does_not_stop_a_run(tmp_path, tok):
    lines = [*dialogues(3), SURROGATE_CHAT, *dialogues(16, 10)]
    path = write(tmp_path / "chat.jsonl", jsonl(lines))
    spec = chat_spec(tmp_path, path, tok)
    assert testing.run_kd("distill", spec, "--output", tmp_path / "run") == 0
    dataset = chat(path, tok, seq_len=64)
    [refused] = dataset.rejected
    assert refused["line"] == 4 and "surrogate" in refused["reason"]


def test_a_rendering_the_tokenizer_refuses_is_a_value_error_naming_why(tmp_path, tok):
    """Past the reading (a record built in code, a template that writes a surrogate), the
    tokenizer's own refusal is a ValueError, which rejects the record by number."""
    dataset = chat(write(tmp_path / "chat.jsonl", jsonl(dialogues(4))), tok, seq_len=64)
    turns = [{"role": "user", "content": "a\ud800b"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match=r"tokenizer refuses its text: a lone surrogate"):
        dataset.renderer.encode_chat(turns, None, True)
    assert dataset.renderer.prompt_ids(turns[:1], None) is None


def test_a_lone_surrogate_is_a_rejected_line_of_a_jsonl_file(tmp_path, capsys):
    body = '{"prompt": "a\\ud800b", "response": "x"}\n{"prompt": "ok", "response": "fine"}\n'
    path = write(tmp_path / "pairs.jsonl", body.encode())
    records, rejected = read_jsonl(path)
    assert [n for n, _ in records] == [2] and rejected[0]["line"] == 1
    assert testing.run_kd("data", "inspect", path, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records_read"] == 2 and report["rejected"][0]["line"] == 1


# ---------------------------------------------------------------- 3. a template that never ends

# Runs in a subprocess, so that the code before the fix (which hangs, filling memory with the
# template's output) fails by timing out or by the guard instead of hanging the test run.
# The budgets are made small to keep the test short.
LOOPING = """
import contextlib, io, json, os, resource, sys, threading, time
import kdcore.data.render as render
from kdcore import testing


def guard():  # the looping template's output fills memory (GBs a minute): stop at 3 GiB
    while True:
        time.sleep(0.2)
        try:
            with open("/proc/self/statm") as statm:
                rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # macOS: the peak, in bytes
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if rss > 3 << 30:
            print("RESIDENT MEMORY OVER 3 GiB", file=sys.stderr, flush=True)
            os._exit(3)


threading.Thread(target=guard, daemon=True).start()
render.RENDER_SECONDS = 0.5
out = {}
for name, data, folder, file_budget in json.loads(sys.argv[1]):
    render.FILE_TIMEOUT_SECONDS = file_budget
    start, stdout, stderr = time.monotonic(), io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = testing.run_kd(
            "data", "inspect", data, "--format", "chat", "--set", f"tokenizer={folder}",
            "--set", "seq_len=64", "--json",
        )
    out[name] = {
        "code": code,
        "seconds": time.monotonic() - start,
        "report": json.loads(stdout.getvalue()) if code == 0 else None,
        "error": stderr.getvalue(),
    }
print("RESULT " + json.dumps(out))
"""


def test_a_chat_template_that_loops_is_cut_short(tmp_path):
    always = make_tokenizer(tmp_path / "always", NESTED_LOOP + CHATML)
    sometimes = make_tokenizer(tmp_path / "sometimes", LOOPS_ON_LOOP)
    # loops on every record but not on the probe conversation the renderer starts with
    records_only = "{%- if messages[0].content != 'x' %}" + NESTED_LOOP + "{%- endif %}"
    records_only = make_tokenizer(tmp_path / "records-only", records_only + CHATML)
    records = dialogues(12)
    records[4]["messages"][0]["content"] = "LOOP"
    path = write(tmp_path / "chat.jsonl", jsonl(records))
    many = dialogues(12)
    for record in many[::2]:
        record["messages"][0]["content"] = "LOOP"
    many = write(tmp_path / "many.jsonl", jsonl(many))
    runs = [
        ("sometimes", path, sometimes, 30.0),
        ("always", path, always, 30.0),
        ("records_only", path, records_only, 30.0),
        ("file_budget", many, sometimes, 1.4),
    ]
    argv = [sys.executable, "-c", textwrap.dedent(LOOPING), json.dumps(runs, default=str)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("kd data inspect still rendering a looping chat template after 120 s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    # the record that makes the template loop is rejected by its line; the rest inspected
    sometimes_run = result["sometimes"]
    assert sometimes_run["code"] == 0, sometimes_run["error"]
    report = sometimes_run["report"]
    [refused] = report["rejected"]
    assert refused["line"] == 5 and "0.5 s" in refused["reason"], refused
    assert report["records"] == 12 and report["loss_tokens"]["train"] > 0
    # a template that loops on every record is refused with an error naming it: at once
    # when it loops on the probe, after the first three records when only on records
    for name, words in (("always", "probe"), ("records_only", "each of the first 3 records")):
        run = result[name]
        assert run["code"] == 2 and f"chat template of {tmp_path}" in run["error"], run
        assert words in run["error"] and "Traceback" not in run["error"], run["error"]
        assert run["seconds"] < 30, run
    # one that loops on many records is refused once they have cost the file's budget
    run = result["file_budget"]
    assert run["code"] == 2 and "3 records of" in run["error"] and "2 s in all" in run["error"]


def test_rendering_stays_fast_under_the_budget(tmp_path, tok):
    """The budget's bookkeeping is per rendering: a few hundred records render in well
    under a second, as before (0.4 ms a record measured, budget or not)."""
    import time

    path = write(tmp_path / "chat.jsonl", jsonl(dialogues(300)))
    dataset = chat(path, tok, seq_len=64)
    start = time.perf_counter()
    for record in range(dataset.records):
        dataset.encode(record)
    assert time.perf_counter() - start < 0.02 * dataset.records


# ---------------------------------------------------------------- 4. a train split with no loss


def tool_call_dialogues(count: int) -> list[dict]:
    call = {"type": "function", "function": {"name": "look", "arguments": {"x": 1}}}
    return [
        {
            "messages": [
                {"role": "user", "content": f"Look {i}."},
                {"role": "assistant", "content": None, "tool_calls": [call]},
            ]
        }
        for i in range(count)
    ]


def test_a_train_split_the_template_refuses_whole_is_an_error(tmp_path, tok, capsys):
    path = write(tmp_path / "calls.jsonl", jsonl(tool_call_dialogues(20)))
    spec = chat_spec(tmp_path, path, tok)
    capsys.readouterr()
    assert testing.run_kd("distill", spec, "--output", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "no loss tokens" in err and "18 refused by the chat template" in err, err
    assert "line 1:" in err and "Traceback" not in err
    code, err = inspect_json(capsys, path, tok, "seq_len=64")
    assert code == 2 and "no loss tokens" in err and "18 refused by the chat template" in err


def test_a_train_split_cut_before_its_assistant_turns_is_an_error(tmp_path, tok, capsys):
    records = dialogues(12)
    for record in records:  # a long user turn: the assistant turn falls past seq_len
        record["messages"][0]["content"] = "Say this. " * 1_000
    path = write(tmp_path / "long.jsonl", jsonl(records))
    spec = chat_spec(tmp_path, path, tok)
    capsys.readouterr()
    assert testing.run_kd("distill", spec, "--output", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "no loss tokens" in err and "10 lost every loss token to the cut" in err, err
    assert "seq_len" in err and "Traceback" not in err
    code, err = inspect_json(capsys, path, tok, "seq_len=64")
    assert code == 2 and "10 lost every loss token to the cut" in err
    # a seq_len that reaches the assistant turns trains
    assert chat(path, tok, seq_len=8192).stats("train")["train"]["loss_tokens"] > 0


def test_a_large_split_without_loss_is_refused_after_a_sample(tmp_path, tok, monkeypatch):
    """The first batch does not render a whole epoch to prove it: a random sample of
    ``LOSS_CHECK_RECORDS`` records (10,000) with no loss token is enough."""
    from kdcore.data import chat as chat_module

    monkeypatch.setattr(chat_module, "LOSS_CHECK_RECORDS", 20)
    records = dialogues(100)
    for record in records:
        record["messages"][0]["content"] = "Say this. " * 100
    dataset = chat(write(tmp_path / "long.jsonl", jsonl(records)), tok, seq_len=16, pack=False)
    with pytest.raises(
        kdcore.SpecError, match=r"in 32 of its 90 records, drawn at random: 32 lost"
    ):
        dataset.batch(0, 4)
    assert dataset.stats("train", max_records=0)["train"]["scanned"] == 32  # two segments


def test_a_split_with_some_loss_still_trains(tmp_path, tok):
    """Refused and cut records beside good ones: the good ones carry the loss."""
    records = tool_call_dialogues(8) + dialogues(8)
    path = write(tmp_path / "mixed.jsonl", jsonl(records))
    dataset = chat(path, tok, seq_len=64)
    assert dataset.batch(0, 4)["input_ids"].shape == (4, 64)
    assert dataset.num_tokens("train") > 0 and dataset.stats("train")["train"]["rejected"] == 8


# ---------------------------------------------------------------- 5. one huge record


class _Spy:
    """A tokenizer that records the longest text it was asked to encode."""

    longest = 0

    def __init__(self, inner):
        self._inner = inner

    def encode(self, text, *args, **kwargs):
        _Spy.longest = max(_Spy.longest, len(text))
        return self._inner.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_one_huge_record_is_inspected_without_tokenizing_all_of_it(
    tmp_path, tok, capsys, monkeypatch
):
    """A 2 MB user turn took 19 s and 837 MB: the whole turn was tokenized (with offsets)
    several times, for rows that keep 65 tokens of it. Only a bounded prefix is tokenized
    now, and the cut is still reported."""
    from kdcore.data import render

    original = render.ChatRenderer.__init__

    def spying(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.encoder = _Spy(self.encoder)

    monkeypatch.setattr(render.ChatRenderer, "__init__", spying)
    monkeypatch.setattr(_Spy, "longest", 0)
    huge = {
        "messages": [
            {"role": "user", "content": "To be, or not to be. " * 100_000},
            {"role": "assistant", "content": "That is the question."},
        ]
    }
    path = write(tmp_path / "huge.jsonl", jsonl([huge, *dialogues(9)]))
    code, report = inspect_json(capsys, path, tok, "seq_len=64", "val_fraction=0")
    assert code == 0, report
    first = report["samples"][0]
    assert first["line"] == 1 and first["cut_tokens"] > 100_000  # an estimate, reported
    assert _Spy.longest <= 200_000, _Spy.longest  # of 2.1 million characters
    assert report["loss_tokens"]["train"] > 0
