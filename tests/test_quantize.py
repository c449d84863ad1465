"""The ``quantize`` student initializer: a model distilled into its own low-bit version
(issue 24; extra: kdcore[mlx-lm]).

The student's linear and embedding layers become MLX quantized layers; only their
quantization ``scales`` and ``biases`` train (the packed weights never do), unless a
parameter group opens more. Every model here is made offline (``create_mlxlm_dir``).
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kdcore import app
from kdcore.errors import SpecError
from kdcore.io import load_arrays
from kdcore.models.mlxlm import MlxLmModelConfig, create_mlxlm_dir, load_mlxlm, mlxlm_model
from kdcore.models.save import load_quantized_model
from kdcore.registry.setup import Setup
from kdcore.spec.build import build
from kdcore.spec.schema import ParamGroup
from kdcore.spec.tomlwrite import dumps as toml_dumps
from kdcore.testing import run_kd, tiny_spec

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
IDS = mx.array([[70, 105, 114, 115, 116, 32, 67, 105], [10, 84, 104, 101, 32, 107, 105, 110]])
# embed_tokens, 7 linear layers in each of 2 decoder layers, lm_head
LAYERS = 1 + 7 * 2 + 1
NORMS = 2 * 2 + 1


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return create_mlxlm_dir(tmp_path_factory.mktemp("quantize") / "base", LLAMA, seed=3)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, corpus):
    """A tiny mlx-lm llama trained with ce (a real quantization gap to recover)."""
    out = tmp_path_factory.mktemp("quantize-teacher") / "run"
    spec = _spec(corpus, None, {"name": "mlx-lm", "params": {"config": LLAMA}}, None, steps=60)
    spec["losses"] = [{"name": "ce"}]
    spec["train"]["optimizer"]["lr"] = 3e-3
    app.distill(spec, output=out, progress=False)
    return out / "student"


def _student(path):
    return mlxlm_model(MlxLmModelConfig(path=str(path)), Setup())


def _trainable(model) -> dict:
    return dict(tree_flatten(model.trainable_parameters()))


def _rtn(path, bits: int, group_size: int):
    """The plain round-to-nearest model: mlx-lm's own ``quantize_model``."""
    from mlx_lm.utils import quantize_model

    lm, config = load_mlxlm(path)
    quantize_model(lm, config, group_size, bits)
    return lm


def _spec(corpus, teacher, student, init, steps=4, **init_params):
    spec = {
        "run": {"name": "quantize", "seed": 0},
        "data": {
            "name": "text",
            "params": {"path": str(corpus), "seq_len": 32, "max_chars": 12000},
        },
        "student": {"model": student},
        "losses": [{"name": "hinton", "params": {"temperature": 1.0}}],
        "train": {
            "steps": steps,
            "batch_size": 4,
            "log_every": 1,
            # scales are ~1e-2: mlx-lm's DWQ steps them at 1e-6 (bfloat16 models)
            "optimizer": {"name": "adam", "lr": 1e-4},
        },
        "eval": {"batches": 4},
    }
    if init is not None:
        spec["student"]["init"] = {"name": init, "params": init_params}
    if teacher is not None:
        spec["teachers"] = [{"source": "mlx-lm", "path": str(teacher)}]
    return spec


def _distill(tmp_path, capsys, spec, name="run"):
    path = tmp_path / f"{name}.toml"
    path.write_text(toml_dumps(spec))
    capsys.readouterr()
    code = run_kd("distill", path, "--output", tmp_path / name)
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- the trainable set


def test_only_scales_and_biases_train_and_the_student_starts_as_rtn(base_dir):
    from kdcore.models import quantize

    student = _student(base_dir)
    report = build("student_initializer", "quantize", bits=4, group_size=32)(student, [])
    # quantized as mlx-lm quantizes: the same tensors as its round-to-nearest model (the
    # product may run dequantized on the CPU: equal up to float rounding)
    rtn = _rtn(base_dir, 4, 32)
    assert all(
        mx.array_equal(a, b).item()
        for (_, a), (_, b) in zip(
            tree_flatten(student.parameters()), tree_flatten(rtn.parameters())
        )
    )
    assert isinstance(student.lm.lm_head, nn.QuantizedLinear)
    assert isinstance(student.lm.model.embed_tokens, nn.QuantizedEmbedding)
    assert np.allclose(np.array(student(IDS).logits), np.array(rtn(IDS)), atol=1e-5)
    trainable = _trainable(student)
    assert {k.rsplit(".", 1)[-1] for k in trainable} == {"scales", "biases"}
    assert len({k.rsplit(".", 1)[0] for k in trainable}) == LAYERS == report["quantized_layers"]
    assert report["trainable_parameters"] == sum(v.size for v in trainable.values())
    assert report["start"] == "student" and report["bits"] == 4 and report["group_size"] == 32
    # the engine unfreezes everything at each stage; refreeze restores the split
    student.unfreeze()
    assert "model.norm.weight" in _trainable(student)
    quantize.refreeze(student)
    assert _trainable(student).keys() == trainable.keys()
    # a parameter group (lr_mult > 0) opens what it names, first match wins as in the optimizer
    quantize.refreeze(student, [ParamGroup(pattern="norm")])
    opened = set(_trainable(student)) - set(trainable)
    assert len(opened) == NORMS and all("norm" in k for k in opened)
    groups = [ParamGroup(pattern="input_layernorm", lr_mult=0.0), ParamGroup(pattern="norm")]
    quantize.refreeze(student, groups)
    assert len(set(_trainable(student)) - set(trainable)) == NORMS - 2
    # the packed weights never train, whatever a group says
    quantize.refreeze(student, [ParamGroup(pattern=".")])
    everything = _trainable(student)
    assert all(v.dtype != mx.uint32 for v in everything.values())
    assert len(everything) == len(trainable) + NORMS


def test_skip_leaves_layers_in_full_precision_and_frozen(base_dir):
    student = _student(base_dir)
    report = build("student_initializer", "quantize", group_size=64, skip=["lm_head"])(student, [])
    assert report["quantized_layers"] == LAYERS - 1
    assert type(student.lm.lm_head) is nn.Linear
    assert not any(k.startswith("lm_head") for k in _trainable(student))


def test_the_builtin_transformer_quantizes_trains_saves_and_loads(tmp_path, corpus, capsys):
    from kdcore.models import quantize
    from kdcore.models.io import load_model

    spec = tiny_spec(corpus, steps=3, dim=64)
    spec["student"]["init"] = {
        "name": "quantize",
        "params": {"bits": 3, "group_size": 32, "start": "student"},
    }
    code, err = _distill(tmp_path, capsys, spec)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["init"]["quantized_layers"] == 1 + 2 * 7  # embed (tied head) + 7 per block
    assert summary["trainable_parameters"] == summary["init"]["trainable_parameters"]
    assert summary["quantization"]["bits"] == 3
    out = tmp_path / "run" / "student"
    again = load_quantized_model(out)
    assert quantize.has_quantized(again)
    # kdcore's own layout holds the dequantized model: kd eval and every loader open it
    plain, arch, _ = load_model(out)
    assert arch == "transformer" and not quantize.has_quantized(plain)
    a, b = np.array(again(IDS).logits), np.array(plain(IDS).logits)
    assert np.allclose(a, b, atol=1e-4)


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("params", "where", "words"),
    [
        ({"bits": 1}, "$.student.init.params.bits", ()),
        ({"bits": 9}, "$.student.init.params.bits", ()),
        ({"bits": 7}, "$.student.init.params.bits", ("affine",)),
        ({"mode": "mxfp4", "bits": 3}, "$.student.init.params.bits", ("mxfp4",)),
        ({"group_size": 48}, "$.student.init.params.group_size", ()),
        ({"group_size": 128}, "$.student.init.params.group_size", ("divide",)),
        ({"skip": ["("]}, "$.student.init.params.skip", ()),
        ({"skip": ["."]}, "$.student.init.params.skip", ("no layer",)),
        # per-layer widths (layers): the entry's own key, or layers with the entry named
        ({"layers": [{"pattern": "(", "bits": 8}]}, "$.student.init.params.layers[0].pattern", ()),
        ({"layers": [{"pattern": "embed", "bits": 9}]}, "$.student.init.params.layers[0].bits", ()),
        (
            {"layers": [{"pattern": "embed", "group_size": 0}]},
            "$.student.init.params.layers[0].group_size",
            (),
        ),
        (
            {"layers": [{"pattern": "embed", "bitz": 8}]},
            "$.student.init.params.layers[0].bitz",
            ("unknown key",),
        ),
        (
            {"layers": {"embed_tokens": {"bits": 8}}},
            "$.student.init.params.layers[0]",
            ("list", "not a table keyed by pattern"),
        ),
        (
            {"layers": [{"pattern": "x", "bits": 4}, {"pattern": "embed", "bits": 7}]},
            "$.student.init.params.layers",
            ("layers[1] ('embed') bits = 7", "affine"),
        ),
        (
            {"layers": [{"pattern": "embed", "group_size": 48}]},
            "$.student.init.params.layers",
            ("layers[0]", "group_size = 48"),
        ),
        (
            {"mode": "mxfp4", "layers": [{"pattern": "embed", "bits": 8}]},
            "$.student.init.params.layers",
            ("mxfp4", "bits = 8"),
        ),
        ({"layers": [{"pattern": "embed"}]}, "$.student.init.params.layers", ("neither",)),
        (
            {"layers": [{"pattern": "embed_tokens", "bits": 8}, {"pattern": "nope", "bits": 8}]},
            "$.student.init.params.layers",
            ("['nope']", "no layer"),
        ),
        (  # every q_proj is taken by the first entry: the second sets nothing
            {"layers": [{"pattern": "proj", "bits": 8}, {"pattern": "q_proj", "bits": 3}]},
            "$.student.init.params.layers",
            ("['q_proj']",),
        ),
        (  # skip comes first: a skipped layer stays in full precision
            {"skip": ["lm_head"], "layers": [{"pattern": "lm_head", "bits": 8}]},
            "$.student.init.params.layers",
            ("['lm_head']",),
        ),
        (  # the head's input size is 64
            {"layers": [{"pattern": "lm_head", "group_size": 128}]},
            "$.student.init.params.layers[0].group_size",
            ("group_size 128 does not divide", "lm_head (64)"),
        ),
    ],
)
def test_bad_settings_are_spec_errors_naming_the_place(
    base_dir, corpus, tmp_path, capsys, params, where, words
):
    student = {"name": "mlx-lm", "params": {"path": str(base_dir)}}
    code, err = _distill(tmp_path, capsys, _spec(corpus, base_dir, student, "quantize", **params))
    assert code == 2, err
    assert where in err and all(w in err for w in words), err
    assert any(line.rstrip().endswith(f"@ {where}") for line in err.splitlines()), err
    assert "Traceback" not in err


def test_a_fresh_student_without_a_teacher_to_copy_is_refused():
    from kdcore.models.transformer import Transformer, TransformerConfig

    init = build("student_initializer", "quantize")
    with pytest.raises(SpecError, match=r"\$\.student\.init\.params\.start"):
        init(Transformer(TransformerConfig(dim=64, layers=1, heads=2)), [])


# ---------------------------------------------------------------- end to end


def test_distill_changes_scales_keeps_packed_weights_and_mlx_lm_loads_it(
    base_dir, corpus, tmp_path, capsys
):
    from mlx_lm import generate, load

    student = {"name": "mlx-lm", "params": {"path": str(base_dir)}}
    spec = _spec(corpus, base_dir, student, "quantize", bits=4, group_size=32)
    code, err = _distill(tmp_path, capsys, spec)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rtn = _rtn(base_dir, 4, 32)
    reference = dict(tree_flatten(rtn.parameters()))
    scales = {k: v for k, v in reference.items() if k.endswith((".scales", ".biases"))}
    assert summary["trainable_parameters"] == sum(v.size for v in scales.values())
    q = summary["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 32 and q["quantized_layers"] == LAYERS
    # mlx-lm's figure: bytes * 8 / parameters (4 bits + 2 float32 per 32 weights = 6)
    assert 5.9 < q["bits_per_weight"] < 8.0
    assert q["parameters"] == sum(
        v.size for _, v in tree_flatten(load_mlxlm(base_dir)[0].parameters())
    )
    out = tmp_path / "run" / "student"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]
    saved = load_arrays(out / "model.safetensors")
    assert saved.keys() == reference.keys()
    packed = [k for k, v in reference.items() if v.dtype == mx.uint32]
    assert len(packed) == LAYERS
    for key in packed:  # bit-identical packed weights
        assert mx.array_equal(saved[key], reference[key]).item(), key
    moved = [k for k in scales if not mx.array_equal(saved[k], scales[k]).item()]
    assert len(moved) > len(scales) // 2
    model, tokenizer = load(str(out))
    rtn.load_weights(list(saved.items()), strict=True)
    assert mx.array_equal(model(IDS), rtn(IDS)).item()
    text = generate(model, tokenizer, "First", max_tokens=6)
    assert isinstance(text, str)


def test_distillation_recovers_loss_over_round_to_nearest(trained_dir, corpus, tmp_path, capsys):
    """A tiny case: 3 bits; 30 steps of forward KL bring the student nearer its teacher
    (and lower its cross-entropy on the whole held-out split) than the round-to-nearest
    model it starts as."""
    from kdcore.engine.evaluate import evaluate
    from kdcore.models.mlxlm import MlxLmModel, load_kd_model
    from kdcore.testing import build_run

    student = {"name": "mlx-lm", "params": {"path": str(trained_dir)}}
    spec = _spec(corpus, trained_dir, student, "quantize", steps=30, bits=3, group_size=32)
    code, err = _distill(tmp_path, capsys, spec)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    parts = build_run(spec)  # the same held-out rows as the run's evaluation
    rows = list(parts.dataset.batches(4, "val", 4))
    teacher, _, _ = load_kd_model(trained_dir)
    lm, config = load_mlxlm(trained_dir)
    rtn = MlxLmModel(_rtn(trained_dir, 3, 32), config)
    base = evaluate(rtn, teacher, rows)
    kd = evaluate(load_kd_model(tmp_path / "run" / "student")[0], teacher, rows)
    # the saved folder reloaded gives the run's own figure, to float32 rounding (the BLAS's
    # kernels order the sums; 1e-6 relative apart measured with OpenBLAS's SkylakeX ones)
    assert kd["kl_teacher_student"] == pytest.approx(
        summary["eval"]["kl_teacher_student"], rel=1e-5
    )
    assert kd["kl_teacher_student"] < 0.8 * base["kl_teacher_student"], (kd, base)
    # held-out cross-entropy on every val row (1,184 tokens): on the 512 above the two are
    # within noise of each other (0.002 nats either way, depending on the BLAS's rounding)
    every = list(parts.dataset.batches(4, "val"))
    kd_all = evaluate(load_kd_model(tmp_path / "run" / "student")[0], teacher, every)
    base_all = evaluate(rtn, teacher, every)
    assert kd_all["tokens"] > 1000
    assert kd_all["val_loss"] < base_all["val_loss"], (kd_all, base_all)


# ---------------------------------------------------------------- killed and resumed

KILLER = """
import os, sys
import kdcore
from kdcore import app
from kdcore.registry.manager import reset_registry

class Killer:
    def __init__(self, config, setup):
        pass
    def on_log(self, step, record):
        if step == int(os.environ["KILL_AT"]):
            os._exit(9)  # no cleanup, like SIGKILL

class Plugin:
    @kdcore.hookimpl
    def kd_run_callbacks(self):
        return [kdcore.Component("killer", Killer, doc="dies")]

reset_registry([(Plugin(), "test-killer")])
app.distill(app.load_spec(sys.argv[1]), output=sys.argv[2], resume=sys.argv[3] == "1",
            progress=False)
"""


def test_a_quantized_run_killed_after_a_checkpoint_resumes_to_the_same_student(tmp_path, corpus):
    import os
    import subprocess
    import sys

    from kdcore.engine.checkpoint import latest_checkpoint
    from kdcore.models import quantize

    spec = tiny_spec(corpus, steps=8, dim=64)
    # per-layer widths too: the tied embedding (the head) at 8 bits and group size 64,
    # the down projections at 3 bits; a resumed run must rebuild them to take its scales
    layers = [
        {"pattern": "embed", "bits": 8, "group_size": 64},
        {"pattern": r"mlp\.down_proj", "bits": 3},
    ]
    spec["student"]["init"] = {
        "name": "quantize",
        "params": {"bits": 4, "group_size": 32, "start": "student", "layers": layers},
    }
    spec["train"].update({"checkpoint_every": 4, "log_every": 1})
    spec["callbacks"] = [{"name": "killer"}]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)

    def run(out: str, resume: bool, kill_at: int):
        env = dict(os.environ, KILL_AT=str(kill_at))
        argv = [sys.executable, str(script), str(path), str(tmp_path / out), str(int(resume))]
        return subprocess.run(argv, env=env, capture_output=True, text=True)

    full = run("full", False, 999)
    assert full.returncode == 0, full.stderr
    killed = run("cut", False, 6)
    assert killed.returncode == 9, killed.stderr
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-0000004"
    resumed = run("cut", True, 999)
    assert resumed.returncode == 0, resumed.stderr

    def losses(out):
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    a, b = losses("full"), losses("cut")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    wa = load_quantized_model(tmp_path / "full" / "student")
    wb = load_quantized_model(tmp_path / "cut" / "student")
    assert quantize.has_quantized(wb)
    widths = {p: (m.bits, m.group_size) for p, m in quantize.quantized_modules(wb)}
    assert widths["embed"] == (8, 64)
    assert widths["blocks.1.mlp.down_proj"] == (3, 32)
    assert widths["blocks.1.mlp.up_proj"] == widths["blocks.0.attention.q_proj"] == (4, 32)
    assert widths == {p: (m.bits, m.group_size) for p, m in quantize.quantized_modules(wa)}
    for (ka, va), (kb, vb) in zip(tree_flatten(wa.parameters()), tree_flatten(wb.parameters())):
        assert ka == kb
        np.testing.assert_allclose(np.array(va), np.array(vb), rtol=1e-4, atol=1e-6)
