"""Cross-tokenizer distillation: tokenizers, position alignment, ``token-map`` and ``uld``.

The two tokenizers are genuinely different and made offline: kdcore's byte tokenizer and a
byte-level BPE trained on the bundled corpus with the ``tokenizers`` library. The
end-to-end runs (``test_cross_tokenizer_run_*``) need the engine patch that applies the
aligned signal's ``position_mask`` to the losses that use the teacher.
"""

from __future__ import annotations

import json

import attrs
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore import app, testing
from kdcore.align.retokenize import Retokenizer
from kdcore.errors import SpecError
from kdcore.losses.inputs import LossInputs
from kdcore.models.mlxlm import create_mlxlm_dir
from kdcore.models.output import ModelOutput
from kdcore.registry.manager import reset_registry
from kdcore.signal.aligned import AlignedSignal, position_mask
from kdcore.signal.teacher import TeacherSignal
from kdcore.spec.build import build
from kdcore.tokenizers.hf import (
    HFTokenizer,
    byte_level_tokenizer_json,
    token_byte_strings,
    train_bpe_tokenizer_json,
)
from kdcore.tokenizers.simple import ByteTokenizer, fingerprint


class ListTokenizer:
    """A vocabulary given as token strings (for hand-computed cases)."""

    def __init__(self, tokens):
        self._tokens = list(tokens)

    @property
    def vocab_size(self):
        return len(self._tokens)

    def tokens(self):
        return list(self._tokens)


@pytest.fixture(scope="module")
def text(corpus):
    return corpus.read_text()


@pytest.fixture(scope="module")
def bpe(text):
    return HFTokenizer.from_json(train_bpe_tokenizer_json(text[:20000], vocab_size=320))


def _dense(probs: np.ndarray, **extra) -> TeacherSignal:
    logits = mx.log(mx.array(np.asarray(probs, np.float32)))
    return TeacherSignal(vocab_size=logits.shape[-1], logits=logits, **extra)


# ---------------------------------------------------------------- tokenizers


def test_byte_level_hf_tokenizer_is_the_byte_tokenizer():
    hf = HFTokenizer.from_json(byte_level_tokenizer_json())
    byte = ByteTokenizer()
    sample = "Où est-il? \n\t ok"
    assert hf.encode(sample) == byte.encode(sample)
    assert hf.decode(byte.encode(sample)) == sample
    assert fingerprint(hf) == fingerprint(byte)


def test_bpe_tokens_are_the_bytes_they_stand_for(bpe, text):
    assert bpe.vocab_size == 320
    pieces = token_byte_strings(bpe)
    window = text[5000:5400]
    ids = bpe.encode(window)
    assert len(ids) < 0.8 * len(window.encode())  # merges: fewer tokens than bytes
    assert b"".join(pieces[i] for i in ids) == window.encode()
    assert bpe.special_ids() == {0}  # <|endoftext|>


# ---------------------------------------------------------------- positions


@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, 30000), length=st.integers(1, 48), cut=st.integers(0, 2))
def test_offsets_pair_positions_with_the_same_context(bpe, text, start, length, cut):
    window = ("é" + text[start : start + length]).encode()[cut:]  # may start mid-character
    retok = Retokenizer(ByteTokenizer(), bpe, "offsets")
    t_ids, index, mask = retok.row(np.array(list(window)))
    t_pieces = token_byte_strings(bpe)
    t_text = b"".join(t_pieces[j] for j in t_ids)
    t_ends = np.cumsum([len(t_pieces[j]) for j in t_ids])
    for i in np.flatnonzero(mask):
        # the teacher's context at index[i] is the student's context at i: the same text
        prefix_t = t_text[: t_ends[index[i]]].decode("utf-8")
        prefix_s = window[: i + 1].decode("utf-8", "replace")
        assert prefix_t == prefix_s
    # every teacher token that ends on a character boundary has its student position
    boundaries = set(np.cumsum([len(c.encode()) for c in t_text.decode("utf-8")]).tolist())
    assert mask.sum() == sum(1 for e in t_ends.tolist() if e in boundaries)
    assert mask[-1] == 1.0  # the whole window: both predict what follows it


def test_position_alignment_is_uld_s_rule(bpe):
    retok = Retokenizer(ByteTokenizer(), bpe, "position")
    window = "Before we proceed any further"
    t_ids, index, mask = retok.row(np.array(list(window.encode())))
    n = len(t_ids)
    assert n < len(window)
    assert list(index[:n]) == list(range(n)) and mask[:n].all() and not mask[n:].any()


def test_batch_rows_are_padded_and_masked(bpe):
    retok = Retokenizer(ByteTokenizer(), bpe)
    rows = np.array([list(b"the king and the queen"), list(b"xxxxxxxxxxxxxxxxxxxxxx")])
    t_ids, index, mask = retok(rows)
    assert t_ids.shape[0] == 2 and index.shape == mask.shape == rows.shape
    assert (index < t_ids.shape[1]).all()


# ---------------------------------------------------------------- token-map


def test_token_map_exact_renormalises_unmatched_mass():
    teacher = ListTokenizer(["a", "b", "ab", "zz"])
    student = ListTokenizer(["c", "b", "a"])
    aligner = build("vocab_aligner", "token-map")
    aligner.prepare(teacher, student)
    p = np.array([[[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.5, 0.5]]], np.float32)
    out = aligner(_dense(p))
    q = np.exp(np.array(out.log_probs(1.0)))
    # a -> 2, b -> 1; "ab" and "zz" unmatched: dropped, the rest renormalised
    assert np.allclose(q[0, 0], [0.0, 2 / 3, 1 / 3], atol=1e-6)
    assert np.array(out.position_mask).tolist() == [[1.0, 0.0]]  # no matched mass at 1
    assert out.vocab_size == 3 and isinstance(out, AlignedSignal)


def test_token_map_prefix_and_unknown_policies():
    teacher = ListTokenizer(["a", "b", "ab", "zz"])
    student = ListTokenizer(["?", "b", "a"])
    p = np.array([[[0.1, 0.2, 0.3, 0.4]]], np.float32)
    prefix = build("vocab_aligner", "token-map", match="prefix")
    prefix.prepare(teacher, student)
    q = np.exp(np.array(prefix(_dense(p)).log_probs(1.0)))[0, 0]
    assert np.allclose(q, [0.0, 0.2 / 0.6, 0.4 / 0.6], atol=1e-6)  # "ab" counts for "a"
    unknown = build("vocab_aligner", "token-map", unmatched="unknown", unknown_token="?")
    unknown.prepare(teacher, student)
    q = np.exp(np.array(unknown(_dense(p)).log_probs(1.0)))[0, 0]
    assert np.allclose(q, [0.7, 0.2, 0.1], atol=1e-6)  # unmatched mass on "?"
    with pytest.raises(SpecError, match="unknown_token"):
        build("vocab_aligner", "token-map", unmatched="unknown").prepare(teacher, student)


def test_token_map_prefix_gives_the_teacher_s_next_byte(bpe):
    """BPE teacher -> byte student: q(c) = sum of p(v) over tokens v whose bytes start with c."""
    aligner = build("vocab_aligner", "token-map", match="prefix")
    aligner.prepare(bpe, ByteTokenizer())
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 3, 320)).astype(np.float32) * 3
    out = aligner(TeacherSignal(vocab_size=320, logits=mx.array(logits)))
    q = np.exp(np.array(out.log_probs(1.0)))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    pieces = token_byte_strings(bpe)
    expected = np.zeros((2, 3, 256))
    for v, piece in enumerate(pieces):
        if v not in bpe.special_ids():
            expected[..., piece[0]] += p[..., v]
    expected /= expected.sum(-1, keepdims=True)
    assert np.allclose(q, expected, atol=1e-5)
    # temperature applies to the mapped distribution, which stays normalised
    assert np.allclose(np.exp(np.array(out.log_probs(2.0))).sum(-1), 1.0, atol=1e-5)


def test_token_map_keeps_mixtures_and_position_masks():
    teacher = ListTokenizer(["a", "b", "c"])
    student = ListTokenizer(["b", "a"])
    aligner = build("vocab_aligner", "token-map")
    aligner.prepare(teacher, student)
    member = AlignedSignal(
        vocab_size=3,
        logits=mx.zeros((1, 2, 3)),
        position_mask=mx.array([[1.0, 0.0]]),
    )
    mixture = TeacherSignal(vocab_size=3, members=(member, member), weights=mx.array([[0.5, 0.5]]))
    out = aligner(mixture)
    assert out.vocab_size == 2
    assert np.array(position_mask(out)).tolist() == [[1.0, 0.0]]
    assert np.allclose(np.exp(np.array(out.log_probs(1.0))), 0.5, atol=1e-6)
    with pytest.raises(SpecError, match="dense"):
        aligner(
            TeacherSignal(
                vocab_size=3,
                topk_ids=mx.zeros((1, 1, 1), mx.int32),
                topk_logprobs=mx.zeros((1, 1, 1)),
                tail_logmass=mx.zeros((1, 1)),
            )
        )


# ---------------------------------------------------------------- ULD


def _uld_reference(ps: np.ndarray, pt: np.ndarray) -> np.ndarray:
    """The paper's code, in NumPy: sort descending, zero-pad the vocabularies, L1."""
    ps, pt = -np.sort(-ps, axis=-1), -np.sort(-pt, axis=-1)
    size = max(ps.shape[-1], pt.shape[-1])
    ps = np.pad(ps, [(0, 0)] * (ps.ndim - 1) + [(0, size - ps.shape[-1])])
    pt = np.pad(pt, [(0, 0)] * (pt.ndim - 1) + [(0, size - pt.shape[-1])])
    return np.abs(ps - pt).sum(-1)


def _uld(student_logits, teacher: TeacherSignal, mask=None, **params):
    loss = testing.build_loss("uld", **params)
    config = app.make_config("loss", "uld", **params)
    B, L, _ = student_logits.shape
    batch = {"mask": mx.array(np.ones((B, L), np.float32) if mask is None else mask)}
    inputs = LossInputs(
        student=ModelOutput(logits=mx.array(student_logits)),
        teacher=teacher,
        batch=batch,
        params=config,
    )
    return loss(inputs)[0].item()


def test_uld_loss_conforms():
    testing.check_loss("uld")
    testing.check_loss("uld", temperature=2.0)


def test_uld_matches_the_paper_across_vocabularies():
    rng = np.random.default_rng(3)
    s = rng.standard_normal((2, 4, 7)).astype(np.float32) * 2
    t = rng.standard_normal((2, 4, 11)).astype(np.float32) * 2
    for T in (1.0, 2.0):
        ps = np.exp(s / T) / np.exp(s / T).sum(-1, keepdims=True)
        pt = np.exp(t / T) / np.exp(t / T).sum(-1, keepdims=True)
        value = _uld(s, TeacherSignal(vocab_size=11, logits=mx.array(t)), temperature=T)
        assert abs(value - _uld_reference(ps, pt).mean()) < 1e-5
    # by hand: sorted [.7 .2 .1] vs [.6 .3 .1 0] -> .1 + .1
    value = _uld(np.log([[[0.2, 0.7, 0.1]]]), _dense([[[0.1, 0.3, 0.0, 0.6]]]))
    assert abs(value - 0.2) < 1e-5
    # a vocabulary permutation of the teacher changes nothing
    perm = rng.permutation(11)
    assert (
        abs(
            _uld(s, TeacherSignal(vocab_size=11, logits=mx.array(t[..., perm])))
            - _uld(s, TeacherSignal(vocab_size=11, logits=mx.array(t)))
        )
        < 1e-6
    )


def test_uld_aligner_sorts_and_the_loss_agrees():
    rng = np.random.default_rng(4)
    s = rng.standard_normal((1, 3, 6)).astype(np.float32)
    t = rng.standard_normal((1, 3, 9)).astype(np.float32)
    raw = TeacherSignal(vocab_size=9, logits=mx.array(t))
    aligner = build("vocab_aligner", "uld")
    aligner.prepare(None, None)
    ranked = aligner(raw)
    z = np.array(ranked.logits)
    assert ranked.rank_space and np.all(np.diff(z, axis=-1) <= 0)
    for T in (0.5, 1.0, 3.0):
        assert abs(_uld(s, ranked, temperature=T) - _uld(s, raw, temperature=T)) < 1e-6
    top = build("vocab_aligner", "uld", top_k=4)(raw)
    assert top.vocab_size == 4


def test_uld_from_a_top_k_cache_signal():
    rng = np.random.default_rng(5)
    t = rng.standard_normal((1, 2, 8)).astype(np.float32) * 3
    logp = t - np.log(np.exp(t).sum(-1, keepdims=True))
    order = np.argsort(-logp, axis=-1)[..., :8]
    sparse = TeacherSignal(
        vocab_size=8,
        topk_ids=mx.array(order.astype(np.int32)),
        topk_logprobs=mx.array(np.take_along_axis(logp, order, -1)),
        tail_logmass=mx.full((1, 2), -1e4),
    )
    s = rng.standard_normal((1, 2, 5)).astype(np.float32)
    dense = TeacherSignal(vocab_size=8, logits=mx.array(t))
    assert abs(_uld(s, sparse) - _uld(s, dense)) < 1e-5  # K = V: exact


# ---------------------------------------------------------------- end to end


class _KlPlugin:
    """A token KL(teacher || student) for these runs (so they do not need another plugin);
    it reports how many tokens it was given."""

    @kdcore.hookimpl
    def kd_losses():
        def kl(config, setup):
            def loss(inputs):
                t = inputs.teacher.log_probs(1.0)
                s = kdcore.log_softmax(inputs.student.logits)
                mask = inputs.batch["mask"]
                value = kdcore.masked_mean((mx.exp(t) * (t - s)).sum(-1), mask)
                return value, {"tokens": mask.sum()}

            return loss

        return [kdcore.Component("test-kl", kl, requires={"teacher"}, doc="test: token KL")]


@pytest.fixture
def kl_loss():
    reset_registry(extra_plugins=[(_KlPlugin, "test-kl")])
    yield
    reset_registry()


@pytest.fixture(scope="module")
def bpe_teacher(tmp_path_factory, text):
    config = dict(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=320,
        tie_word_embeddings=True,
    )
    tok = train_bpe_tokenizer_json(text[:20000], vocab_size=320)
    return create_mlxlm_dir(tmp_path_factory.mktemp("bpe") / "teacher", config, tok, seed=2)


def _cross_spec(corpus, teacher, aligner, losses, alignment="offsets"):
    return {
        "run": {"name": "cross", "seed": 0},
        "data": {"name": "text", "params": {"path": str(corpus), "seq_len": 24, "max_chars": 8000}},
        "student": {
            "model": {
                "name": "transformer",
                "params": {"dim": 32, "layers": 2, "heads": 2, "max_seq_len": 24},
            }
        },
        "teachers": [
            {"source": "mlx-lm", "path": str(teacher), "params": {"alignment": alignment}}
        ],
        "aligner": aligner,
        "losses": losses,
        "train": {
            "steps": 3,
            "batch_size": 2,
            "log_every": 1,
            "optimizer": {"name": "adamw", "lr": 3e-3},
        },
        "eval": {"batches": 1},
    }


def test_cross_tokenizer_run_with_token_map(corpus, bpe_teacher, kl_loss, tmp_path):
    """Needs the engine patch (position masks reach the teacher losses only)."""
    spec = _cross_spec(
        corpus,
        bpe_teacher,
        {"name": "token-map", "params": {"match": "prefix"}},
        [{"name": "ce"}, {"name": "test-kl"}],
    )
    summary = app.distill(app.load_spec(spec), output=tmp_path / "run", progress=False)
    assert np.isfinite(summary["final_losses"]["test-kl"])
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["test-kl/tokens"] for r in records if "test-kl/tokens" in r]
    # the KL saw only the aligned positions (BPE token ends), ce all 2 * 24
    assert tokens and all(0 < n < 2 * 24 for n in tokens)
    # the identity aligner refuses the pair outright
    spec["aligner"] = {"name": "identity"}
    with pytest.raises(SpecError, match="vocabularies differ"):
        app.distill(app.load_spec(spec), output=tmp_path / "run2", progress=False)


def test_cross_tokenizer_run_with_uld(corpus, bpe_teacher, tmp_path):
    """Needs the engine patch. ULD's own recipe: position alignment, sorted L1 + CE."""
    for alignment in ("position", "offsets"):
        spec = _cross_spec(
            corpus, bpe_teacher, {"name": "uld"}, [{"name": "ce"}, {"name": "uld"}], alignment
        )
        out = tmp_path / alignment
        summary = app.distill(app.load_spec(spec), output=out, progress=False)
        value = summary["final_losses"]["uld"]
        assert 0.0 < value < 2.0  # an L1 distance between two distributions


def test_aligned_signal_survives_evolve():
    signal = AlignedSignal(vocab_size=2, logits=mx.zeros((1, 1, 2)), position_mask=mx.ones((1, 1)))
    again = attrs.evolve(signal, logits=mx.ones((1, 1, 2)))
    assert isinstance(again, AlignedSignal) and position_mask(again) is not None
