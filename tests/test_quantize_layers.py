"""The ``quantize`` initializer's per-layer widths (``layers``): some layers at other bits
or group sizes, as mixed-precision recipes keep the (tied) embedding at 8 bits.

Every model here is a tiny mlx-lm llama made offline (``create_mlxlm_dir``); the reference
is mlx-lm's own ``quantize_model`` with a ``quant_predicate`` giving the same widths.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kdcore import app
from kdcore.models import quantize
from kdcore.models.mlxlm import MlxLmModelConfig, create_mlxlm_dir, load_mlxlm, mlxlm_model
from kdcore.models.save import load_quantized_model, mlx_lm_config, save_student
from kdcore.registry.setup import Setup
from kdcore.spec.build import build

LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=256,
    tie_word_embeddings=False,
)
TIED = {**LLAMA, "tie_word_embeddings": True}
IDS = mx.array([[70, 105, 114, 115, 116, 32, 67, 105], [10, 84, 104, 101, 32, 107, 105, 110]])
AFFINE = "affine"

# the first matching entry wins: layer 0's mlp takes the third entry, layer 1's the fourth
LAYERS = [
    {"pattern": "embed_tokens", "bits": 8},
    {"pattern": "lm_head", "bits": 8, "group_size": 32},
    {"pattern": r"layers\.0\.mlp", "bits": 3},
    {"pattern": "mlp", "bits": 2, "group_size": 32},
]


def _expected(path: str) -> dict:
    """The parameters LAYERS gives ``path`` over bits = 4, group_size = 64."""
    if "embed_tokens" in path:
        return {"group_size": 64, "bits": 8, "mode": AFFINE}
    if path == "lm_head":
        return {"group_size": 32, "bits": 8, "mode": AFFINE}
    if "layers.0.mlp" in path:
        return {"group_size": 64, "bits": 3, "mode": AFFINE}
    if ".mlp." in path:
        return {"group_size": 32, "bits": 2, "mode": AFFINE}
    return {"group_size": 64, "bits": 4, "mode": AFFINE}


def _rtn(path, bits: int, group_size: int, own: dict):
    """mlx-lm's round-to-nearest model: ``quantize_model`` at ``bits``/``group_size``, the
    layers whose path contains a key of ``own`` at its parameters."""
    from mlx_lm.utils import quantize_model

    def predicate(layer: str, module) -> dict:
        hit = next((v for k, v in own.items() if k in layer), {})
        return {"group_size": group_size, "bits": bits, **hit}

    lm, config = load_mlxlm(path)
    quantize_model(lm, config, group_size, bits, quant_predicate=predicate)
    return lm


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    return create_mlxlm_dir(tmp_path_factory.mktemp("layers") / "untied", LLAMA, seed=3)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return create_mlxlm_dir(tmp_path_factory.mktemp("layers") / "tied", TIED, seed=5)


def _student(path):
    return mlxlm_model(MlxLmModelConfig(path=str(path)), Setup())


def test_each_layer_takes_the_first_matching_entry_and_starts_as_mlx_lms_rtn(untied_dir):
    from mlx_lm.utils import compute_bits_per_weight

    student = _student(untied_dir)
    init = build("student_initializer", "quantize", bits=4, group_size=64, layers=LAYERS)
    report = init(student, [])
    modules = dict(quantize.quantized_modules(student))
    assert len(modules) == report["quantized_layers"] == 1 + 7 * 2 + 1
    for path, module in modules.items():
        assert quantize.layer_params(module) == _expected(path), path
    assert modules["model.layers.0.mlp.down_proj"].bits == 3
    assert modules["model.layers.1.mlp.down_proj"].bits == 2
    assert modules["model.layers.1.self_attn.q_proj"].bits == 4
    # what the initializer reports: the top-level widths and each layer of its own
    own = {p: _expected(p) for p in modules if _expected(p)["bits"] != 4}
    assert report["bits"] == 4 and report["group_size"] == 64
    assert report["layers"] == own and len(own) == 2 + 3 * 2
    assert student.kd_quantize.layers == {p: _expected(p) for p in modules}
    # the same tensors as mlx-lm's quantize_model given these widths per layer
    rtn = _rtn(untied_dir, 4, 64, {p: _expected(p) for p in modules})
    ours, theirs = tree_flatten(student.parameters()), tree_flatten(rtn.parameters())
    assert [k for k, _ in ours] == [k for k, _ in theirs]
    assert all(mx.array_equal(a, b).item() for (_, a), (_, b) in zip(ours, theirs))
    assert np.allclose(np.array(student(IDS).logits), np.array(rtn(IDS)), atol=1e-5)
    # what trains: every layer's scales and biases, at its own group size
    trainable = dict(tree_flatten(student.trainable_parameters()))
    assert {k.rsplit(".", 1)[-1] for k in trainable} == {"scales", "biases"}
    assert len(trainable) == 2 * len(modules)
    assert trainable["lm_head.scales"].shape == (256, 64 // 32)
    assert trainable["model.embed_tokens.scales"].shape == (256, 64 // 64)
    student.unfreeze()
    quantize.refreeze(student)
    assert dict(tree_flatten(student.trainable_parameters())).keys() == trainable.keys()
    # mlx-lm's bits per weight of the same model; the summary lists the layers of their own
    assert quantize.bits_per_weight(student) == pytest.approx(compute_bits_per_weight(rtn))
    summary = quantize.summary(student)
    assert summary["layers"] == own and summary["bits"] == 4
    entry = mlx_lm_config(student)["quantization"]
    assert entry == {"group_size": 64, "bits": 4, "mode": AFFINE, **own}


def test_a_tied_embedding_at_8_bits_is_the_head_at_8_bits_and_mlx_lm_loads_it(tied_dir, tmp_path):
    from mlx_lm.utils import load

    student = _student(tied_dir)
    float_embed = np.array(student.lm.model.embed_tokens.weight)
    layers = [{"pattern": "embed_tokens", "bits": 8}]
    build("student_initializer", "quantize", bits=4, group_size=32, layers=layers)(student, [])
    embed = student.lm.model.embed_tokens
    assert "lm_head" not in student.lm
    assert isinstance(embed, nn.QuantizedEmbedding)
    assert (embed.bits, embed.group_size) == (8, 32)
    assert student.lm.model.layers[0].self_attn.q_proj.bits == 4
    # the head is the embedding's as_linear: its 8-bit weights, nearer the float head than
    # the 4-bit ones the other layers get (the CPU's dequantized product = MLX's kernel)
    h = mx.random.normal((2, 3, 64), key=mx.random.key(0))
    head = np.array(embed.as_linear(h))
    assert np.allclose(head, np.array(nn.QuantizedEmbedding.as_linear(embed, h)), atol=1e-4)
    four = nn.QuantizedEmbedding.from_embedding(
        nn.Embedding(256, 64).update({"weight": mx.array(float_embed)}), 32, 4
    )
    exact = np.array(h) @ float_embed.T
    err8 = np.abs(head - exact).max()
    err4 = np.abs(np.array(four.as_linear(h)) - exact).max()
    assert err8 < err4 / 4, (err8, err4)
    rtn = _rtn(tied_dir, 4, 32, {"embed_tokens": {"group_size": 32, "bits": 8}})
    logits = np.array(student(IDS).logits)
    assert np.allclose(logits, np.array(rtn(IDS)), atol=1e-5)
    # saved as the engine saves it: an mlx-lm folder whose config names the 8-bit layer
    out = tmp_path / "student"
    assert save_student(student, out, "mlx-lm", None, None)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "mode": AFFINE,
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": AFFINE},
    }
    model, _ = load(str(out))
    assert (model.model.embed_tokens.bits, model.model.layers[0].mlp.up_proj.bits) == (8, 4)
    assert np.allclose(np.array(model(IDS)), logits, atol=1e-4)
    # kdcore's loaders: quantized as saved, and dequantized (what kd eval computes with)
    again = load_quantized_model(out)
    assert again.lm.model.embed_tokens.bits == 8
    assert np.allclose(np.array(again(IDS).logits), logits, atol=1e-4)
    from kdcore.models.io import load_model

    dense = load_model(out)[0]
    assert not quantize.has_quantized(dense)
    assert np.allclose(np.array(dense(IDS).logits), logits, atol=1e-4)


def test_a_distilled_mixed_student_saves_what_mlx_lm_loads_and_kd_eval_reads(
    tied_dir, corpus, tmp_path
):
    from mlx_lm.utils import compute_bits_per_weight, load

    from kdcore.analysis.evaluate_run import evaluate_run
    from kdcore.engine.rundir import open_run

    embed = {"group_size": 64, "bits": 8, "mode": AFFINE}
    spec = {
        "run": {"name": "layers", "seed": 0},
        "data": {"name": "text", "params": {"path": str(corpus), "seq_len": 32}},
        "teachers": [{"source": "mlx-lm", "path": str(tied_dir)}],
        "student": {
            "model": {"name": "mlx-lm", "params": {"path": str(tied_dir)}},
            "init": {
                "name": "quantize",
                "params": {
                    "bits": 3,
                    "group_size": 32,
                    "layers": [{"pattern": "embed_tokens", "bits": 8, "group_size": 64}],
                },
            },
        },
        "losses": [{"name": "hinton", "params": {"temperature": 1.0}}],
        "train": {
            "steps": 3,
            "batch_size": 4,
            "log_every": 1,
            "final_checkpoint": True,
            "optimizer": {"name": "adam", "lr": 1e-3},
        },
        "eval": {"batches": 2},
    }
    run = tmp_path / "run"
    app.distill(spec, output=run, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["init"]["layers"] == {"model.embed_tokens": embed}
    q = summary["quantization"]
    assert (q["bits"], q["group_size"], q["layers"]) == (3, 32, {"model.embed_tokens": embed})
    config = json.loads((run / "student" / "config.json").read_text())
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 3,
        "mode": AFFINE,
        "model.embed_tokens": embed,
    }
    model, _ = load(str(run / "student"))
    assert (model.model.embed_tokens.bits, model.model.embed_tokens.group_size) == (8, 64)
    assert model.model.layers[1].self_attn.o_proj.bits == 3
    # the bits per weight the run reports are those of the folder mlx-lm loads
    assert q["bits_per_weight"] == pytest.approx(compute_bits_per_weight(model))
    # the trained student as kdcore rebuilds it (spec + last checkpoint) = mlx-lm's load
    parts = open_run(run)
    assert parts.student.lm.model.embed_tokens.bits == 8
    ours = np.array(parts.student(IDS).logits)
    assert np.allclose(np.array(model(IDS)), ours, atol=1e-4)
    # trained: not the RTN model it started as
    rtn = _rtn(tied_dir, 3, 32, {"embed_tokens": embed})
    assert not np.allclose(np.array(rtn(IDS)), ours, atol=1e-4)
    # kd eval reads the saved folder: the run's own figures
    report = evaluate_run(run)
    assert report["kl_teacher_student"] == pytest.approx(
        summary["eval"]["kl_teacher_student"], rel=1e-4
    )


def test_a_spec_without_layers_hashes_as_before_them_and_their_order_counts():
    """``layers`` came after quantize runs existed: left at [] a spec hashes as it did
    (33af32271a8289b3, computed with kdcore at commit 153e722), so those runs resume; the
    entries' order decides a layer's width, so two orders are two runs."""
    from kdcore import testing
    from kdcore.engine.rundir import spec_hash
    from kdcore.spec.load import load_spec, spec_to_dict

    spec = testing.tiny_spec("data.txt", [{"name": "hinton"}], teachers=[{"path": "teacher"}])
    params = {"bits": 4, "group_size": 32, "start": "student"}
    spec["student"]["init"] = {"name": "quantize", "params": params}

    def digest() -> str:
        return spec_hash(spec_to_dict(load_spec(spec)))

    assert digest() == "33af32271a8289b3"
    params["layers"] = LAYERS[:2]
    first = digest()
    params["layers"] = LAYERS[:2][::-1]
    assert first != digest() != "33af32271a8289b3"
