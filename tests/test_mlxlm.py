"""mlx-lm models as students and teachers: capture, loading, saving (extra: kdcore[mlx-lm]).

Every model here is made offline: a tiny config instantiated with mlx-lm's own classes and
saved with random weights next to a byte-level Hugging Face tokenizer. The end-to-end tests
(``test_full_student_*``) need the engine patch that saves mlx-lm students in their format.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kdcore import app
from kdcore.errors import SpecError
from kdcore.models.mlxlm import (
    MlxLmModel,
    MlxLmModelConfig,
    create_mlxlm_dir,
    explicit_attention,
    load_mlxlm,
    mlxlm_model,
)
from kdcore.registry.setup import Setup
from kdcore.tokenizers.hf import HFTokenizer, train_bpe_tokenizer_json
from kdcore.tokenizers.simple import ByteTokenizer, fingerprint

LLAMA = dict(
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
FAMILIES = {
    "llama": LLAMA,
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=256,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        vocab_size=256,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "gpt2": dict(
        model_type="gpt2",
        n_ctx=64,
        n_embd=32,
        n_head=4,
        n_layer=2,
        n_positions=64,
        layer_norm_epsilon=1e-5,
        vocab_size=256,
    ),
}
IDS = mx.array([[70, 105, 114, 115, 116, 32, 67, 105], [10, 84, 104, 101, 32, 107, 105, 110]])


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {
        name: create_mlxlm_dir(root / name, cfg, seed=i)
        for i, (name, cfg) in enumerate(FAMILIES.items())
    }


@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_leaves_logits_unchanged(family_dirs, family):
    lm, config = load_mlxlm(family_dirs[family])
    model = MlxLmModel(lm, config, family_dirs[family])
    plain = lm(IDS)
    # nothing captured: the mlx-lm forward itself, bit for bit
    assert mx.array_equal(model(IDS).logits, plain).item()
    hidden = model(IDS, capture=frozenset({"hidden_states"}))
    assert mx.array_equal(hidden.logits, plain).item()
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    assert len(hidden.hidden_states) == layers + 1
    assert hidden.attentions is None
    assert all(h.shape == (2, 8, 32) for h in hidden.hidden_states)
    both = model(IDS, capture=frozenset({"hidden_states", "attentions"}))
    assert np.allclose(np.array(both.logits), np.array(plain), atol=1e-5)
    assert len(both.attentions) == layers
    for weights in both.attentions:
        w = np.array(weights)
        assert w.shape == (2, 4, 8, 8)
        assert np.allclose(w.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.triu(w, k=1) == 0.0)  # causal: no weight on later tokens
    # the layers are back in place after a capture
    assert all(type(layer).__name__ == "TransformerBlock" for layer in model.layers)


def test_hidden_states_are_the_layer_inputs_and_outputs(family_dirs):
    lm, config = load_mlxlm(family_dirs["llama"])
    model = MlxLmModel(lm, config)
    out = model(IDS, capture=frozenset({"hidden_states"}))
    embed = lm.model.embed_tokens(IDS)
    assert mx.array_equal(out.hidden_states[0], embed).item()
    again = lm.model.layers[0](embed, "causal")
    assert np.allclose(np.array(out.hidden_states[1]), np.array(again), atol=1e-6)
    logits = lm.lm_head(lm.model.norm(out.hidden_states[-1]))
    assert mx.array_equal(logits, out.logits).item()


def test_explicit_attention_matches_the_fused_kernel():
    rng = np.random.default_rng(0)
    q = mx.array(rng.standard_normal((2, 4, 5, 8)).astype(np.float32))
    k = mx.array(rng.standard_normal((2, 2, 7, 8)).astype(np.float32))  # GQA, 2 cached keys
    v = mx.array(rng.standard_normal((2, 2, 7, 8)).astype(np.float32))
    additive = mx.array(rng.standard_normal((5, 7)).astype(np.float32))
    boolean = mx.array(rng.random((5, 7)) > 0.3) | mx.eye(5, 7, k=2).astype(mx.bool_)
    for mask in ("causal", additive, boolean, None):
        sink = []
        ours = explicit_attention(sink)(q, k, v, cache=None, scale=0.35, mask=mask)
        fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=mask)
        assert np.allclose(np.array(ours), np.array(fused), atol=1e-5), mask
        assert sink[0].shape == (2, 4, 5, 7)


def test_model_component_builds_fresh_or_loads(family_dirs):
    setup = Setup()
    fresh = mlxlm_model(MlxLmModelConfig(config={**LLAMA, "vocab_size": 300}), setup)
    assert fresh(IDS).logits.shape == (2, 8, 300)
    assert fresh.training  # a student trains (dropout in LoRA layers)
    loaded = mlxlm_model(MlxLmModelConfig(path=str(family_dirs["qwen3"])), setup)
    lm, _ = load_mlxlm(family_dirs["qwen3"])
    assert mx.array_equal(loaded(IDS).logits, lm(IDS)).item()
    names = [k for k, _ in tree_flatten(loaded.parameters())]
    assert names == [k for k, _ in tree_flatten(lm.parameters())]  # mlx-lm's own names
    with pytest.raises(SpecError, match="fewer than the run tokenizer"):
        mlxlm_model(MlxLmModelConfig(config={**LLAMA, "vocab_size": 100}, vocab_size=256), setup)
    with pytest.raises(SpecError, match="exactly one of"):
        mlxlm_model(MlxLmModelConfig(), setup)
    with pytest.raises(SpecError, match="vocab_size"):
        mlxlm_model(
            MlxLmModelConfig(config={k: v for k, v in LLAMA.items() if k != "vocab_size"}), setup
        )


def test_teacher_source_with_the_run_tokenizer(family_dirs, tmp_path):
    from kdcore.spec.schema import TeacherRef
    from kdcore.teachers.mlxlm import MlxLmTeacher, MlxLmTeacherConfig

    setup = Setup(
        base_dir=tmp_path, teacher=TeacherRef(source="mlx-lm", path=str(family_dirs["gpt2"]))
    )
    setup.extras["dataset"] = type("D", (), {"tokenizer": ByteTokenizer()})()
    teacher = MlxLmTeacher(MlxLmTeacherConfig(), setup)
    # the byte-level tokenizer.json is the byte tokenizer: no retokenizing
    assert fingerprint(teacher.tokenizer) == fingerprint(ByteTokenizer())
    assert teacher.retokenizer is None and teacher.model is teacher.adapter
    signal = teacher.signal({"input_ids": IDS}, frozenset({"hidden_states"}))
    lm, _ = load_mlxlm(family_dirs["gpt2"])
    assert mx.array_equal(signal.logits, lm(IDS)).item()
    assert len(signal.hidden_states) == 3
    assert teacher.config.dim == 32 and teacher.config.layers == 2


def test_teacher_source_retokenizes_for_another_tokenizer(corpus, tmp_path):
    from kdcore.spec.schema import TeacherRef
    from kdcore.teachers.mlxlm import MlxLmTeacher, MlxLmTeacherConfig

    text = corpus.read_text()
    bpe = train_bpe_tokenizer_json(text[:20000], vocab_size=320)
    path = create_mlxlm_dir(tmp_path / "bpe", {**LLAMA, "vocab_size": 320}, bpe, seed=5)
    setup = Setup(base_dir=tmp_path, teacher=TeacherRef(source="mlx-lm", path=str(path)))
    setup.extras["dataset"] = type("D", (), {"tokenizer": ByteTokenizer()})()
    teacher = MlxLmTeacher(MlxLmTeacherConfig(), setup)
    assert teacher.retokenizer is not None and teacher.model is None
    window = "First Citizen:\nBefore we proceed"
    ids = mx.array([list(window.encode())])
    signal = teacher.signal({"input_ids": ids})
    assert signal.logits.shape == (1, len(window), 320)
    mask = np.array(signal.position_mask)[0]
    # the teacher read the same text; aligned positions carry its logits at that context
    t_ids = HFTokenizer.from_json(bpe).encode(window)
    lm, _ = load_mlxlm(path)
    own = np.array(lm(mx.array([t_ids])))[0]
    ends = np.cumsum([len(HFTokenizer.from_json(bpe).token_bytes()[t]) for t in t_ids])
    for i in np.flatnonzero(mask):
        j = int(np.flatnonzero(ends == i + 1)[0])
        assert np.allclose(np.array(signal.logits)[0, i], own[j], atol=1e-5)
    assert 0 < mask.sum() < len(window)
    with pytest.raises(SpecError, match="attention maps"):
        teacher.signal({"input_ids": ids}, frozenset({"attentions"}))


def _run_spec(corpus, teacher_dir, **student):
    return {
        "run": {"name": "mlxlm", "seed": 0},
        "data": {"name": "text", "params": {"path": str(corpus), "seq_len": 16, "max_chars": 8000}},
        "student": student,
        "teachers": [{"source": "mlx-lm", "path": str(teacher_dir)}],
        "losses": [{"name": "ce"}, {"name": "uld", "weight": 0.5}],
        "train": {
            "steps": 3,
            "batch_size": 2,
            "log_every": 1,
            "optimizer": {"name": "adamw", "lr": 3e-3},
        },
        "eval": {"batches": 1},
    }


def test_full_student_is_an_mlx_lm_directory(family_dirs, corpus, tmp_path):
    """Needs the engine patch (Run.save_student -> kdcore.mlxlm.save_student)."""
    from mlx_lm import generate, load

    from kdcore.engine.build import build_parts
    from kdcore.engine.distill import train_parts

    small = {
        **LLAMA,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    spec = app.load_spec(
        _run_spec(
            corpus,
            family_dirs["llama"],
            model={
                "name": "mlx-lm",
                "params": {"config": small, "tokenizer": str(family_dirs["llama"])},
            },
        )
    )
    run = build_parts(spec)
    summary = train_parts(run, tmp_path / "run", progress=False)
    assert summary["trainable_parameters"] == summary["student_parameters"]
    out = tmp_path / "run" / "student"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    model, tokenizer = load(str(out))
    assert mx.array_equal(model(IDS), run.student(IDS).logits).item()
    text = generate(model, tokenizer, "First", max_tokens=6)
    assert isinstance(text, str) and len(text.encode("utf-8", "replace")) >= 1
    # kd's own loader opens it too (kd eval), through the mlx-lm model component
    from kdcore.models.io import load_model

    again, arch, _ = load_model(out)
    assert arch == "mlx-lm"
    assert mx.array_equal(again(IDS).logits, model(IDS)).item()
