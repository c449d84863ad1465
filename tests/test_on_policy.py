"""On-policy distillation (``train.on_policy``, as TRL's GKD defines it) and sequence-level
KD (``kd sample``): a share ``lmbda`` of batches is the student's own continuations of the
batch's prompts, scored by the teachers, and every token loss applies to the generated
tokens only."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import kdcore
from kdcore import IGNORE_INDEX, app, testing
from kdcore.engine.onpolicy import sample_continuations
from kdcore.models.transformer import Transformer, TransformerConfig

NEWLINE = 10
MAX_NEW = 8


# ---------------------------------------------------------------- data and specs


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, corpus) -> Path:
    """Prompt/response records of different prompt lengths (2 to 15 bytes)."""
    lines = [x.strip() for x in corpus.read_text(encoding="utf-8").splitlines() if x.strip()]
    records = [
        {"prompt": a[: 1 + i % 14] + ":", "response": " " + b[:12] + "\n"}
        for i, (a, b) in enumerate(zip(lines[0:400:2], lines[1:400:2]))
    ]
    return _write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", records)


def on_policy_spec(
    corpus: Path, pairs: Path, teacher_dir: Path, losses=None, steps: int = 6, **on_policy
) -> dict:
    spec = testing.tiny_spec(
        corpus, losses or [{"name": "gjsd"}], steps=steps, teachers=[{"path": str(teacher_dir)}]
    )
    spec["data"] = {
        "name": "jsonl",
        "params": {"path": str(pairs), "seq_len": 32, "val_fraction": 0.1},
    }
    if on_policy:
        spec["train"]["on_policy"] = {
            "max_new_tokens": MAX_NEW,
            "stop_tokens": [NEWLINE],
            **on_policy,
        }
    return spec


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _train_records(run: Path) -> list[dict]:
    """The training records without the wall-clock figures (``tokens_per_s``, ``step_s``)."""
    return [
        {k: v for k, v in r.items() if not k.endswith("_s")} for r in _records(run) if "loss" in r
    ]


def _weights(run: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run / "student" / "model.safetensors")).items()}


def _first_loss(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


# ---------------------------------------------------------------- lmbda 0: off-policy


def test_lmbda_0_never_samples_and_is_the_off_policy_run_bit_for_bit(
    tmp_path, corpus, pairs, teacher_dir
):
    off = on_policy_spec(corpus, pairs, teacher_dir)
    zero = on_policy_spec(corpus, pairs, teacher_dir, lmbda=0.0)
    app.distill(app.load_spec(off), output=tmp_path / "off", progress=False)
    app.distill(app.load_spec(zero), output=tmp_path / "zero", progress=False)
    assert _train_records(tmp_path / "zero") == _train_records(tmp_path / "off")
    assert all("on_policy" not in r for r in _train_records(tmp_path / "zero"))
    a, b = _weights(tmp_path / "off"), _weights(tmp_path / "zero")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------- lmbda 1: every batch


def test_lmbda_1_samples_every_batch_and_the_loss_is_on_the_generated_tokens(
    corpus, pairs, teacher_dir
):
    from kdcore.engine.step import gradients

    spec = on_policy_spec(corpus, pairs, teacher_dir, lmbda=1.0)
    run = testing.build_run(app.load_spec(spec))
    rows = run.dataset.batch(0, 4)
    mx.random.seed(5)
    batch = {k: np.array(v) for k, v in testing.prepare_batch(run, rows, 0).items()}

    # The same random state, the core sampler on the batch's prompts (the tokens up to the
    # first loss-carrying position: the last one predicts the first response token).
    prompts = [rows["input_ids"][b, : _first_loss(rows["mask"][b]) + 1] for b in range(4)]
    assert len({len(p) for p in prompts}) > 1  # prompts of different lengths in one batch
    mx.random.seed(5)
    tokens, made = app.generate(
        run.student, [p.tolist() for p in prompts], MAX_NEW, stop_token=[NEWLINE]
    )
    tokens, made = np.array(tokens), np.array(made)
    B, L = batch["input_ids"].shape
    assert set(batch) >= {"input_ids", "labels", "mask"}
    for b, prompt in enumerate(prompts):
        P = len(prompt)
        gen_cols = np.flatnonzero(made[b])
        generated = tokens[b, gen_cols]
        n = len(generated)
        assert 1 <= n <= MAX_NEW
        if n < MAX_NEW:
            assert generated[-1] == NEWLINE and NEWLINE not in generated[:-1]
        np.testing.assert_array_equal(batch["input_ids"][b, :P], prompt)
        # inputs: prompt then the generated tokens but the last; the loss is on exactly the
        # positions that predict a generated token, up to and including the stop token
        np.testing.assert_array_equal(batch["input_ids"][b, P : P + n - 1], generated[:-1])
        expected_mask = np.zeros(L, np.float32)
        expected_mask[P - 1 : P - 1 + n] = 1
        np.testing.assert_array_equal(batch["mask"][b], expected_mask)
        np.testing.assert_array_equal(batch["labels"][b, P - 1 : P - 1 + n], generated)
        assert (batch["labels"][b][expected_mask == 0] == IGNORE_INDEX).all()
        # labels are the next tokens of the inputs
        inside = np.flatnonzero(expected_mask[:-1])
        np.testing.assert_array_equal(batch["labels"][b, inside], batch["input_ids"][b, inside + 1])
    assert L <= rows["input_ids"].shape[1]  # a sampled row is no longer than a data row

    # The step: the teachers score the sampled ids; the metrics say so.
    seen = []
    teacher = run.teachers[0]
    original = teacher.signal

    def spy(b, capture=frozenset(), student=None):
        seen.append(np.array(b["input_ids"]))
        return original(b, capture, student)

    teacher.signal = spy
    mx.random.seed(5)
    total, _terms, metrics, _grads, ntok = gradients(run, 0)
    assert math.isfinite(total.item())
    np.testing.assert_array_equal(seen[-1], batch["input_ids"])
    assert metrics["on_policy"].item() == 1.0
    assert metrics["sample_length"].item() == pytest.approx(batch["mask"].sum() / B)
    assert ntok.loss_tokens == int(batch["mask"].sum())
    assert ntok.tokens == batch["input_ids"].size


def test_a_batch_a_loss_already_sampled_is_not_sampled_again(corpus, pairs, teacher_dir):
    spec = on_policy_spec(
        corpus,
        pairs,
        teacher_dir,
        losses=[{"name": "minillm", "params": {"lmbda": 1.0, "max_new_tokens": 2}}],
        lmbda=1.0,
    )
    run = testing.build_run(app.load_spec(spec))
    rows = run.dataset.batch(0, 4)
    batch = testing.prepare_batch(run, rows, 0)
    assert "sample_mask" in batch
    # minillm's layout: the data rows first, unchanged
    np.testing.assert_array_equal(np.array(batch["input_ids"][:4, :32]), rows["input_ids"])


# ---------------------------------------------------------------- schedules and resume


def test_lmbda_is_schedulable(tmp_path, corpus, pairs, teacher_dir):
    spec = on_policy_spec(
        corpus,
        pairs,
        teacher_dir,
        steps=40,
        lmbda={"schedule": "linear", "start": 0.0, "end": 1.0},
        max_new_tokens=1,
    )
    app.distill(app.load_spec(spec), output=tmp_path / "run", progress=False)
    train = _train_records(tmp_path / "run")
    assert len(train) == 40
    lmbdas = [r["on_policy/lmbda"] for r in train]
    assert lmbdas == pytest.approx([s / 40 for s in range(40)])
    flags = [r["on_policy"] for r in train]
    assert set(flags) == {0.0, 1.0}
    assert flags[0] == 0.0  # lmbda 0 at step 0
    assert sum(flags[:10]) < sum(flags[-10:])
    assert all(r["sample_length"] == (1.0 if r["on_policy"] else 0.0) for r in train)


def test_a_resumed_run_draws_the_same_samples(tmp_path, corpus, pairs, teacher_dir):
    spec = on_policy_spec(corpus, pairs, teacher_dir, steps=8, lmbda=0.5)
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps(spec))
    half = json.loads(json.dumps(spec))
    half["train"]["steps"] = 4
    half["train"]["final_checkpoint"] = True  # the half run is extended: keep its end state
    first = tmp_path / "half.json"
    first.write_text(json.dumps(half))
    assert testing.run_kd("distill", whole, "--output", tmp_path / "a") == 0
    assert testing.run_kd("distill", first, "--output", tmp_path / "b") == 0
    assert testing.run_kd("distill", whole, "--output", tmp_path / "b", "--resume") == 0
    a, b = _train_records(tmp_path / "a"), _train_records(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert set(r["on_policy"] for r in a) == {0.0, 1.0}
    assert a == b


# ---------------------------------------------------------------- every token loss


@pytest.mark.parametrize("loss", ["gjsd", "reverse_kl", "hinton", "tvd"])
def test_token_losses_train_on_policy(tmp_path, corpus, pairs, teacher_dir, loss):
    spec = on_policy_spec(corpus, pairs, teacher_dir, [{"name": loss}], steps=3, lmbda=1.0)
    before = testing.build_run(app.load_spec(spec))
    initial = {k: np.array(v) for k, v in tree_flatten(before.student.parameters())}
    app.distill(app.load_spec(spec), output=tmp_path / "run", progress=False)
    train = _train_records(tmp_path / "run")
    assert [r["on_policy"] for r in train] == [1.0, 1.0, 1.0]
    assert all(math.isfinite(r["loss"]) and r["sample_length"] > 0 for r in train)
    after = _weights(tmp_path / "run")
    assert any(not np.array_equal(initial[k], after[k]) for k in initial)


# ---------------------------------------------------------------- bad configuration


@pytest.mark.parametrize(
    "field, value, path",
    [
        ("lmbda", 1.5, "$.train.on_policy.lmbda"),
        ("lmbda", -0.1, "$.train.on_policy.lmbda"),
        ("max_new_tokens", 0, "$.train.on_policy.max_new_tokens"),
        ("temperature", 0.0, "$.train.on_policy.temperature"),
        ("top_p", 0.0, "$.train.on_policy.top_p"),
        ("top_p", 1.5, "$.train.on_policy.top_p"),
        ("teacher_mix_alpha", 1.0, "$.train.on_policy.teacher_mix_alpha"),
        ("prompt_length", 0, "$.train.on_policy.prompt_length"),
        ("stop_tokens", [-1], "$.train.on_policy.stop_tokens"),
        ("stop_tokens", ["x"], "$.train.on_policy.stop_tokens"),
        ("lambda", 0.5, "$.train.on_policy.lambda"),
    ],
)
def test_a_bad_on_policy_table_is_an_error_naming_the_field(
    tmp_path, capsys, corpus, pairs, teacher_dir, field, value, path
):
    spec = on_policy_spec(corpus, pairs, teacher_dir, lmbda=0.5)
    spec["train"]["on_policy"][field] = value
    file = tmp_path / "spec.json"
    file.write_text(json.dumps(spec))
    assert testing.run_kd("validate", file) == 2
    err = capsys.readouterr().err
    assert path in err, err
    assert "Traceback" not in err


def test_what_only_the_run_can_check_is_an_error_naming_the_field(tmp_path, corpus, pairs):
    # teacher-mixed sampling without a teacher
    spec = on_policy_spec(corpus, pairs, Path("unused"), [{"name": "ce"}], lmbda=1.0)
    spec.pop("teachers")
    spec["train"]["on_policy"]["teacher_mix_alpha"] = 0.5
    with pytest.raises(kdcore.SpecError, match=r"\$\.train\.on_policy\.teacher_mix_alpha"):
        app.distill(app.load_spec(spec), output=tmp_path / "a", progress=False)
    # no room for a prompt in 32-token rows
    spec = on_policy_spec(corpus, pairs, Path("unused"), [{"name": "ce"}], lmbda=1.0)
    spec.pop("teachers")
    spec["train"]["on_policy"]["max_new_tokens"] = 40
    with pytest.raises(kdcore.SpecError, match=r"\$\.train\.on_policy\.max_new_tokens"):
        app.distill(app.load_spec(spec), output=tmp_path / "b", progress=False)
    # a schedule that leaves [0, 1]
    spec = on_policy_spec(corpus, pairs, Path("unused"), [{"name": "ce"}], steps=4)
    spec.pop("teachers")
    spec["train"]["on_policy"] = {"lmbda": {"schedule": "linear", "start": 0.0, "end": 2.0}}
    with pytest.raises(kdcore.SpecError, match=r"1\.5 at step 3 .*\$\.train\.on_policy\.lmbda"):
        app.distill(app.load_spec(spec), output=tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "checkpoints").exists()  # stopped before the first step
    # a temperature schedule that reaches 0, read at the first batch (not sampled: lmbda 0
    # there)
    spec["train"]["on_policy"] = {
        "lmbda": {"schedule": "linear", "start": 0.0, "end": 1.0},
        "temperature": {"schedule": "linear", "start": 1.0, "end": -1.0},
    }
    with pytest.raises(kdcore.SpecError, match=r"\$\.train\.on_policy\.temperature"):
        app.distill(app.load_spec(spec), output=tmp_path / "d", progress=False)
    assert not (tmp_path / "d" / "checkpoints").exists()


def test_teacher_mixed_sampling_trains(tmp_path, corpus, pairs, teacher_dir):
    spec = on_policy_spec(
        corpus, pairs, teacher_dir, steps=2, lmbda=1.0, teacher_mix_alpha=0.5, top_p=0.9
    )
    run = testing.build_run(app.load_spec(spec))
    rows = run.dataset.batch(0, 4)
    batch = {k: np.array(v) for k, v in testing.prepare_batch(run, rows, 0).items()}
    for b in range(4):
        P = _first_loss(rows["mask"][b]) + 1
        np.testing.assert_array_equal(batch["input_ids"][b, :P], rows["input_ids"][b, :P])
        n = int(batch["mask"][b].sum())
        assert 1 <= n <= MAX_NEW and batch["mask"][b, P - 1 : P - 1 + n].all()
    app.distill(app.load_spec(spec), output=tmp_path / "run", progress=False)
    assert [r["on_policy"] for r in _train_records(tmp_path / "run")] == [1.0, 1.0]


def test_a_text_dataset_uses_the_prompt_length(corpus, teacher_dir):
    spec = testing.tiny_spec(corpus, [{"name": "gjsd"}], teachers=[{"path": str(teacher_dir)}])
    spec["train"]["on_policy"] = {"lmbda": 1.0, "max_new_tokens": 5, "prompt_length": 7}
    run = testing.build_run(app.load_spec(spec))
    rows = run.dataset.batch(0, 4)
    batch = {k: np.array(v) for k, v in testing.prepare_batch(run, rows, 0).items()}
    np.testing.assert_array_equal(batch["input_ids"][:, :7], rows["input_ids"][:, :7])
    expected = np.zeros(batch["mask"].shape, np.float32)
    expected[:, 6:11] = 1  # no stop token: the byte tokenizer has no end-of-sequence
    np.testing.assert_array_equal(batch["mask"], expected)


# ---------------------------------------------------------------- kd sample


def _byte_chat_tokenizer(folder: Path) -> Path:
    """A Hugging Face byte-level tokenizer (ids = bytes, as ``ByteTokenizer``) with a plain
    chat template."""
    from kdcore.tokenizers.hf import byte_level_tokenizer_json, write_hf_tokenizer

    write_hf_tokenizer(folder, byte_level_tokenizer_json())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _dataset(name: str, **params):
    component = app.get_registry().get("dataset", name)
    return component.factory(app.make_config("dataset", name, **params), kdcore.Setup())


@pytest.mark.parametrize("fmt", ["completion", "messages"])
def test_kd_sample_writes_a_dataset_the_jsonl_and_chat_datasets_read(
    tmp_path, capsys, corpus, pairs, teacher_dir, fmt
):
    spec = on_policy_spec(corpus, pairs, teacher_dir)
    file = tmp_path / "spec.json"
    file.write_text(json.dumps(spec))
    out = tmp_path / "answers.jsonl.gz"
    code = testing.run_kd(
        "sample",
        file,
        "--output",
        out,
        "--split",
        "val",
        "--format",
        fmt,
        "--max-new-tokens",
        MAX_NEW,
        "--stop-token",
        NEWLINE,
        "--truncated",
        "keep",  # every answer, cut or not: the file has a record per prompt
        "--json",
    )
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(x) for x in gzip.open(out, "rt", encoding="utf-8")]
    val = _dataset("jsonl", path=str(pairs), seq_len=32, val_fraction=0.1)
    assert len(records) == val.num_examples("val") == summary["records"]
    source = [json.loads(x) for x in pairs.read_text().splitlines()]
    prompts = [r["prompt"] for r in source[-len(records) :]]
    if fmt == "completion":
        assert [r["prompt"] for r in records] == prompts
        answers = [r["completion"] for r in records]
    else:
        assert [r["messages"][0] for r in records] == [
            {"role": "user", "content": p} for p in prompts
        ]
        assert all(r["messages"][1]["role"] == "assistant" for r in records)
        answers = [r["messages"][1]["content"] for r in records]
    assert all(0 < len(a) <= MAX_NEW for a in answers)  # one byte token: at most a character
    assert sum(a.endswith("\n") for a in answers) == summary["stopped"]

    tok = _byte_chat_tokenizer(tmp_path / "tok")
    chat = _dataset("chat", path=str(out), tokenizer=str(tok), seq_len=64, val_fraction=0.0)
    assert chat.records == len(records) and chat.num_tokens("train") > 0
    if fmt == "completion":
        plain = tmp_path / "plain.jsonl"
        plain.write_bytes(gzip.open(out).read())
        read = _dataset("jsonl", path=str(plain), response_key="completion", val_fraction=0.0)
        assert read.num_examples("train") == len(records) and not read.rejected


def test_kd_sample_from_a_chat_dataset_keeps_the_conversation(tmp_path, capsys, teacher_dir):
    tok = _byte_chat_tokenizer(tmp_path / "tok")
    conversations = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Say {i}"},
                {"role": "assistant", "content": f"{i}"},
                {"role": "user", "content": "More"},
                {"role": "assistant", "content": "No."},
            ]
        }
        for i in range(10)
    ]
    data = _write_jsonl(tmp_path / "chat.jsonl", conversations)
    spec = testing.tiny_spec(data, teachers=[{"path": str(teacher_dir)}])
    spec["data"] = {
        "name": "chat",
        "params": {"path": str(data), "tokenizer": str(tok), "seq_len": 32, "val_fraction": 0.2},
    }
    file = tmp_path / "spec.json"
    file.write_text(json.dumps(spec))
    out = tmp_path / "answers.jsonl"
    code = testing.run_kd(  # 4 tokens: cut answers, kept to check the conversations
        "sample",
        file,
        "--output",
        out,
        "--split",
        "train",
        "--max-new-tokens",
        4,
        "--truncated",
        "keep",
    )
    assert code == 0, capsys.readouterr().err
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 8
    for record, source in zip(records, conversations):
        assert record["messages"][:2] == source["messages"][:2]
        assert record["messages"][2]["role"] == "assistant"
        assert len(record["messages"]) == 3
    chat = _dataset("chat", path=str(out), tokenizer=str(tok), seq_len=64, val_fraction=0.0)
    assert chat.records == 8


def test_kd_sample_drops_marks_or_keeps_answers_cut_at_the_token_limit(
    tmp_path, capsys, corpus, pairs, teacher_dir
):
    """An answer that reaches --max-new-tokens without a stop token is not a finished turn:
    dropped by default, written with ``"truncated": true`` by ``mark``, as is by ``keep``;
    the sampling is the same whichever is chosen."""
    file = tmp_path / "spec.json"
    file.write_text(json.dumps(on_policy_spec(corpus, pairs, teacher_dir)))
    runs = {}
    for policy in ("default", "drop", "mark", "keep"):
        out = tmp_path / f"{policy}.jsonl"
        argv = ["sample", file, "--output", out, "--split", "val", "--max-new-tokens", MAX_NEW]
        argv += ["--stop-token", NEWLINE, "--format", "completion", "--json"]
        argv += [] if policy == "default" else ["--truncated", policy]
        assert testing.run_kd(*argv) == 0, capsys.readouterr().err
        summary = json.loads(capsys.readouterr().out)
        runs[policy] = summary, [json.loads(x) for x in out.read_text().splitlines()]
    summary, kept = runs["keep"]
    cut = [not r["completion"].endswith("\n") for r in kept]  # the stop token is kept
    assert 0 < sum(cut) < len(kept), "the test needs both kinds of answer"
    assert summary["truncated"] == sum(cut) and summary["stopped"] == len(kept) - sum(cut)
    assert summary["answered"] == summary["records"] == len(kept)
    _, marked = runs["mark"]
    assert [r.pop("truncated", False) for r in marked] == cut
    assert marked == kept
    finished = [r for r, c in zip(kept, cut) if not c]
    assert runs["drop"][1] == runs["default"][1] == finished
    assert runs["default"][0]["truncated_policy"] == "drop"
    assert runs["drop"][0]["records"] == len(finished)
    assert runs["drop"][0]["truncated"] == sum(cut)


def test_kd_sample_errors_name_the_place(tmp_path, capsys, corpus, pairs):
    spec = on_policy_spec(corpus, pairs, Path("unused"))
    spec.pop("teachers")
    file = tmp_path / "spec.json"
    file.write_text(json.dumps(spec))
    assert testing.run_kd("sample", file, "--output", tmp_path / "x.jsonl") == 2
    err = capsys.readouterr().err
    assert "--teacher" in err and "$.teachers" in err
    assert not (tmp_path / "x.jsonl").exists()


# ---------------------------------------------------------------- minillm on the core sampler


def test_minillm_samples_with_the_core_kv_cached_sampler(corpus, pairs, teacher_dir):
    """Without teacher mixing, minillm's continuations come from ``app.generate`` (the
    KV cache), with its importance weights ``q_T(y) / top_p(q_T)(y)`` from one forward."""
    T, top_p, P, N = 0.8, 0.9, 6, 5
    params = {"lmbda": 1.0, "prompt_length": P, "max_new_tokens": N}
    spec = on_policy_spec(
        corpus,
        pairs,
        teacher_dir,
        losses=[{"name": "minillm", "params": {**params, "temperature": T, "top_p": top_p}}],
    )
    run = testing.build_run(app.load_spec(spec))
    caches = []
    make_cache = run.student.make_cache

    def spy(left_padding):
        caches.append(list(left_padding))
        return make_cache(left_padding)

    run.student.make_cache = spy
    rows = run.dataset.batch(0, 4)
    batch = {k: np.array(v) for k, v in testing.prepare_batch(run, rows, 0).items()}
    assert caches == [[0, 0, 0, 0]]
    samples, mask = batch["input_ids"][4:], batch["sample_mask"][4:]
    targets, weights = batch["sample_targets"][4:], batch["sample_weights"][4:]
    logits = np.array(run.student(mx.array(samples)).logits, dtype=np.float64) / T

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    filtered = np.array(app.top_p_filter(mx.array(logits.astype(np.float32)), top_p))
    y = np.where(targets == IGNORE_INDEX, 0, targets)[..., None]
    want = np.exp(
        np.take_along_axis(log_softmax(logits), y, -1)
        - np.take_along_axis(log_softmax(filtered.astype(np.float64)), y, -1)
    )[..., 0]
    sel = mask > 0
    assert sel.sum() > 0
    np.testing.assert_allclose(weights[sel], want[sel], rtol=2e-3)
    assert (weights[~sel] == 1).all()


def test_the_on_policy_sampler_weighs_prompts_of_different_lengths_as_each_row_alone():
    """``sample_continuations`` (train.on_policy's and minillm's sampler) with prompts of
    different lengths, plain (KV cache; one more forward for the weights at top_p < 1) and
    teacher-mixed (the whole context per token): the layout is ``generate``'s, each
    generated token's weight ``q_T(y) / b(y)`` is the one read from its row run alone, and
    the model samples in eval mode and is handed back in its own mode."""
    from kdcore.engine.onpolicy import sample_continuations

    T, top_p, N, V = 0.7, 0.8, 6, 11
    mx.random.seed(0)
    config = app.TransformerConfig(vocab_size=V, dim=16, layers=1, heads=2)
    student, teacher = app.Transformer(config), app.Transformer(config)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    W = max(len(p) for p in prompts)
    modes = []

    def teacher_signal(batch, _student_output):
        modes.append(student.training)
        return kdcore.TeacherSignal(vocab_size=V, logits=teacher(batch["input_ids"]).logits)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    def top_p_probs(z):
        filtered = np.array(app.top_p_filter(mx.array(z.astype(np.float32)), top_p))
        return np.exp(log_softmax(filtered.astype(np.float64)))

    for alpha in (0.0, 0.4):
        signal = teacher_signal if alpha else None
        tokens, mask, weights = map(
            np.array,
            sample_continuations(
                student, prompts, N, T, top_p, teacher_signal=signal, teacher_mix_alpha=alpha
            ),
        )
        assert tokens.shape == mask.shape == weights.shape == (len(prompts), W + N)
        for b, prompt in enumerate(prompts):
            P = len(prompt)
            np.testing.assert_array_equal(tokens[b, W - P : W], prompt)
            assert (mask[b, :W] == 0).all() and (mask[b, W:] == 1).all()  # no stop token
            assert (weights[b, :W] == 1).all()
            generated = tokens[b, W:]
            row = mx.array(np.r_[prompt, generated[:-1]][None].astype(np.int32))
            s = np.array(student(row).logits, dtype=np.float64)[0, P - 1 :] / T
            t = np.array(teacher(row).logits, dtype=np.float64)[0, P - 1 :] / T
            behaviour = (1 - alpha) * top_p_probs(s) + alpha * top_p_probs(t)
            picked = np.arange(N), generated
            want = np.exp(log_softmax(s))[picked] / behaviour[picked]
            np.testing.assert_allclose(weights[b, W:], want, rtol=2e-3)
    assert len(modes) == N and not any(modes)  # the student sampled in eval mode
    assert student.training


# ---------------------------------------------------------------- docs name what exists

DOCS = Path(__file__).resolve().parents[1] / "docs"
# a glob such as `kdcore.testing.check_*` names no one thing: not read
DOTTED = r"`((?:kdcore|kd_[a-z_]+)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?![\w*.])"


def unresolved_names(text: str) -> list[str]:
    """The dotted kdcore / plugin names in backticks of ``text`` that import nothing."""
    import importlib
    import re

    missing = []
    for name in sorted(set(re.findall(DOTTED, text))):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                target = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    target = getattr(target, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    return missing


def test_the_scan_finds_a_name_that_is_gone():
    text = (
        "with `kd_cot.decoding.IncrementalDecoder`, `app.generate`, `kdcore.nothing` and "
        "`kdcore.testing.check_*`"
    )
    assert unresolved_names(text) == ["kd_cot.decoding.IncrementalDecoder", "kdcore.nothing"]


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_the_docs_name_only_modules_and_functions_that_exist(page):
    assert unresolved_names((DOCS / page).read_text(encoding="utf-8")) == []


def test_sampler_stops_at_the_stop_token_and_weighs_plain_samples_one():
    mx.random.seed(0)
    model = Transformer(TransformerConfig(vocab_size=6, dim=16, layers=1, heads=2))
    prompts = mx.array(np.arange(12).reshape(4, 3) % 6, dtype=mx.int32)
    tokens, gen_mask, weights = sample_continuations(model, prompts, 25, 2.0, 1.0, stop_token=3)
    tokens, gen_mask, weights = np.array(tokens), np.array(gen_mask), np.array(weights)
    np.testing.assert_array_equal(tokens[:, :3], np.array(prompts))
    assert (gen_mask[:, :3] == 0).all()
    stopped = 0
    for row in range(4):
        new = tokens[row, 3:]
        hits = np.flatnonzero(new == 3)
        end = hits[0] + 1 if hits.size else len(new)
        stopped += bool(hits.size)
        np.testing.assert_array_equal(gen_mask[row, 3:], np.arange(len(new)) < end)
    assert stopped >= 1
    # no teacher mixing and no top-p: the behaviour is the policy, every weight is 1
    np.testing.assert_allclose(weights, 1.0, rtol=1e-5)
