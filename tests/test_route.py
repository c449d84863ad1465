"""The ``route`` aggregator: each record's positions go to one teacher (by a record field, the
data source or a rule), each teacher runs only on the rows holding its positions, and the
routed loss is each teacher's loss on its own positions, summed and divided by the routed
tokens, in value and gradient; any teacher source, any tokenizer (through an aligner);
per-teacher figures in the log and the report; ``kd validate``'s errors."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import kdcore
from kdcore import app, testing
from kdcore.data.routing import record_teachers
from kdcore.engine.build import check_run
from kdcore.engine.step import loss_terms
from kdcore.errors import SpecError
from kdcore.io import write_json
from kdcore.models.mlxlm import create_mlxlm_dir
from kdcore.signal.aligned import position_mask
from kdcore.signal.route import RouteConfig
from kdcore.tokenizers.hf import train_bpe_tokenizer_json, write_hf_tokenizer

pytest.importorskip("mlx_lm")

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt").read_text()
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA = dict(
    model_type="llama",
    hidden_size=32,
    num_hidden_layers=1,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=400,
    tie_word_embeddings=False,
)
SEQ = 128
LOSSES = [{"name": "ce", "weight": 0.5}, {"name": "hinton", "weight": 0.5, "params": {}}]


def _template(folder: Path) -> Path:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    write_json(folder / "tokenizer_config.json", {**config, "chat_template": TEMPLATE})
    return folder


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def records(count: int, start: int = 0) -> list[dict]:
    """Short chat records; every third a sum ending "#### N" with ``teacher = "maths"``."""
    lines = [x.strip() for x in TEXT.splitlines() if x.strip()][start:]
    out = []
    for i in range(count):
        maths = i % 3 == 0
        answer = f"{i} and {i} make {2 * i}. #### {2 * i}" if maths else lines[2 * i + 1][:32]
        question = f"What is {i} plus {i}?" if maths else lines[2 * i][:32]
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        out.append({"teacher": "maths" if maths else "chat", "messages": messages})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A chat tokenizer, two teachers on it, one on another BPE, and the data files."""
    root = tmp_path_factory.mktemp("route")
    tok_json = train_bpe_tokenizer_json(TEXT[:20_000], 400, SPECIALS)
    tok = root / "tok"
    write_hf_tokenizer(tok, tok_json, "<|im_end|>")
    _template(tok)
    maths = _template(create_mlxlm_dir(root / "maths", LLAMA, tok_json, seed=1))
    chat = _template(create_mlxlm_dir(root / "chat", LLAMA, tok_json, seed=2))
    other = train_bpe_tokenizer_json(TEXT[20_000:40_000], 320)
    bpe = create_mlxlm_dir(root / "bpe", {**LLAMA, "vocab_size": 320}, other, seed=3)
    data = write_jsonl(root / "mixed.jsonl", records(90))
    both = records(90)
    write_jsonl(root / "gsm.jsonl", [r for r in both if r["teacher"] == "maths"])
    write_jsonl(root / "hh.jsonl", [r for r in both if r["teacher"] == "chat"])
    return {"root": root, "tok": tok, "maths": maths, "chat": chat, "bpe": bpe, "data": data}


def route_spec(world, route: dict | None = None, teachers=None, data=None, **kw) -> dict:
    teachers = teachers or [
        {"source": "mlx-lm", "path": str(world["maths"]), "label": "maths"},
        {"source": "mlx-lm", "path": str(world["chat"]), "label": "chat"},
    ]
    params = {"path": str(world["data"]), "tokenizer": str(world["tok"]), "seq_len": SEQ}
    spec = testing.tiny_spec(
        world["data"],
        kw.pop("losses", LOSSES),
        steps=kw.pop("steps", 3),
        teachers=teachers,
        data={"name": "chat", "params": {**params, "val_fraction": 0.2, **(data or {})}},
        aggregator={"name": "route", "params": route or {}},
        **kw,
    )
    if spec["student"]["model"]["name"] == "transformer":
        spec["student"]["model"]["params"]["max_seq_len"] = SEQ
    return spec


def batch_of(parts, index: int = 0, size: int = 4):
    return testing.prepare_batch(parts, parts.dataset.batch(index, size), 0)


def field_of(parts, record: int) -> str:
    return parts.dataset.source.read(record)["teacher"]


# ---------------------------------------------------------------- choosing the teacher


def test_route_by_field_follows_each_position_s_record(world):
    parts = testing.build_run(route_spec(world))
    labels = parts.aggregator.labels
    mixed = 0
    for index in range(3):
        batch = batch_of(parts, index)
        owners, ids = parts.aggregator.owners(batch), np.array(batch["record_id"])
        assert (ids >= 0).any()
        for b, p in zip(*np.nonzero(ids >= 0)):
            assert labels[owners[b, p]] == field_of(parts, int(ids[b, p]))
        assert (owners[ids < 0] == -1).all()  # padding: no teacher
        carries = np.array(batch["mask"]) > 0
        mixed += sum(len(set(owners[b][carries[b]])) == 2 for b in range(len(owners)))
    assert mixed > 0, "packed rows should hold records of both teachers"


def test_route_by_source_reads_the_file_of_each_record_and_keeps_val_from_each(world):
    data = {
        "path": {"gsm": str(world["root"] / "gsm.jsonl"), "hh": str(world["root"] / "hh.jsonl")}
    }
    route = {"by": "source", "map": {"gsm": "maths", "hh": "chat"}}
    parts = testing.build_run(route_spec(world, route, data=data))
    assert parts.dataset.source_names == ["gsm", "hh"]
    source = parts.dataset.source
    batch = batch_of(parts)
    owners, ids = parts.aggregator.owners(batch), np.array(batch["record_id"])
    for b, p in zip(*np.nonzero(ids >= 0)):
        path, _line = source.where(int(ids[b, p]))
        assert owners[b, p] == (0 if path.name == "gsm.jsonl" else 1)
    val = [r for batch in parts.dataset.batches(8, "val") for r in batch["record_id"].ravel()]
    assert {source.source_of(int(r)) for r in val if r >= 0} == {0, 1}


def test_route_by_rule_first_match_and_default(world):
    rule_sets = [
        # the first rule that matches wins: a sum matches both, and goes to maths
        {
            "rules": [
                {"pattern": r"#### \d+", "teacher": "maths"},
                {"pattern": ".", "teacher": "chat"},
            ]
        },
        # a rule on a field; what no rule matches goes to the default
        {
            "rules": [{"pattern": "^maths$", "teacher": "maths", "field": "teacher"}],
            "default": "chat",
        },
    ]
    for rules in rule_sets:
        parts = testing.build_run(route_spec(world, {"by": "rule", **rules}))
        batch = batch_of(parts)
        owners, ids = parts.aggregator.owners(batch), np.array(batch["record_id"])
        for b, p in zip(*np.nonzero(ids >= 0)):
            want = field_of(parts, int(ids[b, p]))
            assert parts.aggregator.labels[owners[b, p]] == want
    # without a default, what no rule matches is left out of the distillation terms
    route = {"by": "rule", "rules": [{"pattern": r"#### \d+", "teacher": "maths"}]}
    spec = route_spec(world, route, teachers=route_spec(world)["teachers"][:1])
    parts = testing.build_run(spec)
    batch = batch_of(parts)
    owners = parts.aggregator.owners(batch)
    assert (owners == -1).any() and (owners == 0).any()
    _, _, metrics = loss_terms(parts, parts.trainable, batch, parts.teacher_signals(batch), 0)
    routed = float(((owners == 0) * np.array(batch["mask"])).sum())
    assert float(metrics["route/maths/tokens"]) == routed < float(np.array(batch["mask"]).sum())


def test_route_by_source_reads_the_mixture_dataset_s_domains(world, tmp_path):
    pytest.importorskip("kd_amtml")  # the mixture dataset's plugin (installed with the suite)
    files = [tmp_path / "gsm.txt", tmp_path / "hh.txt"]
    for i, path in enumerate(files):
        path.write_text(TEXT[i * 6000 : (i + 1) * 6000], encoding="utf-8")
    teachers = [
        {"path": str(testing.save_random_model(tmp_path / "m", seed=1)), "label": "maths"},
        {"path": str(testing.save_random_model(tmp_path / "c", seed=2)), "label": "chat"},
    ]
    data = {"name": "mixture", "params": {"paths": [str(f) for f in files], "seq_len": 32}}
    route = {
        "aggregator": {
            "name": "route",
            "params": {"by": "source", "map": {"gsm": "maths", "hh": "chat"}},
        }
    }
    spec = testing.tiny_spec(files[0], LOSSES, teachers=teachers, data=data, **route)
    parts = testing.build_run(spec)
    batch = batch_of(parts)
    owners, domain = parts.aggregator.owners(batch), np.array(batch["domain"])
    assert (owners == domain[:, None]).all() and len(set(domain)) == 2
    compare_with_hand(parts, batch, 2.0)


# ---------------------------------------------------------------- the routed loss


def by_hand(parts, trainable, batch, temperature: float):
    """0.5 ce + 0.5 hinton, where hinton is each teacher's T^2 KL on its own positions
    (teachers run on the whole batch here), summed and divided by the routed tokens."""
    out = trainable.student(batch["input_ids"])
    s = out.logits.astype(mx.float32)
    mask = batch["mask"]
    ce = kdcore.masked_mean(kdcore.token_cross_entropy(s, batch["labels"]), mask)
    owners = parts.aggregator.owners(batch)
    kl_sum, count = mx.array(0.0), 0.0
    s_lp = kdcore.log_softmax(s / temperature)
    for k, teacher in enumerate(parts.teachers):
        signal = parts.aggregator.aligned(k, teacher.signal(batch, frozenset(), None))
        own = mask * mx.array((owners == k).astype(np.float32))
        aligned = position_mask(signal)
        own = own if aligned is None else own * aligned
        if signal.topk_ids is not None:  # a top-k teacher: the library's own sparse KL
            value = kdcore.token_divergence(s, signal, own, temperature=temperature)
            kl_sum = kl_sum + value * own.sum() * temperature**2
        else:
            t_lp = kdcore.log_softmax(signal.logits.astype(mx.float32) / temperature)
            kl = (mx.exp(t_lp) * (t_lp - s_lp)).sum(-1) * temperature**2
            kl_sum = kl_sum + (kl * own).sum()
        count += float(own.sum().item())
    return 0.5 * ce + 0.5 * kl_sum / count


def compare_with_hand(parts, batch, temperature: float, tol: float = 2e-5):
    signals = parts.teacher_signals(batch)

    def routed(trainable):
        return loss_terms(parts, trainable, batch, signals, 0)[0]

    def hand(trainable):
        return by_hand(parts, trainable, batch, temperature)

    got, got_grads = nn.value_and_grad(parts.trainable, routed)(parts.trainable)
    ref, ref_grads = nn.value_and_grad(parts.trainable, hand)(parts.trainable)
    mx.eval(got, got_grads, ref, ref_grads)
    assert abs(got.item() - ref.item()) <= tol * abs(ref.item()), (got.item(), ref.item())
    got_grads, ref_grads = dict(tree_flatten(got_grads)), dict(tree_flatten(ref_grads))
    assert got_grads.keys() == ref_grads.keys()
    for key in ref_grads:
        a, b = np.array(got_grads[key]), np.array(ref_grads[key])
        scale = max(float(np.abs(b).max()), 1e-6)
        assert float(np.abs(a - b).max()) <= tol * 10 * scale, key


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "full-logits"])
def test_routed_loss_is_each_teacher_s_loss_on_its_own_positions(world, fused):
    losses = [LOSSES[0], {"name": "hinton", "weight": 0.5, "params": {"temperature": 2.0}}]
    spec = route_spec(world, losses=losses)
    spec["train"]["fused_loss"] = fused
    parts = testing.build_run(spec)
    batch = batch_of(parts)
    compare_with_hand(parts, batch, 2.0)


def test_the_logged_agreement_is_top1_agreement_on_each_teacher_s_positions(world):
    # the student is a copy of the chat teacher: it agrees with it everywhere
    spec = route_spec(
        world, student={"model": {"name": "mlx-lm", "params": {"path": str(world["chat"])}}}
    )
    parts = testing.build_run(spec)
    batch = batch_of(parts)
    _, _, metrics = loss_terms(parts, parts.trainable, batch, parts.teacher_signals(batch), 0)
    assert float(metrics["route/chat/agreement"]) == 1.0
    student = np.array(parts.trainable.student(batch["input_ids"]).logits).argmax(-1)
    best = np.array(parts.teachers[0].signal(batch, frozenset(), None).logits).argmax(-1)
    own = (np.array(batch["mask"]) > 0) & (parts.aggregator.owners(batch) == 0)
    want = float((student == best)[own].mean())
    assert float(metrics["route/maths/agreement"]) == pytest.approx(want) and want < 1.0


class Counting:
    """A teacher that records the rows it is run on."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []
        self.tokenizer, self.model = inner.tokenizer, inner.model
        self.num_parameters = inner.num_parameters

    def signal(self, batch, capture=frozenset(), student=None):
        self.rows.append(np.array(batch["example_index"]).tolist())
        return self.inner.signal(batch, capture, student)


def test_each_teacher_runs_only_on_its_rows_and_one_without_positions_not_at_all(world):
    parts = testing.build_run(route_spec(world))
    parts.teachers = [Counting(t) for t in parts.teachers]
    batch = batch_of(parts)
    owners = parts.aggregator.owners(batch)
    carries = np.array(batch["mask"]) > 0
    rows = np.array(batch["example_index"])
    parts.teacher_signals(batch)
    fewer = False
    for k, teacher in enumerate(parts.teachers):
        mine = [int(r) for b, r in enumerate(rows) if ((owners[b] == k) & carries[b]).any()]
        assert mine and teacher.rows == [mine]
        fewer |= len(mine) < len(rows)
    assert fewer, "this batch should have a row without one of the teachers"
    # every record routed to "chat": "maths" is not called, and the step still runs
    route = parts.aggregator
    route.record_teacher = np.where(route.record_teacher == 0, 1, route.record_teacher)
    for teacher in parts.teachers:
        teacher.rows.clear()
    signals = parts.teacher_signals(batch)
    assert signals[0] is None and parts.teachers[0].rows == []
    total, terms, metrics = loss_terms(parts, parts.trainable, batch, signals, 0)
    assert float(metrics["route/maths/tokens"]) == 0.0
    assert float(metrics["route/chat/tokens"]) == float(carries.sum())
    assert np.isfinite(total.item()) and terms["hinton"].item() > 0


def test_teachers_of_other_tokenizers_go_through_their_own_aligner(world):
    teachers = route_spec(world)["teachers"]
    teachers[1] = {"source": "mlx-lm", "path": str(world["bpe"]), "label": "chat"}
    spec = route_spec(
        world, teachers=teachers, aligner={"name": "token-map", "params": {"match": "prefix"}}
    )
    parts = testing.build_run(spec)
    assert parts.teachers[1].retokenizer is not None  # another vocabulary: retokenized
    batch = batch_of(parts)
    compare_with_hand(parts, batch, 2.0)  # LOSSES: hinton at its default T = 2
    signals = parts.teacher_signals(batch)
    assert signals[1].vocab_size == 320 and signals[1].position_mask is not None
    _, _, metrics = loss_terms(parts, parts.trainable, batch, signals, 0)
    owners, mask = parts.aggregator.owners(batch), np.array(batch["mask"])
    # its tokens: its own positions that its retokenized text could align
    whole = parts.teachers[1].signal(batch, frozenset(), None)
    aligned = ((owners == 1) * mask * np.array(whole.position_mask)).sum()
    assert float(metrics["route/chat/tokens"]) == float(aligned) > 0
    assert float(metrics["route/maths/tokens"]) == float(((owners == 0) * mask).sum())
    # the identity aligner refuses the other vocabulary, naming the teacher
    spec["aligner"] = {"name": "identity"}
    with pytest.raises(SpecError, match=r"teachers\[1\] \('chat'\).*vocabularies differ"):
        testing.build_run(spec)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "full-logits"])
def test_cached_and_served_teachers_route_like_local_ones(world, monkeypatch, fused):
    from kdcore.cache.write import write_cache
    from kdcore.cli.serve import Limits, Scorer, TeacherServer

    cache = world["root"] / "cache"
    single = route_spec(world, teachers=route_spec(world)["teachers"][:1])
    single.pop("aggregator")
    if not cache.exists():
        write_cache(app.load_spec(single), cache, top_k=16, dtype="float32", progress=False)
    monkeypatch.setenv("KD_ROUTE_TOKEN", "route-test-token")
    limits = Limits(max_top_k=32, max_tokens=8192, timeout_s=10.0)
    server = TeacherServer(Scorer(str(world["chat"])), "127.0.0.1", 0, "route-test-token", limits)
    server.start()
    try:
        served = {"protocol": "kd", "token_env": "KD_ROUTE_TOKEN", "top_k": 16, "retries": 1}
        teachers = [
            {"cache": str(cache), "label": "maths"},
            {"server": server.url, "label": "chat", "params": served},
        ]
        losses = [LOSSES[0], {"name": "hinton", "weight": 0.5, "params": {"temperature": 1.0}}]
        spec = route_spec(world, teachers=teachers, losses=losses)
        spec["train"]["fused_loss"] = fused
        parts = testing.build_run(spec)
        batch = batch_of(parts)
        signals = parts.teacher_signals(batch)
        assert all(s is not None and s.topk_ids is not None for s in signals)
        compare_with_hand(parts, batch, 1.0)
        _, _, metrics = loss_terms(parts, parts.trainable, batch, signals, 0)
        for name in ("maths", "chat"):  # top-1 of a top-k signal: its most probable id
            assert 0.0 <= float(metrics[f"route/{name}/agreement"]) <= 1.0
    finally:
        server.close()


@pytest.fixture
def two_servers(world, monkeypatch):
    """Both teachers behind ``kd serve`` on loopback, and every batch each one scored."""
    from kdcore.cli.serve import Limits, Scorer, TeacherServer

    monkeypatch.setenv("KD_ROUTE_TOKEN", "route-test-token")
    limits = Limits(max_top_k=32, max_tokens=8192, timeout_s=10.0)
    servers, seen = {}, {}
    for name in ("maths", "chat"):
        scorer, seen[name] = Scorer(str(world[name])), []

        def recording(ids, k, scorer=scorer, into=seen[name]):
            into.append(np.array(ids))
            return Scorer.topk(scorer, ids, k)

        monkeypatch.setattr(scorer, "topk", recording)
        servers[name] = TeacherServer(scorer, "127.0.0.1", 0, "route-test-token", limits)
        servers[name].start()
    try:
        yield servers, seen
    finally:
        for server in servers.values():
            server.close()


def test_prefetch_sends_each_served_teacher_its_rows_and_each_request_is_used(
    world, two_servers, tmp_path, monkeypatch
):
    from kdcore.signal.route import teacher_rows
    from kdcore.teachers.prefetch import Prefetcher

    servers, seen = two_servers
    taken = []  # whether each request a step made had been sent ahead

    def take(self, ids):
        reply, waited = real_take(self, ids)
        taken.append(reply is not None)
        return reply, waited

    real_take = Prefetcher.take
    monkeypatch.setattr(Prefetcher, "take", take)
    # few maths records (batches without a maths row) and some routed nowhere (batches
    # where chat has only some rows)
    data = records(90)
    for i, record in enumerate(data):
        record["teacher"] = "maths" if i % 15 == 0 else "none" if 20 <= i < 50 else "chat"
    path = write_jsonl(tmp_path / "rare.jsonl", data)

    def spec_for(depth: int) -> dict:
        params = {"protocol": "kd", "token_env": "KD_ROUTE_TOKEN", "top_k": 16}
        teachers = [
            {"server": servers[name].url, "label": name, "params": {**params, "prefetch": depth}}
            for name in ("maths", "chat")
        ]
        spec = route_spec(world, teachers=teachers, data={"path": str(path)}, steps=6)
        spec["train"]["checkpoint_every"] = 3
        return spec

    # what each step asks each teacher for, by the step's own function
    parts = testing.build_run(spec_for(0))
    wanted = {name: [] for name in ("maths", "chat")}
    for index in range(6):
        batch = parts.dataset.batch(index, 4)
        for k, picked in enumerate(teacher_rows(parts.aggregator, batch, 2)):
            if len(picked):
                wanted[parts.aggregator.labels[k]].append((index, batch["input_ids"][picked]))
    assert [i for i, _ in wanted["maths"]] == [1, 3, 4], "batches 0, 2, 5 have no maths row"
    assert any(len(ids) < 4 for _i, ids in wanted["chat"]), "chat: some batches in part"

    def run(depth: int, out: Path, resume: bool = False) -> list[dict]:
        for name in seen:
            seen[name].clear()
        taken.clear()
        app.distill(spec_for(depth), output=out, resume=resume, progress=False)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        found = [json.loads(x) for x in lines]
        return [
            {k: v for k, v in r.items() if k.split("/")[0] in ("step", "loss", "route")}
            for r in found
            if "loss" in r and "eval" not in r
        ]

    def sent_as_wanted(first: int) -> None:
        for name, want in wanted.items():
            want = [ids for index, ids in want if index >= first]
            got = seen[name]
            assert len(got) == len(want), (name, len(got), len(want))
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)

    plain = run(0, tmp_path / "p0")
    sent_as_wanted(0)
    assert taken == []  # prefetch = 0: each step sends its own request
    ahead = run(2, tmp_path / "p2")
    assert ahead == plain and len(ahead) == 6  # the same losses and figures, bit for bit
    # one request per teacher per batch holding its rows, in the data's order, nothing for
    # a batch without them or past the last step; each one sent ahead and taken by its step
    sent_as_wanted(0)
    assert taken == [True] * (len(wanted["maths"]) + len(wanted["chat"]))
    summary = json.loads((tmp_path / "p2" / "summary.json").read_text())
    asked = [summary["teacher_servers"][f"teachers[{k}]"]["requests"] for k in (0, 1)]
    assert asked == [len(wanted["maths"]), len(wanted["chat"])]
    # resumed from the step-3 checkpoint: steps 4-6 again, the same, each request used
    (tmp_path / "p2" / "checkpoints" / "latest").write_text("step-0000003\n")
    again = run(2, tmp_path / "p2", resume=True)
    assert again[-3:] == ahead[3:] and [r["step"] for r in again[-3:]] == [4, 5, 6]
    sent_as_wanted(3)
    assert taken == [True] * len(seen["maths"] + seen["chat"])


def test_called_as_a_plain_aggregator_it_is_the_one_hot_mixture():
    from kdcore.losses.inputs import LossInputs
    from kdcore.models.output import ModelOutput
    from kdcore.signal.route import Route
    from kdcore.signal.teacher import TeacherSignal

    rng = np.random.default_rng(0)
    logits = [mx.array(rng.standard_normal((2, 5, 7)).astype(np.float32) * 3) for _ in range(2)]
    signals = [TeacherSignal(vocab_size=7, logits=z) for z in logits]
    route = Route(RouteConfig())
    route.attach(["maths", "chat"], [lambda s: s, lambda s: s], np.array([0, 1, -1], np.int32))
    ids = np.array([[0, 0, 1, 1, -1], [2, 2, 1, 0, 0]], np.int32)  # record 2 routes nowhere
    batch = {"input_ids": mx.zeros((2, 5), mx.int32), "record_id": mx.array(ids)}
    student = ModelOutput(logits=mx.zeros((2, 5, 7)))
    out = route(signals, LossInputs(student=student, teacher=None, batch=batch))
    got = np.array(out.log_probs(1.0))
    each = [np.array(kdcore.log_softmax(z)) for z in logits]
    owners = np.array([[0, 0, 1, 1, -1], [-1, -1, 1, 0, 0]])
    for b, p in np.ndindex(2, 5):
        k = owners[b, p]
        want = (
            each[k][b, p] if k >= 0 else np.log((np.exp(each[0][b, p]) + np.exp(each[1][b, p])) / 2)
        )
        np.testing.assert_allclose(got[b, p], want, atol=1e-5)


# ---------------------------------------------------------------- the log and the report


def test_per_teacher_figures_in_the_log_and_the_report(world, tmp_path):
    from kdcore.analysis.report import write_report

    out = tmp_path / "run"
    app.distill(app.load_spec(route_spec(world, steps=3)), output=out, progress=False)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "eval" not in r]
    assert len(train) == 3
    for r in train:
        for name in ("maths", "chat"):
            assert 0.0 <= r[f"route/{name}/agreement"] <= 1.0
            assert r[f"route/{name}/tokens"] > 0 and r[f"route/{name}/hinton"] > 0
        # the hinton term is the token-weighted mean of the two teachers' values
        n = [r[f"route/{k}/tokens"] for k in ("maths", "chat")]
        v = [r[f"route/{k}/hinton"] for k in ("maths", "chat")]
        assert r["loss/hinton"] == pytest.approx((n[0] * v[0] + n[1] * v[1]) / sum(n), rel=1e-5)
    report = write_report(out).read_text()
    assert "## Routing (aggregator `route`)" in report
    section = report.split("## Routing", 1)[1]
    total = sum(r["route/maths/tokens"] for r in train)
    assert f"| maths | {total:,.0f} |" in section and "| chat |" in section
    assert (out / "report" / "route_agreement.png").exists()


# ---------------------------------------------------------------- kd validate


def problems(spec: dict) -> list[str]:
    """What kd validate reports: the spec's structure, then the run's checks."""
    try:
        return check_run(app.load_spec(spec))
    except SpecError as exc:
        return exc.problems


def test_validate_names_a_route_to_a_teacher_that_does_not_exist(world):
    found = problems(route_spec(world, {"map": {"gsm": "mathz"}, "default": "none"}))
    assert any(
        "route names teacher 'mathz'" in p
        and "did you mean 'maths'" in p
        and p.endswith("@ $.aggregator.params.map.gsm")
        for p in found
    ), found
    found = problems(route_spec(world, {"by": "rule", "rules": [{"pattern": "x", "teacher": "a"}]}))
    assert any("route names teacher 'a'" in p and "rules[0].teacher" in p for p in found)
    teachers = route_spec(world)["teachers"]
    teachers[1].pop("label")
    found = problems(route_spec(world, teachers=teachers))
    assert any("teachers[1] has no label" in p for p in found), found


def test_validate_and_the_data_load_name_the_record_without_the_field(world, tmp_path):
    bad = records(12)
    bad[7].pop("teacher")
    bad[9]["teacher"] = "physics"
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    found = problems(route_spec(world, data={"path": str(path)}))
    assert any(f"record at {path}:8 has no field 'teacher'" in p for p in found), found
    assert any(
        f"{path}:10 field 'teacher' is 'physics', which names no teacher" in p for p in found
    )
    # when the data loads (kd distill), the same records are refused by file and line
    with pytest.raises(SpecError, match=rf"record at {path}:8 has no field 'teacher'"):
        testing.build_run(route_spec(world, data={"path": str(path)}))
    dataset = app.build("dataset", "chat", path=str(path), tokenizer=str(world["tok"]), seq_len=SEQ)
    with pytest.raises(SpecError, match=rf"record at {path}:8 has no field 'teacher'"):
        record_teachers(dataset, RouteConfig(), ["maths", "chat"])
    # a default takes the records without the field (a value naming no teacher stays an error)
    found = problems(route_spec(world, {"default": "chat"}, data={"path": str(path)}))
    assert len(found) == 1 and ":10 field 'teacher' is 'physics'" in found[0]


def test_validate_refuses_weights_and_learning_for_a_route(world):
    found = problems(route_spec(world, {"weights": [1.0, 2.0]}))
    assert found == [
        "weights must not be set: route sends each position to exactly one teacher, so there "
        "is nothing to weigh; use aggregator 'weighted' to mix teachers "
        "@ $.aggregator.params.weights"
    ]
    found = problems(route_spec(world, {"learnable": True}))
    assert found and "learnable must not be set: route has nothing to learn" in found[0]


def test_validate_refuses_what_a_routed_step_cannot_give(world, tmp_path):
    one = {"by": "source"}
    assert any("needs data with several sources" in p for p in problems(route_spec(world, one)))
    data = {
        "path": {"gsm": str(world["root"] / "gsm.jsonl"), "hh": str(world["root"] / "hh.jsonl")}
    }
    found = problems(route_spec(world, {"by": "source", "map": {"gsm": "maths"}}, data=data))
    assert any("source 'hh' routes to no teacher" in p for p in found), found
    found = problems(
        route_spec(world, {"by": "rule", "rules": [{"pattern": "#", "teacher": "maths"}]})
    )
    assert any("teacher 'chat' is never routed to" in p for p in found), found
    spec = route_spec(world)
    spec["train"]["on_policy"] = {"lmbda": 0.5}
    assert any("on_policy.lmbda" in p for p in problems(spec))

    class Hints:
        @kdcore.hookimpl
        def kd_losses(self):
            def hint(config, setup):
                return lambda inputs: (mx.array(0.0), {})

            return [kdcore.Component("test-hint", hint, requires={"teacher", "hidden_states"})]

    with testing.plugins(Hints()):
        found = problems(route_spec(world, losses=[{"name": "test-hint"}]))
    assert any("loss 'test-hint' needs the teachers' hidden states" in p for p in found), found


def test_a_routed_top_k_teacher_is_not_read_as_a_mixture_member(world):
    # a mixture reads top-k members with a tail bucket, exact only at the capture T = 1;
    # a routed teacher keeps its own signal, so hinton at T = 2 (tail "renormalize") is fine
    served = {"server": "http://127.0.0.1:9", "label": "chat", "params": {"top_k": 16}}
    teachers = [route_spec(world)["teachers"][0], served]
    losses = [{"name": "hinton", "params": {"temperature": 2.0}}]
    assert problems(route_spec(world, teachers=teachers, losses=losses)) == []
    mean = route_spec(world, teachers=teachers, losses=losses)
    mean["aggregator"] = {"name": "mean"}
    assert any("tail bucket is exact only" in p for p in problems(mean))


def test_kd_validate_prints_the_route_problems(world, tmp_path, capsys):
    spec = route_spec(world, {"map": {"x": "nobody"}})
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert testing.run_kd("validate", path) == 2
    assert "route names teacher 'nobody'" in capsys.readouterr().err
