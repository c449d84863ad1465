"""The engine's fused head + loss path equals the full-logit path: every token loss that
declares rows, from dense, cached (top-k) and mixed teachers, tied and untied heads, the
built-in transformer and mlx-lm students; values and gradients, float32, 1e-5 relative.

Each case builds one run twice from the same spec (``train.fused_loss`` true and false)
and takes the value and gradient of the step's loss on the same batch."""

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
from kdcore.cache import write as kc_write
from kdcore.engine.step import loss_terms
from kdcore.models.mlxlm import create_mlxlm_dir

LOSSES = {
    "ce": {"label_smoothing": 0.1},
    "hinton": {"temperature": 2.0},
    "hinton_topk": {"temperature": 1.5, "top_k": 8, "tail": "tail-bucket"},
    "selective": {"temperature": 1.0, "top_k": 8, "min_entropy": 2.0},
    "reverse_kl": {"temperature": 1.5, "t_squared": True},
    "skew_kl": {"alpha": 0.2},
    "skew_reverse_kl": {"alpha": 0.3},
    "gjsd": {"beta": 0.4, "temperature": 2.0},
    "tvd": {},
    "bidirectional_kl": {"forward_weight": 0.7, "reverse_weight": 0.3},
    "bild": {"top_k": 4, "prompt_kl": 0.5},
    "minillm": {"lmbda": 0.0},
}
SPARSE_LOSSES = [n for n in LOSSES if n not in ("selective", "minillm")]
MIXED_LOSSES = [n for n in LOSSES if n not in ("bild", "selective", "minillm")]


def loss_entry(key: str) -> dict:
    name = "hinton" if key == "hinton_topk" else key
    return {"name": name, "params": dict(LOSSES[key])}


def compare(spec: dict) -> tuple[dict, dict]:
    """Value, terms and gradients of step 0, fused and not; returns the two term dicts."""
    results = []
    for fused in (True, False):
        spec = {**spec, "train": {**spec["train"], "fused_loss": fused}}
        parts = testing.build_run(spec)
        batch = testing.prepare_batch(parts, parts.dataset.batch(0, 4), 0)
        signals = parts.teacher_signals(batch)

        def objective(trainable, parts=parts, batch=batch, signals=signals):
            total, terms, metrics = loss_terms(parts, trainable, batch, signals, 0)
            return total, (terms, metrics)

        (total, (terms, metrics)), grads = nn.value_and_grad(parts.trainable, objective)(
            parts.trainable
        )
        mx.eval(total, terms, metrics, grads)
        results.append((total, terms, metrics, dict(tree_flatten(grads))))
    (ft, fterms, fmetrics, fgrads), (pt, pterms, pmetrics, pgrads) = results
    close(ft, pt, "total")
    assert fterms.keys() == pterms.keys()
    for k in fterms:
        close(fterms[k], pterms[k], k)
    for k in pmetrics:
        close(fmetrics[k], pmetrics[k], k)
    assert fgrads.keys() == pgrads.keys()
    for k in fgrads:
        close(fgrads[k], pgrads[k], k)
    return fterms, pterms


def close(got, ref, what: str, tol: float = 1e-5) -> None:
    got = np.asarray(mx.array(got).astype(mx.float32), np.float64)
    ref = np.asarray(mx.array(ref).astype(mx.float32), np.float64)
    scale = max(float(np.abs(ref).max()), 1e-6)
    err = float(np.abs(got - ref).max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, corpus) -> dict:
    root = tmp_path_factory.mktemp("fused-teachers")
    first = testing.save_random_model(root / "a", dim=24, seed=1)
    second = testing.save_random_model(root / "b", dim=16, seed=2)
    spec = testing.tiny_spec(corpus, teachers=[{"path": str(first)}])
    cache = root / "cache"
    kc_write.write_cache(spec, cache, top_k=16, dtype="float32", progress=False)
    return {"a": first, "b": second, "cache": cache}


def student(tied: bool) -> dict:
    params = {"dim": 32, "layers": 1, "heads": 2, "max_seq_len": 32, "tie_embeddings": tied}
    return {"model": {"name": "transformer", "params": params}}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_dense_teacher(loss, tied, corpus, teachers):
    spec = testing.tiny_spec(
        corpus, [loss_entry(loss)], teachers=[{"path": str(teachers["a"])}], student=student(tied)
    )
    compare(spec)


@pytest.mark.parametrize("loss", SPARSE_LOSSES)
def test_cached_teacher(loss, corpus, teachers):
    entry = loss_entry(loss)
    if "temperature" in entry["params"]:  # a tail bucket is exact only at capture T = 1
        entry["params"]["temperature"] = 1.0
    spec = testing.tiny_spec(corpus, [entry], teachers=[{"cache": str(teachers["cache"])}])
    compare(spec)


@pytest.mark.parametrize("loss", MIXED_LOSSES)
def test_mixed_teachers(loss, corpus, teachers):
    spec = testing.tiny_spec(
        corpus,
        [loss_entry(loss)],
        teachers=[{"path": str(teachers["a"])}, {"path": str(teachers["b"])}],
        aggregator={"name": "weighted", "params": {"weights": [0.7, 0.3]}},
        student=student(False),
    )
    compare(spec)


def test_a_dense_and_a_cached_teacher_mixed(corpus, teachers):
    spec = testing.tiny_spec(
        corpus,
        [{"name": "hinton", "params": {"temperature": 1.0}}, loss_entry("skew_kl")],
        teachers=[{"path": str(teachers["b"])}, {"cache": str(teachers["cache"])}],
    )
    compare(spec)


def test_several_losses_share_one_pass_and_keep_their_terms(corpus, teachers):
    losses = [loss_entry("ce"), loss_entry("hinton"), loss_entry("reverse_kl")]
    losses[1]["weight"] = 0.5
    spec = testing.tiny_spec(corpus, losses, teachers=[{"path": str(teachers["a"])}])
    fused, plain = compare(spec)
    assert set(fused) == {"ce", "hinton", "reverse_kl"}


QWEN3 = dict(
    model_type="qwen3",
    hidden_size=32,
    num_hidden_layers=1,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-6,
    vocab_size=256,
    max_position_embeddings=128,
    rope_theta=10000.0,
)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_mlxlm_student_and_teacher(tied, tmp_path, corpus):
    config = {**QWEN3, "tie_word_embeddings": tied}
    t_dir = create_mlxlm_dir(tmp_path / "teacher", {**config, "hidden_size": 48}, seed=1)
    s_dir = create_mlxlm_dir(tmp_path / "student", config, seed=2)
    spec = testing.tiny_spec(
        corpus,
        [loss_entry("ce"), loss_entry("gjsd")],
        teachers=[{"source": "mlx-lm", "path": str(t_dir)}],
        student={"model": {"name": "mlx-lm", "params": {"path": str(s_dir)}}},
    )
    compare(spec)


def test_an_mlxlm_folder_as_a_plain_path_teacher_is_the_mlxlm_source(tmp_path, corpus):
    """``path = MLX_LM_FOLDER`` with the default source loads it as kdcore's model source
    does (it crashed on the dtype choice the wrapper did not carry) and teaches exactly
    what ``source = "mlx-lm"`` teaches."""
    config = {**QWEN3, "hidden_size": 48, "tie_word_embeddings": True}
    t_dir = create_mlxlm_dir(tmp_path / "teacher", config, seed=1)
    totals = []
    for teacher in ({"path": str(t_dir)}, {"source": "mlx-lm", "path": str(t_dir)}):
        spec = testing.tiny_spec(corpus, [loss_entry("hinton")], teachers=[teacher])
        parts = testing.build_run(spec)
        batch = testing.prepare_batch(parts, parts.dataset.batch(0, 4), 0)
        total, _, _ = loss_terms(parts, parts.trainable, batch, parts.teacher_signals(batch), 0)
        totals.append(total.item())
    assert totals[0] == totals[1] and np.isfinite(totals[0])


def test_mlxlm_models_split_their_head_exactly(tmp_path):
    ids = mx.array([[1, 5, 9, 200, 3]])
    for tied in (True, False):
        path = create_mlxlm_dir(tmp_path / str(tied), {**QWEN3, "tie_word_embeddings": tied})
        model, _, _ = __import__("kdcore.models.mlxlm", fromlist=["x"]).load_kd_model(path)
        out = model(ids)
        assert not out.has_logits and out.head_weight is not None
        assert mx.array_equal(out.logits, model.lm(ids)).item()


# ---------------------------------------------------------------- the fused path is taken


def test_the_fused_path_never_makes_full_logits(corpus, teachers, monkeypatch):
    """With the fused path, neither the student's nor the teacher's [B, L, V] logits are
    ever made in a training step (their lazy ``logits`` would be called)."""
    made = []
    real_student = kdcore.ModelOutput.logits
    real_teacher = kdcore.TeacherSignal.logits

    def student_logits(self):
        made.append("student")
        return real_student.fget(self)

    def teacher_logits(self):
        if self._logits is None and self.final_hidden is not None:
            made.append("teacher")
        return real_teacher.fget(self)

    monkeypatch.setattr(kdcore.ModelOutput, "logits", property(student_logits))
    monkeypatch.setattr(kdcore.TeacherSignal, "logits", property(teacher_logits))
    losses = [loss_entry("ce"), loss_entry("hinton"), loss_entry("gjsd")]
    spec = testing.tiny_spec(corpus, losses, teachers=[{"path": str(teachers["a"])}], steps=2)
    spec["eval"] = {"batches": 1, "every": 0}
    parts = testing.build_run(spec)
    from kdcore.engine.step import gradients

    total, terms, _metrics, grads, _n = gradients(parts, 0)
    mx.eval(total, grads)
    assert made == []
    spec["train"]["fused_loss"] = False
    parts = testing.build_run(spec)
    total, *_ = gradients(parts, 0)
    assert "student" in made and "teacher" in made


def test_a_loss_without_rows_falls_back_and_still_trains(corpus, teachers, tmp_path):
    """A plugin loss that reads ``inputs.student.logits`` (no rows) beside fused ones."""

    class Plain:
        @kdcore.hookimpl
        def kd_losses(self):
            def factory(config, setup=None):
                def loss(inputs):
                    lp = kdcore.log_softmax(inputs.student.logits)
                    return kdcore.masked_mean(-lp.max(-1), inputs.batch["mask"]), {}

                return loss

            return [kdcore.Component("max_logprob", factory, app.NoConfig)]

    with testing.plugins(Plain()):
        spec = testing.tiny_spec(
            corpus,
            [{"name": "max_logprob"}, loss_entry("hinton")],
            teachers=[{"path": str(teachers["a"])}],
        )
        compare(spec)


def test_kd_validate_says_which_path_each_loss_takes(corpus, teachers, tmp_path, capsys):
    spec = testing.tiny_spec(
        corpus,
        [loss_entry("ce"), loss_entry("hinton")],
        teachers=[{"path": str(teachers["a"])}, {"path": str(teachers["b"])}],
        aggregator={"name": "weighted", "params": {"learnable": True}},
    )
    path = Path(tmp_path) / "spec.json"
    app.write_json(path, spec)
    assert testing.run_kd("validate", path) == 0
    out = capsys.readouterr().out
    assert "ce: fused" in out
    assert "hinton: full logits (a learnable aggregator" in out
    spec["train"]["fused_loss"] = False
    app.write_json(path, spec)
    assert testing.run_kd("validate", path) == 0
    assert "ce: full logits (train.fused_loss is false)" in capsys.readouterr().out


# ---------------------------------------------------------------- precision and size levers


def step_grads(spec: dict):
    parts = testing.build_run(spec)
    from kdcore.engine.step import gradients

    total, terms, _metrics, grads, _n = gradients(parts, 0)
    mx.eval(total, grads)
    return total, dict(tree_flatten(grads))


def test_checkpointed_layers_give_the_same_gradients(corpus, teachers):
    losses = [loss_entry("ce"), loss_entry("hinton")]
    spec = testing.tiny_spec(corpus, losses, teachers=[{"path": str(teachers["a"])}])
    plain_total, plain = step_grads(spec)
    spec["train"]["checkpoint_layers"] = True
    total, grads = step_grads(spec)
    close(total, plain_total, "total")
    for k in plain:
        close(grads[k], plain[k], k)


def test_checkpointed_mlxlm_layers_give_the_same_gradients(tmp_path, corpus):
    s_dir = create_mlxlm_dir(tmp_path / "student", {**QWEN3, "tie_word_embeddings": True})
    spec = testing.tiny_spec(
        corpus, student={"model": {"name": "mlx-lm", "params": {"path": str(s_dir)}}}
    )
    plain_total, plain = step_grads(spec)
    spec["train"]["checkpoint_layers"] = True
    total, grads = step_grads(spec)
    close(total, plain_total, "total")
    for k in plain:
        close(grads[k], plain[k], k)


def test_bfloat16_models_train_fused_with_float32_loss_maths(corpus, teachers, tmp_path):
    """bf16 weights and activations; the fused kernel casts each chunk to float32, so it
    agrees with the full-logit path (whose losses also upcast) to bf16 rounding of the
    gradients, and a short run's loss goes down."""
    params = {"dim": 32, "layers": 1, "heads": 2, "max_seq_len": 32, "dtype": "bfloat16"}
    spec = testing.tiny_spec(
        corpus,
        [loss_entry("ce"), loss_entry("hinton")],
        teachers=[{"path": str(teachers["a"])}],
        student={"model": {"name": "transformer", "params": params}},
    )
    fused_total, fused = step_grads(spec)
    assert fused["student.embed.weight"].dtype == mx.bfloat16
    spec["train"]["fused_loss"] = False
    plain_total, plain = step_grads(spec)
    close(fused_total, plain_total, "total", tol=1e-3)
    for k in plain:
        close(fused[k], plain[k], k, tol=2e-2)
    spec["train"].update(fused_loss=True, steps=15)
    summary = app.distill(spec, output=tmp_path / "run", progress=False)
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    assert np.isfinite(summary["eval"]["val_loss"])


def test_a_quantized_mlxlm_teacher_runs_fused(tmp_path, corpus):
    """A teacher made 4-bit by mlx-lm's own quantization (offline): its quantized head runs
    per chunk; fused equals the full-logit path."""
    from mlx_lm.convert import convert

    source = create_mlxlm_dir(tmp_path / "fp", {**QWEN3, "tie_word_embeddings": True}, seed=4)
    quantized = tmp_path / "q4"
    convert(str(source), mlx_path=str(quantized), quantize=True, q_bits=4, q_group_size=32)
    config = app.read_json(quantized / "config.json")
    assert config["quantization"]["bits"] == 4
    spec = testing.tiny_spec(
        corpus,
        [loss_entry("ce"), loss_entry("reverse_kl")],
        teachers=[{"source": "mlx-lm", "path": str(quantized)}],
    )
    compare(spec)
