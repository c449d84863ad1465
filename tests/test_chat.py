"""The ``chat`` dataset (issue 23, point 1): mlx-lm's record formats rendered with the
tokenizer's own chat template, loss on assistant turns only, cut and packed rows, bad lines
rejected by number, and files read in bounded memory.

The oracles are independent of kdcore's code: mlx-lm's own ``tuner.datasets`` classes give
the tokens (and, for prompt/completion records, the loss offset), and the ChatML structure
of the rendered text (``<|im_start|>assistant\\n`` ... ``<|im_end|>\\n``) gives the loss spans.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import kdcore
from kdcore import app, testing
from kdcore.io import write_json
from kdcore.tokenizers.hf import train_bpe_tokenizer_json, write_hf_tokenizer

pytest.importorskip("mlx_lm")

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt"

# Qwen2.5-Instruct's chat template, as its tokenizer_config.json ships it.
QWEN_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 (the template verbatim)

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def make_tokenizer(folder: Path, template: str | None = QWEN_TEMPLATE) -> Path:
    """A byte-level BPE (vocabulary 400, trained offline on Shakespeare) with ChatML's special
    tokens and, unless None, ``template`` as its chat template."""
    text = CORPUS.read_text(encoding="utf-8")[:20_000]
    write_hf_tokenizer(folder, train_bpe_tokenizer_json(text, 400, SPECIALS), "<|im_end|>")
    if template is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        write_json(folder / "tokenizer_config.json", {**config, "chat_template": template})
    return folder


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("qwen-tokenizer"))


@pytest.fixture(scope="module")
def mlx_tok(tok):
    from mlx_lm.tokenizer_utils import load

    return load(tok)


def corpus_lines(count: int, start: int = 0) -> list[str]:
    lines = [x.strip() for x in CORPUS.read_text(encoding="utf-8").splitlines() if x.strip()]
    return lines[start : start + count]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def chat_records(count: int, start: int = 0) -> list[dict]:
    """Multi-turn dialogues; one in five has a system prompt, one in seven calls a tool."""
    lines = corpus_lines(3 * count + 3, start)
    records = []
    for i in range(count):
        a, b, c = lines[3 * i : 3 * i + 3]
        messages = [
            {"role": "user", "content": f"Say line {i}."},
            {"role": "assistant", "content": a},
            {"role": "user", "content": "And the next?"},
            {"role": "assistant", "content": f"{b} {c}"},
        ]
        record: dict = {"messages": messages}
        if i % 5 == 0:
            messages.insert(0, {"role": "system", "content": "You quote the play."})
        if i % 7 == 3:
            call = {"type": "function", "function": {"name": "get_weather", "arguments": {}}}
            call["function"]["arguments"] = {"city": "Verona"}
            messages[-1:] = [
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": '{"sky": "grey"}'},
                {"role": "assistant", "content": f"Grey. {b}"},
            ]
            record["tools"] = [WEATHER]
        records.append(record)
    return records


def completion_records(count: int) -> list[dict]:
    lines = corpus_lines(2 * count, 500)
    return [{"prompt": lines[2 * i], "completion": lines[2 * i + 1]} for i in range(count)]


def text_records(count: int) -> list[dict]:
    lines = corpus_lines(count, 900)
    return [{"text": line} for line in lines]


RECORDS = {"messages": chat_records, "completion": completion_records, "text": text_records}


def write_jsonl(path: Path, records: list) -> Path:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(lines.encode()))
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def chat(path: Path, tokenizer: Path, **params):
    return app.build("dataset", "chat", path=str(path), tokenizer=str(tokenizer), **params)


# ---------------------------------------------------------------- oracles

ASSISTANT_TURN = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)", re.S)


def mlx_lm_process(record: dict, mlx_tok, mask_prompt: bool = True) -> tuple[list[int], int]:
    """(tokens, loss offset) of ``record`` exactly as mlx-lm's trainer makes them."""
    from mlx_lm.tuner.datasets import create_dataset

    config = SimpleNamespace(mask_prompt=mask_prompt and "text" not in record)
    data = create_dataset([record], mlx_tok, config)
    return data.process(data[0])


def expected(record: dict, mlx_tok, mask_prompt: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, carries loss) of one record: mlx-lm's tokens; loss on what each assistant
    turn adds to the ChatML text (its content and ``<|im_end|>\\n``), or on every token but
    the first for text records and ``mask_prompt = false``."""
    ids, offset = mlx_lm_process(record, mlx_tok, mask_prompt)
    ids = np.asarray(ids, np.int32)
    if "text" in record or not mask_prompt:
        carries = np.ones(len(ids), bool)
    else:
        text = mlx_tok.apply_chat_template(
            record.get("messages")
            or [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]},
            ],
            tools=record.get("tools"),
            tokenize=False,
        )
        encoding = mlx_tok.backend_tokenizer.encode(text, add_special_tokens=False)
        assert encoding.ids == ids.tolist()
        starts = np.array([a for a, _ in encoding.offsets])
        carries = np.zeros(len(ids), bool)
        for m in ASSISTANT_TURN.finditer(text):
            carries |= (starts >= m.start(1)) & (starts < m.end(1))
        # mlx-lm's own mask_prompt offset: the last turn is exactly what it trains on
        assert carries[offset:].all() and (offset == len(ids) or not carries[offset - 1])
    carries[0] = False
    return ids, carries


def row_tokens(batch: dict, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, carries, known) of the seq_len + 1 token slots of one row; the last slot's id
    is visible only when it carries loss (it is only ever a label)."""
    inputs, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["mask"][row]
    ids = np.concatenate([inputs, labels[-1:]])
    carries = np.concatenate([[False], mask > 0])
    known = np.ones(len(ids), bool)
    known[-1] = bool(mask[-1])
    return ids, carries, known


def check_rows(dataset, records: list[dict], mlx_tok, mask_prompt: bool = True) -> int:
    """Every row is its records' exact tokens and loss marks at the places its layout says,
    padding elsewhere; every record lands once. Returns the loss tokens seen."""
    seq_len = dataset.seq_len
    placed: list[int] = []
    loss = 0
    for split in ("train", "val"):
        for batch in dataset.batches(5, split):
            for row, example in enumerate(batch["example_index"]):
                ids, carries, known = row_tokens(batch, row)
                covered = np.zeros(seq_len + 1, bool)
                for line, start, count in dataset.layout(int(example), split):
                    want_ids, want_carries = expected(records[line - 1], mlx_tok, mask_prompt)
                    assert count == min(len(want_ids), seq_len + 1)  # cut, never overflowed
                    span = slice(start, start + count)
                    assert (ids[span] == want_ids[:count])[known[span]].all(), line
                    assert (carries[span] == want_carries[:count]).all(), line
                    covered[span] = True
                    placed.append(line)
                assert not carries[~covered].any() and (ids[~covered & known] == 0).all()
                loss += int(batch["mask"][row].sum())
    assert sorted(placed) == list(range(1, len(records) + 1))
    return loss


def tiny_chat_spec(path: Path, tokenizer: Path, seq_len: int = 256, **params) -> dict:
    spec = testing.tiny_spec(path, steps=3)
    spec["data"] = {
        "name": "chat",
        "params": {"path": str(path), "tokenizer": str(tokenizer), "seq_len": seq_len, **params},
    }
    spec["student"]["model"]["params"]["max_seq_len"] = seq_len
    spec["eval"] = {"batches": 1}
    return spec


# ---------------------------------------------------------------- the three formats


@pytest.mark.parametrize("fmt", ["messages", "completion", "text"])
def test_each_mlx_lm_format_trains_and_only_assistant_tokens_carry_loss(
    tmp_path, tok, mlx_tok, fmt
):
    records = RECORDS[fmt](21)
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", records)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_chat_spec(path, tok)))
    assert testing.run_kd("distill", spec, "--output", tmp_path / "run") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["eval"]["val_loss"])

    dataset = testing.build_run(spec).dataset
    loss = check_rows(dataset, records, mlx_tok)
    wanted = sum(int(expected(r, mlx_tok)[1][:257].sum()) for r in records)
    assert loss == wanted > 0
    if fmt == "messages":  # the template really ran: ChatML, Qwen's default system prompt
        text = dataset.render(0)
        assert text.startswith("<|im_start|>system\nYou quote the play.<|im_end|>\n")
        assert "<tools>" in dataset.render(3) and "<tool_call>" in dataset.render(3)


def test_mask_prompt_false_keeps_loss_on_the_prompt(tmp_path, tok, mlx_tok):
    records = chat_records(9)
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    dataset = chat(path, tok, seq_len=256, mask_prompt=False)
    loss = check_rows(dataset, records, mlx_tok, mask_prompt=False)
    assert loss == sum(min(len(mlx_lm_process(r, mlx_tok)[0]), 257) - 1 for r in records)


# ---------------------------------------------------------------- cutting and packing


def test_records_longer_than_seq_len_are_cut_and_counted(tmp_path, tok, mlx_tok, capsys):
    records = chat_records(24)
    records[0]["messages"][-1]["content"] *= 3  # the first sample inspect shows is cut
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    seq_len = 128
    lengths = [len(expected(r, mlx_tok)[0]) for r in records]
    over = [n - (seq_len + 1) for n in lengths if n > seq_len + 1]
    assert 0 < len(over) < len(records)

    dataset = chat(path, tok, seq_len=seq_len)
    check_rows(dataset, records, mlx_tok)  # a cut record keeps its first seq_len + 1 tokens
    stats = dataset.stats()
    assert stats["train"]["cut_records"] + stats["val"]["cut_records"] == len(over)
    assert stats["train"]["cut_tokens"] + stats["val"]["cut_tokens"] == sum(over)

    common = [path, "--format", "chat", "--set", f"tokenizer={tok}", "--set", f"{seq_len=}"]
    assert testing.run_kd("data", "inspect", *common, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["train"]["cut_records"] == stats["train"]["cut_records"]
    assert report["stats"]["val"]["cut_tokens"] == stats["val"]["cut_tokens"]
    first = report["samples"][0]
    assert first["line"] == 1 and first["tokens"] == lengths[0] > seq_len + 1
    assert first["cut_tokens"] == lengths[0] - (seq_len + 1)
    assert testing.run_kd("data", "inspect", *common) == 0
    out = capsys.readouterr().out
    assert f"cut {stats['train']['cut_records']} records" in out
    assert "⟦" + records[0]["messages"][2]["content"][:12] in out  # a loss span marked


def test_packing_makes_padding_a_small_share(tmp_path, tok, mlx_tok):
    records = completion_records(120)
    path = write_jsonl(tmp_path / "short.jsonl", records)
    packed = chat(path, tok, seq_len=512)
    single = chat(path, tok, seq_len=512, pack=False)
    p, s = packed.stats()["train"], single.stats()["train"]
    assert s["padding_share"] > 0.6 and p["padding_share"] < 0.25
    assert p["loss_tokens"] == s["loss_tokens"] and p["overflow_records"] == 0
    assert packed.num_examples("train") * 3 < single.num_examples("train")
    check_rows(packed, records, mlx_tok)


# ---------------------------------------------------------------- bad records


def test_bad_lines_are_rejected_with_their_numbers_and_the_rest_kept(tmp_path, tok):
    good = json.dumps(chat_records(1)[0])
    user = {"role": "user", "content": "hi"}
    lines = [
        good,  # 1
        '{"messages": [',  # 2
        "[1, 2]",  # 3
        json.dumps({"messages": "hello"}),  # 4
        json.dumps({"messages": [user]}),  # 5
        json.dumps({"messages": [{"role": "robot", "content": "x"}, user]}),  # 6
        json.dumps({"messages": [{"role": "user", "content": ["x"]}, user]}),  # 7
        json.dumps({"prompt": "a"}),  # 8
        json.dumps({"prompt": 1, "completion": "x"}),  # 9
        json.dumps({"text": ""}),  # 10
        "",  # 11: blank, skipped
        json.dumps({"text": "A line of prose."}),  # 12
        json.dumps({"messages": [user, {"role": "assistant"}]}),  # 13
    ]
    path = tmp_path / "bad.jsonl"
    body = "\n".join(lines).encode() + b'\n{"text": "caf\xe9"}\r\n' + good.encode() + b"\r\n"
    path.write_bytes(body)  # 14: not UTF-8; 15: good (CRLF line ends)
    dataset = chat(path, tok)
    reasons = {r["line"]: r["reason"] for r in dataset.rejected}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14]
    for line, words in {
        2: "not JSON",
        3: "not a JSON object",
        4: "'messages' must be a non-empty list",
        5: "no assistant turn",
        6: "unknown role 'robot'",
        7: "'content' must be a string",
        8: "needs 'messages'",
        9: "must be strings",
        10: "non-empty string",
        13: "message 2 (assistant): 'content' must be a string",
        14: "UTF-8",
    }.items():
        assert words in reasons[line], (line, reasons[line])
    assert dataset.records == 3 and dataset.records_read == 14
    assert [s["line"] for s in dataset.inspect(limit=5)["samples"]] == [1, 12, 15]


def test_a_record_the_template_refuses_is_rejected_when_rendered(tmp_path):
    strict = QWEN_TEMPLATE.replace(
        "{%- for message in messages %}",
        "{%- for message in messages %}{%- if 'FORBIDDEN' in (message.content or '') %}"
        "{{ raise_exception('no forbidden words') }}{%- endif %}",
        1,
    )
    folder = make_tokenizer(tmp_path / "strict", strict)
    records = chat_records(6)
    records[4]["messages"][1]["content"] = "FORBIDDEN words"
    dataset = chat(write_jsonl(tmp_path / "chat.jsonl", records), folder)
    assert dataset.rejected == []  # found when the record is first rendered
    stats = dataset.stats()
    assert stats["train"]["rejected"] + stats["val"]["rejected"] == 1
    [refused] = dataset.rejected
    assert refused["line"] == 5 and "no forbidden words" in refused["reason"]


def test_a_tokenizer_without_a_chat_template_is_an_error_naming_it(tmp_path):
    plain = make_tokenizer(tmp_path / "plain", template=None)
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(3))
    with pytest.raises(kdcore.SpecError, match=f"{plain}.*no chat template"):
        chat(path, plain)
    texts = write_jsonl(tmp_path / "text.jsonl", text_records(5))
    assert chat(texts, plain, seq_len=32).num_examples("train") >= 1  # text needs none
    with pytest.raises(kdcore.SpecError, match="no tokenizer.json"):
        chat(path, tmp_path)


# ---------------------------------------------------------------- determinism, prompts


def test_batches_are_a_pure_function_of_seed_and_index(tmp_path, tok):
    records = chat_records(40) + completion_records(20) + text_records(20)
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    zipped = write_jsonl(tmp_path / "mixed.jsonl.gz", records)
    a = chat(path, tok, seq_len=64)
    b = chat(zipped, tok, seq_len=64)
    for i in (7, 0, 3):  # any order, any cache state
        a.batch(i, 4)
    for i in (0, 3, 7):
        one, two = a.batch(i, 4), b.batch(i, 4)
        for key in one:
            np.testing.assert_array_equal(one[key], two[key])
    assert a.fingerprint() == b.fingerprint()
    other = app.build(
        "dataset", "chat", kdcore.Setup(seed=1), path=str(path), tokenizer=str(tok), seq_len=64
    )
    assert other.fingerprint() == a.fingerprint()  # the rows do not depend on the seed
    assert not np.array_equal(other.batch(0, 4)["example_index"], a.batch(0, 4)["example_index"])
    epoch = a.num_examples("train")
    seen = np.concatenate([a.batch(i, 4)["example_index"] for i in range(epoch // 4)])
    assert len(set(seen.tolist())) == len(seen)  # without replacement within an epoch


def test_prompts_are_what_the_template_renders_before_the_first_assistant_turn(
    tmp_path, tok, mlx_tok
):
    records = chat_records(10) + text_records(5) + completion_records(5)
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    dataset = chat(path, tok, seq_len=64, val_fraction=0.0)
    assert dataset.num_prompts("train") == 15  # text records have no prompt
    prompts = dataset.prompts(0, 15)
    assert prompts == dataset.prompts(0, 15)
    wanted = []
    for r in records:
        if "text" in r:
            continue
        messages = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), 1)
        wanted.append(
            mlx_tok.apply_chat_template(
                messages[:first], tools=r.get("tools"), add_generation_prompt=True
            )
        )
    assert sorted(prompts) == sorted(wanted)
    assert all(p[-3:] == mlx_tok.encode("<|im_start|>assistant\n")[-3:] for p in prompts)
    assert dataset.prompts(1, 15) != prompts  # the next epoch, another order
    assert [len(p) for p in dataset.prompts(0, 4, max_tokens=10)] == [10] * 4


# ---------------------------------------------------------------- streaming

STREAM = """
import json, resource, sys
from kdcore import Setup
from kdcore.data.chat import ChatConfig, ChatDataset  # no registry: no plugins loaded

tok, small, big = sys.argv[1:4]
scale = 1 if sys.platform.startswith("linux") else 1024  # ru_maxrss: KiB on Linux


def resident_kib():  # the process's RSS now (Linux), else its peak so far
    try:
        with open("/proc/self/status") as status:
            return next(int(x.split()[1]) for x in status if x.startswith("VmRSS:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


warm = ChatDataset(ChatConfig(path=small, tokenizer=tok, seq_len=64), Setup())
warm.batch(0, 8)  # imports, the tokenizer, the template: all loaded before the baseline
base = resident_kib()
# every token carries loss: the records are far longer than seq_len, and a split whose
# assistant turns are all cut away is refused
data = ChatDataset(ChatConfig(path=big, tokenizer=tok, seq_len=64, mask_prompt=False), Setup())
for i in range(4):
    data.batch(i, 8)
next(data.batches(8, "val"))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
print(json.dumps({"growth_mib": (peak - base) / 1024, "records": data.records}))
"""


def test_a_large_file_streams_in_bounded_memory(tmp_path, tok):
    """A 1 GiB JSONL (131,072 chat records of 8 KiB) is indexed and batched while the
    process's peak RSS stays under 200 MiB above its RSS before (the peak is over the whole
    process, so this errs high): reading the file whole would take 1 GiB more. The index
    keeps ~30 bytes a record; records are read, rendered and tokenized a segment at a time
    (18 MiB measured alone at 320 MiB; 164 MiB once, in a full suite run beside two heavy
    jobs: allocator and tokenizer-thread buffers, not the file). The file is written and
    removed by the test (1 GiB of disk for its duration)."""
    small = write_jsonl(tmp_path / "small.jsonl", chat_records(20))
    words = " ".join(corpus_lines(400))
    record = {
        "messages": [
            {"role": "user", "content": words[:4000]},
            {"role": "assistant", "content": words[4000:8000]},
        ]
    }
    line = json.dumps(record)
    line = (line[:-3] + " " * (8191 - len(line)) + line[-3:] + "\n").encode()
    assert len(line) == 8192 and json.loads(line) == record
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as handle:
        block = line * 1024
        for _ in range(128):
            handle.write(block)
    assert big.stat().st_size == 1 << 30
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(STREAM), str(tok), str(small), str(big)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        big.unlink()  # pytest keeps recent tmp folders: not 1 GiB of them
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["records"] == 128 * 1024
    assert result["growth_mib"] < 200, result


# Qwen3's way with reasoning, cut down: earlier assistant turns lose their <think> part, so
# the conversation does not render prefix by prefix.
REASONING_TEMPLATE = """\
{%- set ns = namespace(last_user=0) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}\
{%- endif %}{%- endfor %}
{%- for m in messages %}
    {%- if m.role == 'assistant' %}
        {%- set content = m.content %}
        {%- if loop.index0 < ns.last_user and '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def test_a_template_that_rewrites_earlier_turns_still_masks_every_turn(tmp_path):
    from mlx_lm.tokenizer_utils import load

    folder = make_tokenizer(tmp_path / "reasoning", REASONING_TEMPLATE)
    lines = corpus_lines(8, 2000)
    records = [
        {
            "messages": [
                {"role": "user", "content": lines[i]},
                {"role": "assistant", "content": f"<think>{lines[i + 1]}</think>\n\nYes."},
                {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": f"<think>{lines[i + 2]}</think>\n\nNo."},
            ]
        }
        for i in range(0, 6, 3)
    ]
    dataset = chat(write_jsonl(tmp_path / "think.jsonl", records), folder, seq_len=256)
    assert dataset.rejected == []
    wrapper = load(folder)
    for i, record in enumerate(records):
        text = dataset.render(i)
        assert "Yes." in text and lines[3 * i + 1] not in text  # the first turn was rewritten
        want_ids, want_carries = expected(record, wrapper)
        enc = dataset.encode(i)
        np.testing.assert_array_equal(enc.ids, want_ids)
        np.testing.assert_array_equal(enc.carries, want_carries)
        loss_text = dataset.tokenizer.decode(enc.ids[enc.carries])
        assert loss_text == f"Yes.<|im_end|>\n<think>{lines[3 * i + 2]}</think>\n\nNo.<|im_end|>\n"


# ---------------------------------------------------------------- kd eval --data (issue 30)


def test_kd_eval_scores_chat_jsonl_on_the_assistant_tokens(tmp_path, tok, mlx_tok, capsys):
    """``kd eval RUN --data chat.jsonl`` renders the records with the run's template, one a
    row, and scores exactly the tokens mlx-lm's own rendering says each assistant turn adds."""
    train = write_jsonl(tmp_path / "train.jsonl", chat_records(21))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_chat_spec(train, tok, seq_len=64)))
    assert testing.run_kd("distill", spec, "--output", tmp_path / "run") == 0
    held_out = chat_records(6, start=200) + completion_records(3)
    path = write_jsonl(tmp_path / "held-out.jsonl", held_out)
    capsys.readouterr()
    argv = ["eval", tmp_path / "run", "--data", path, "--batches", "50", "--json"]
    assert testing.run_kd(*argv) == 0
    report = json.loads(capsys.readouterr().out)
    # one record a row, cut at seq_len + 1 tokens: the oracle's loss marks of that part
    wanted = sum(int(expected(r, mlx_tok)[1][:65].sum()) for r in held_out)
    assert report["tokens"] == wanted > 0
    assert report["split"] == str(path)
    assert 0 < report["val_loss"] < 20


def test_kd_eval_says_when_chat_records_have_no_template_to_render_them(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    app.distill(testing.tiny_spec(corpus, steps=1), output=run, progress=False)  # bytes
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(2))
    capsys.readouterr()
    assert testing.run_kd("eval", run, "--data", path) == 2
    assert "chat template" in capsys.readouterr().err
