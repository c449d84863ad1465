"""The ``lora`` student initializer (extra: kdcore[mlx-lm]).

``test_lora_run_*`` go through the engine and need its patch (adapters stay the only
trainable tensors across stages; LoRA students are saved as adapters).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kdcore import app
from kdcore.errors import SpecError
from kdcore.io import load_arrays
from kdcore.models import lora
from kdcore.models.mlxlm import MlxLmModelConfig, create_mlxlm_dir, mlxlm_model
from kdcore.models.transformer import Transformer
from kdcore.registry.setup import Setup
from kdcore.spec.build import build

LLAMA = dict(
    model_type="llama",
    hidden_size=32,
    num_hidden_layers=3,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=256,
    tie_word_embeddings=True,
)
IDS = mx.array([[70, 105, 114, 115, 116, 32, 67, 105]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return create_mlxlm_dir(tmp_path_factory.mktemp("lora") / "base", LLAMA, seed=7)


def _student(base_dir):
    return mlxlm_model(MlxLmModelConfig(path=str(base_dir)), Setup())


def _trainable(model):
    return dict(tree_flatten(model.trainable_parameters()))


def test_only_chosen_adapters_train_and_start_at_the_base(base_dir):
    student = _student(base_dir)
    before = student(IDS).logits
    init = build(
        "student_initializer",
        "lora",
        rank=4,
        num_layers=2,
        keys=["self_attn.q_proj", "self_attn.v_proj"],
    )
    report = init(student, [])
    trainable = _trainable(student)
    # rank r adapters on q (32 -> 32) and v (32 -> 16) of the last 2 of 3 layers
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert report["adapter_parameters"] == expected == sum(v.size for v in trainable.values())
    assert all(k.startswith(("model.layers.1.", "model.layers.2.")) for k in trainable)
    assert {k.rsplit(".", 1)[-1] for k in trainable} == {"lora_a", "lora_b"}
    assert report["lora_layers"] == 4
    # B = 0: the student starts as the base model
    assert mx.array_equal(student(IDS).logits, before).item()
    # the engine unfreezes everything at a stage; refreeze restores the split
    student.unfreeze()
    assert len(_trainable(student)) > len(trainable)
    lora.refreeze(student)
    assert _trainable(student).keys() == trainable.keys()


def test_fused_weights_equal_the_adapted_model(base_dir):
    student = _student(base_dir)
    build("student_initializer", "lora", rank=2, scale=3.0)(student, [])
    # a non-zero B so that the adapters change the output
    for _, module in lora.lora_modules(student):
        module.lora_b = mx.random.normal(module.lora_b.shape) * 0.1
    adapted = student(IDS).logits
    fused = _student(base_dir)
    fused.load_weights(list(lora.fused_weights(student).items()), strict=True)
    assert np.allclose(np.array(fused(IDS).logits), np.array(adapted), atol=1e-5)
    assert not np.allclose(np.array(adapted), np.array(_student(base_dir)(IDS).logits))


def test_bad_settings_are_spec_errors(base_dir):
    with pytest.raises(SpecError, match="no layer matched"):
        build("student_initializer", "lora", keys=["nope"])(_student(base_dir), [])
    with pytest.raises(SpecError, match="num_layers"):
        build("student_initializer", "lora", num_layers=9)(_student(base_dir), [])
    with pytest.raises(SpecError, match="rank"):
        build("student_initializer", "lora", rank=0)


def _spec(corpus, base_dir, student, steps=3, **init):
    return {
        "run": {"name": "lora", "seed": 0},
        "data": {"name": "text", "params": {"path": str(corpus), "seq_len": 16, "max_chars": 8000}},
        "student": {"model": student, "init": {"name": "lora", "params": init}},
        "teachers": [{"source": "mlx-lm", "path": str(base_dir)}],
        "losses": [{"name": "ce"}, {"name": "uld"}],
        "train": {
            "steps": steps,
            "batch_size": 2,
            "log_every": 1,
            "optimizer": {"name": "adamw", "lr": 1e-2},
        },
        "eval": {"batches": 1},
    }


def test_lora_run_saves_adapters_mlx_lm_loads(base_dir, corpus, tmp_path):
    """Needs the engine patch: lora.refreeze at each stage, adapters saved by save_student."""
    from mlx_lm import load

    from kdcore.engine.build import build_parts
    from kdcore.engine.distill import train_parts

    spec = _spec(
        corpus,
        base_dir,
        {"name": "mlx-lm", "params": {"path": str(base_dir)}},
        rank=4,
        keys=["self_attn.q_proj", "self_attn.v_proj"],
    )
    run = build_parts(app.load_spec(spec))
    summary = train_parts(run, tmp_path / "run", progress=False)
    adapters = lora.adapter_weights(run.student)
    assert summary["trainable_parameters"] == sum(v.size for v in adapters.values()) == 3 * 448
    assert summary["init"]["from"] == "lora"
    # the base weights did not move
    base = load_arrays(base_dir / "model.safetensors")
    now = dict(tree_flatten(run.student.parameters()))
    for name, value in base.items():
        key = name.replace("q_proj.weight", "q_proj.linear.weight").replace(
            "v_proj.weight", "v_proj.linear.weight"
        )
        assert mx.array_equal(now[key], value).item(), name
    out = tmp_path / "run" / "student"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 4
    saved = load_arrays(out / "adapters.safetensors")
    assert saved.keys() == adapters.keys()
    assert any(float(mx.abs(v).max()) > 0 for k, v in saved.items() if k.endswith("lora_b"))
    run.student.eval()
    expected = np.array(run.student(IDS).logits)
    with_adapters, _ = load(str(base_dir), adapter_path=str(out))
    assert np.allclose(np.array(with_adapters(IDS)), expected, atol=1e-5)
    fused, _ = load(str(out))  # the fused model beside the adapters
    assert np.allclose(np.array(fused(IDS)), expected, atol=1e-4)


def test_lora_run_on_the_builtin_transformer(corpus, tmp_path, base_dir):
    """Needs the engine patch. kdcore's transformer names its layers ``blocks``."""
    from kdcore.engine.build import build_parts
    from kdcore.engine.distill import train_parts
    from kdcore.models.io import load_model

    spec = _spec(
        corpus,
        base_dir,
        {"name": "transformer", "params": {"dim": 32, "layers": 2, "heads": 2, "max_seq_len": 16}},
        rank=2,
        keys=["attention.q_proj"],
        dora=True,
    )
    spec["teachers"] = []
    spec["losses"] = [{"name": "ce"}]
    run = build_parts(app.load_spec(spec))
    summary = train_parts(run, tmp_path / "run", progress=False)
    assert summary["trainable_parameters"] == 2 * (2 * (32 + 32) + 32)  # A, B and DoRA's m
    out = tmp_path / "run" / "student"
    assert (out / "adapters.safetensors").exists()
    model, arch, _ = load_model(out)  # the fused model in kdcore's layout
    assert isinstance(model, Transformer) and arch == "transformer"
    assert np.allclose(np.array(model(IDS).logits), np.array(run.student(IDS).logits), atol=1e-4)
