"""The training engine: outputs, resume, atomic checkpoints, NaN guard, groups, stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import kdcore
from kdcore import app
from kdcore.engine import loop
from kdcore.engine.build import build_parts
from kdcore.engine.checkpoint import latest_checkpoint, load_checkpoint
from kdcore.engine.distill import train_parts
from kdcore.models.io import load_model

ROOT = Path(__file__).resolve().parents[1]


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def _distill_spec(make_spec, teacher_dir, steps=8, **train):
    return make_spec(
        teachers=[{"path": str(teacher_dir)}],
        losses=[{"name": "ce", "weight": {"schedule": "linear", "start": 1.0, "end": 0.5}}],
        train={
            "steps": steps,
            "batch_size": 4,
            "log_every": 1,
            "checkpoint_every": 4,
            "optimizer": {"name": "adamw", "lr": 3e-3},
            **train,
        },
    )


def test_outputs_of_a_run(tmp_path, make_spec, teacher_dir):
    summary = app.distill(
        app.load_spec(_distill_spec(make_spec, teacher_dir)),
        output=tmp_path / "run",
        progress=False,
    )
    run = tmp_path / "run"
    for name in (
        "student/config.json",
        "student/model.safetensors",
        "student/tokenizer.json",
        "metrics.jsonl",
        "summary.json",
        "spec.toml",
    ):
        assert (run / name).exists(), name
    assert summary["steps"] == 8
    assert summary["teacher_parameters"][0] > summary["student_parameters"]
    assert {"val_loss", "teacher_val_loss", "top1_agreement"} <= set(summary["eval"])
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert len(logged) == 8
    assert {"loss/ce", "lr", "tokens_per_s", "weight/ce"} <= set(logged[0])
    assert logged[0]["weight/ce"] == pytest.approx(1.0)
    model, arch, _ = load_model(run / "student")
    assert arch == "transformer"
    # the saved student is the trained one: its val loss matches the summary
    again = app.load_spec(run / "spec.toml")
    assert again.train.steps == 8


KILLER = textwrap.dedent("""
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
    spec = app.load_spec(sys.argv[1])
    app.distill(spec, output=sys.argv[2], resume=sys.argv[3] == "1", progress=False)
""")


def _spec_file(tmp_path, data) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    return path


def test_resume_after_kill_gives_the_same_losses(tmp_path, make_spec, teacher_dir):
    data = _distill_spec(make_spec, teacher_dir)
    data["callbacks"] = [{"name": "killer"}]
    spec = _spec_file(tmp_path, data)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = dict(os.environ, KILL_AT="999")
    full = subprocess.run(
        [sys.executable, str(script), str(spec), str(tmp_path / "full"), "0"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert full.returncode == 0, full.stderr
    env["KILL_AT"] = "6"
    killed = subprocess.run(
        [sys.executable, str(script), str(spec), str(tmp_path / "cut"), "0"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == 9
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-0000004"
    env["KILL_AT"] = "999"
    resumed = subprocess.run(
        [sys.executable, str(script), str(spec), str(tmp_path / "cut"), "1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    wa, _, _ = load_model(tmp_path / "full" / "student")
    wb, _, _ = load_model(tmp_path / "cut" / "student")
    for (ka, va), (kb, vb) in zip(tree_flatten(wa.parameters()), tree_flatten(wb.parameters())):
        assert ka == kb
        np.testing.assert_allclose(np.array(va), np.array(vb), rtol=1e-4, atol=1e-6)


WRITE_KILLER = textwrap.dedent("""
    import os, sys
    import kdcore
    from kdcore import app
    import kdcore.engine.checkpoint as ckpt

    real = ckpt.save_arrays
    calls = {"n": 0}

    def dying_save(path, arrays, metadata=None):
        calls["n"] += 1
        if calls["n"] == 4:  # the first file of the second checkpoint
            with open(path, "wb") as f:
                f.write(b"half a tensor")
            os._exit(9)
        real(path, arrays, metadata)

    ckpt.save_arrays = dying_save
    spec = app.load_spec(sys.argv[1])
    app.distill(spec, output=sys.argv[2], progress=False)
""")


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path, make_spec, teacher_dir):
    # killed while writing the step-8 checkpoint: the final one, kept only when asked
    spec = _spec_file(tmp_path, _distill_spec(make_spec, teacher_dir, final_checkpoint=True))
    script = tmp_path / "write_killer.py"
    script.write_text(WRITE_KILLER)
    proc = subprocess.run(
        [sys.executable, str(script), str(spec), str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 9, proc.stderr
    root = tmp_path / "run" / "checkpoints"
    latest = latest_checkpoint(root)
    assert latest.name == "step-0000004"
    state, weights, _, _ = load_checkpoint(latest)  # checksums verified
    assert state["step"] == 4 and weights
    assert not (root / "step-0000008").exists()
    summary = app.distill(app.load_spec(spec), output=tmp_path / "run", resume=True, progress=False)
    assert summary["steps"] == 8


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, make_spec, teacher_dir):
    spec = app.load_spec(_distill_spec(make_spec, teacher_dir))
    app.distill(spec, output=tmp_path / "run", progress=False)
    latest = latest_checkpoint(tmp_path / "run" / "checkpoints")
    target = latest / "trainable.safetensors"
    blob = bytearray(target.read_bytes())
    blob[-10] ^= 0xFF
    target.write_bytes(bytes(blob))
    with pytest.raises(app.CheckpointError, match="trainable.safetensors"):
        app.distill(spec, output=tmp_path / "run", resume=True, progress=False)


def test_resume_with_another_spec_is_refused(tmp_path, make_spec, teacher_dir):
    spec = app.load_spec(_distill_spec(make_spec, teacher_dir))
    app.distill(spec, output=tmp_path / "run", progress=False)
    other = _distill_spec(make_spec, teacher_dir)
    other["train"]["optimizer"]["lr"] = 1e-2
    with pytest.raises(app.CheckpointError, match="different spec"):
        app.distill(app.load_spec(other), output=tmp_path / "run", resume=True, progress=False)


def test_existing_run_is_not_overwritten(tmp_path, make_spec):
    spec = app.load_spec(make_spec())
    app.distill(spec, output=tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(app.CheckpointError, match="--resume"):
        app.distill(spec, output=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


class _NanAt:
    """A plugin whose loss turns NaN at a given step."""

    def __init__(self, step):
        self.step = step

    @kdcore.hookimpl
    def kd_losses(self):
        at = self.step

        def factory(config, setup):
            def loss(inputs):
                base = kdcore.masked_mean(inputs.student.logits.mean(-1) ** 2, inputs.batch["mask"])
                return (base * float("nan") if inputs.step == at else base), {}

            return loss

        return [kdcore.Component("nan-at", factory, doc="NaN at one step")]


def test_nan_loss_stops_with_step_and_term_after_saving(tmp_path, make_spec):
    from kdcore.registry.manager import reset_registry

    reset_registry([(_NanAt(3), "test-nan")])
    try:
        spec = app.load_spec(make_spec(losses=[{"name": "ce"}, {"name": "nan-at"}]))
        with pytest.raises(app.NonFiniteLossError) as err:
            app.distill(spec, output=tmp_path / "run", progress=False)
    finally:
        reset_registry()
    assert err.value.step == 4  # steps count from 1 in logs; inputs.step 3 is the 4th
    assert err.value.term == "nan-at"
    latest = latest_checkpoint(tmp_path / "run" / "checkpoints")
    state, _, _, _ = load_checkpoint(latest)
    assert state["step"] == 3 and state["reason"] == "non-finite loss"
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3]


def test_zero_lr_group_freezes_and_others_train(tmp_path, make_spec):
    spec = app.load_spec(
        make_spec(
            train={
                "steps": 3,
                "batch_size": 4,
                "log_every": 1,
                "param_groups": [{"pattern": r"student\.embed", "lr_mult": 0.0}],
            }
        )
    )
    run = build_parts(spec)
    before = {k: np.array(v) for k, v in tree_flatten(run.student.parameters())}
    train_parts(run, tmp_path / "run", progress=False)
    after = {k: np.array(v) for k, v in tree_flatten(run.student.parameters())}
    assert np.array_equal(before["embed.weight"], after["embed.weight"])
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert "blocks.0.attention.q_proj.weight" in changed


def test_stages_rebuild_the_optimizer_with_their_groups(tmp_path, make_spec, monkeypatch):
    spec = app.load_spec(
        make_spec(
            train={
                "batch_size": 4,
                "log_every": 1,
                "stages": [
                    {
                        "name": "heads",
                        "steps": 2,
                        "param_groups": [{"pattern": r"blocks", "lr_mult": 0}],
                    },
                    {"name": "all", "steps": 2},
                ],
            }
        )
    )
    run = build_parts(spec)
    start = {k: np.array(v) for k, v in tree_flatten(run.student.parameters())}
    seen = {}
    original = loop.stage_optimizer

    def spy(parts, stage):
        result = original(parts, stage)
        seen[stage.name] = {k: np.array(v) for k, v in tree_flatten(run.student.parameters())}
        return result

    monkeypatch.setattr(loop, "stage_optimizer", spy)
    summary = train_parts(run, tmp_path / "run", progress=False)
    assert summary["steps"] == 4
    # after stage 1, blocks are untouched; embeddings moved
    assert np.array_equal(
        start["blocks.0.mlp.up_proj.weight"], seen["all"]["blocks.0.mlp.up_proj.weight"]
    )
    assert not np.array_equal(start["embed.weight"], seen["all"]["embed.weight"])
    final = {k: np.array(v) for k, v in tree_flatten(run.student.parameters())}
    assert not np.array_equal(
        start["blocks.0.mlp.up_proj.weight"], final["blocks.0.mlp.up_proj.weight"]
    )
    stages = {
        json.loads(x).get("stage")
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    }
    assert {"heads", "all"} <= stages


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, make_spec):
    def params_after(batch, accum, name):
        spec = app.load_spec(
            make_spec(
                train={
                    "steps": 1,
                    "batch_size": batch,
                    "grad_accum": accum,
                    "grad_clip": None,
                    "optimizer": {"name": "sgd", "lr": 0.5},
                }
            )
        )
        run = build_parts(spec)
        train_parts(run, tmp_path / name, progress=False)
        return {k: np.array(v) for k, v in tree_flatten(run.student.parameters())}

    big = params_after(4, 1, "big")
    acc = params_after(2, 2, "acc")
    for key in big:
        np.testing.assert_allclose(acc[key], big[key], rtol=1e-4, atol=1e-5)


def test_from_teacher_initializer_copies_through_a_layer_map(tmp_path, make_spec, teacher_dir):
    spec = app.load_spec(
        make_spec(
            teachers=[{"path": str(teacher_dir)}],
            student={
                "model": {
                    "name": "transformer",
                    "params": {"dim": 48, "layers": 1, "heads": 4, "max_seq_len": 32},
                },
                "init": {"name": "from-teacher", "params": {"layer_map": [1]}},
            },
        )
    )
    run = build_parts(spec)
    teacher, _, _ = load_model(teacher_dir)
    t = dict(tree_flatten(teacher.parameters()))
    s = dict(tree_flatten(run.student.parameters()))
    assert np.array_equal(
        np.array(s["blocks.0.mlp.up_proj.weight"]), np.array(t["blocks.1.mlp.up_proj.weight"])
    )
    assert np.array_equal(np.array(s["embed.weight"]), np.array(t["embed.weight"]))
    assert run.init_report["initialised_tensors"] == len(s)


def test_ends_layer_map_keeps_the_first_and_last_layers():
    from kdcore.models.init import ends_layer_map, uniform_layer_map

    assert ends_layer_map(15, 30) == [*range(8), *range(23, 30)]
    assert ends_layer_map(4, 30) == [0, 1, 28, 29]
    assert ends_layer_map(1, 30) == [0]
    assert uniform_layer_map(4, 30) == [0, 10, 19, 29]


def test_from_teacher_truncates_and_interpolates_other_widths(tmp_path, make_spec, teacher_dir):
    for mode in ("truncate", "interpolate"):
        spec = app.load_spec(
            make_spec(
                teachers=[{"path": str(teacher_dir)}],
                student={
                    "model": {
                        "name": "transformer",
                        "params": {"dim": 32, "layers": 2, "heads": 2, "max_seq_len": 32},
                    },
                    "init": {"name": "from-teacher", "params": {"mismatch": mode}},
                },
            )
        )
        run = build_parts(spec)
        teacher, _, _ = load_model(teacher_dir)
        t = np.array(dict(tree_flatten(teacher.parameters()))["embed.weight"])
        s = np.array(dict(tree_flatten(run.student.parameters()))["embed.weight"])
        if mode == "truncate":
            assert np.array_equal(s, t[:, :32])
        else:
            assert s[:, 0].tolist() == pytest.approx(t[:, 0].tolist())
            assert s[:, -1].tolist() == pytest.approx(t[:, -1].tolist())
        assert run.init_report["initialised_tensors"] > 0


def test_identity_aligner_checks_token_strings_not_sizes(tmp_path, make_spec, teacher_dir):
    (tmp_path / "chars.txt").write_text("".join(chr(0x4E00 + i) for i in range(255)) + "a" * 2000)
    spec = app.load_spec(
        make_spec(
            teachers=[{"path": str(teacher_dir)}],
            data={
                "name": "text",
                "params": {"path": str(tmp_path / "chars.txt"), "tokenizer": "char", "seq_len": 16},
            },
        )
    )
    with pytest.raises(kdcore.SpecError, match="vocabularies differ"):
        build_parts(spec)


def test_a_loss_that_needs_a_teacher_without_one_is_rejected(make_spec):
    class NeedsTeacher:
        @kdcore.hookimpl
        def kd_losses(self):
            return [kdcore.Component("needy", lambda c, s: None, requires={"teacher"})]

    from kdcore.registry.manager import reset_registry
    from kdcore.spec.compose import check_composition

    reset_registry([(NeedsTeacher(), "test-needy")])
    try:
        spec = app.load_spec(make_spec(losses=[{"name": "needy"}]))
        problems = check_composition(spec)
    finally:
        reset_registry()
    assert problems and "$.teachers" in problems[0]


def test_same_seed_same_run(tmp_path, make_spec):
    spec = app.load_spec(make_spec())
    app.distill(spec, output=tmp_path / "a", progress=False)
    app.distill(spec, output=tmp_path / "b", progress=False)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_mx_array_scheduled_params_reach_the_loss(tmp_path, make_spec):
    spec = app.load_spec(
        make_spec(
            losses=[
                {
                    "name": "ce",
                    "params": {"label_smoothing": {"schedule": "linear", "start": 0.0, "end": 0.2}},
                },
            ]
        )
    )
    app.distill(spec, output=tmp_path / "run", progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    values = [r["ce/label_smoothing"] for r in records if "ce/label_smoothing" in r]
    assert values[0] == pytest.approx(0.0) and values[-1] > values[0]
    assert isinstance(mx.array(1.0), mx.array)


def test_a_cache_teacher_cannot_feed_losses_that_need_features(make_spec, tmp_path):
    class WantsFeatures:
        @kdcore.hookimpl
        def kd_losses(self):
            return [
                kdcore.Component(
                    "wants-features",
                    lambda c, s: None,
                    requires={"teacher", "hidden_states"},
                    properties={"sparse_ok"},
                )
            ]

    from kdcore.registry.manager import reset_registry
    from kdcore.spec.compose import check_composition

    reset_registry([(WantsFeatures(), "test-features")])
    try:
        spec = app.load_spec(
            make_spec(teachers=[{"cache": str(tmp_path)}], losses=[{"name": "wants-features"}])
        )
        problems = check_composition(spec)
    finally:
        reset_registry()
    assert len(problems) == 1
    assert "hidden_states" in problems[0] and "$.losses[0].name" in problems[0]


class _Learnable:
    """A plugin loss with a learnable parameter (like a hint projection)."""

    @kdcore.hookimpl
    def kd_losses(self):
        import mlx.nn as nn

        class Scaled(nn.Module):
            def __init__(self, config, setup):
                super().__init__()
                self.scale = mx.array([0.5])

            def __call__(self, inputs):
                logits = inputs.student.logits.mean(-1)
                return kdcore.masked_mean((logits * self.scale[0]) ** 2, inputs.batch["mask"]), {}

        return [kdcore.Component("learnable", Scaled, doc="learnable scale")]


def test_learnable_loss_trains_resumes_and_stays_out_of_the_student(tmp_path, make_spec):
    from kdcore.registry.manager import reset_registry

    reset_registry([(_Learnable(), "test-learnable")])
    try:
        data = make_spec(
            losses=[{"name": "ce"}, {"name": "learnable", "weight": 0.1}],
            train={
                "steps": 4,
                "batch_size": 4,
                "checkpoint_every": 2,
                "optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1},
            },
        )
        app.distill(app.load_spec(data), output=tmp_path / "run", progress=False)
        _, weights, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
        assert "losses.loss1.scale" in weights
        assert weights["losses.loss1.scale"].item() != 0.5
        model, _, _ = load_model(tmp_path / "run" / "student")
        assert not any("scale" in k for k, _ in tree_flatten(model.parameters()))
        # resuming from the step-2 checkpoint reloads the loss's parameter too
        (tmp_path / "run" / "checkpoints" / "latest").write_text("step-0000002\n")
        summary = app.distill(
            app.load_spec(data), output=tmp_path / "run", resume=True, progress=False
        )
        assert summary["steps"] == 4
    finally:
        reset_registry()


# ---------------------------------------------------------------- the native Adam step


def _adam_step(g, p, m, v, k, bias_correction):
    """The "adam" kernel's contract (kdcore.engine.optim) in MLX ops, for the wiring tests."""
    m2 = k[1] * m + k[2] * g
    v2 = k[3] * v + k[4] * mx.square(g)
    root = mx.sqrt(v2)
    denominator = root * k[7] + k[5] if bias_correction else root + k[5]
    return p * k[0] - (k[6] * m2) / denominator, m2, v2


class _AdamKernel:
    def __init__(self):
        self.calls = 0

    @kdcore.hookimpl
    def kd_row_kernels(self):
        def adam():
            def step(*args):
                self.calls += 1
                return _adam_step(*args)

            return step

        return {"adam": adam}


def _updated(optimizer, dtype=mx.float32, steps=3):
    """Parameters and optimizer state after ``steps`` updates with fixed gradients."""
    import mlx.nn as nn
    from mlx.utils import tree_map

    mx.random.seed(3)
    model = nn.Sequential(nn.Linear(37, 13), nn.LayerNorm(13), nn.Linear(13, 1001))
    model.set_dtype(dtype)
    rng = np.random.default_rng(4)
    for _ in range(steps):
        grads = tree_map(
            lambda p: mx.array(rng.normal(0, 1e-2, p.shape).astype(np.float32)).astype(p.dtype),
            model.trainable_parameters(),
        )
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    flat = {**dict(tree_flatten(model.parameters())), **dict(tree_flatten(optimizer.state))}
    return {k: np.array(v.astype(mx.float32)) for k, v in flat.items()}


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_adam_hands_its_update_to_a_registered_kernel_with_mlxs_roundings(
    monkeypatch, name, bias_correction
):
    """kdcore's adam / adamw give the "adam" kernel scalars rounded as mlx.optimizers does
    (a learning-rate schedule: a scalar on the device): bit for bit mlx's update."""
    import mlx.optimizers as optim

    from kdcore.engine.optim import OPTIMIZERS
    from kdcore.kernels.native import native_kernel

    monkeypatch.setenv("KD_DISABLE_PLUGINS", "kd-kernels")  # its "adam" would clash
    monkeypatch.setenv("KD_KERNELS", "native")
    options = {"bias_correction": bias_correction, "betas": [0.8, 0.95], "eps": 1e-6}
    if name == "adamw":
        options["weight_decay"] = 0.1
    schedule = optim.cosine_decay(3e-2, 10)
    mlx_class = {"adam": optim.Adam, "adamw": optim.AdamW}[name]
    want = _updated(mlx_class(learning_rate=schedule, **options))
    kernel = _AdamKernel()

    def ours():
        # built as the engine builds it: with the installed "adam" kernel (None when pure)
        return OPTIMIZERS[name](learning_rate=schedule, kernel=native_kernel("adam"), **options)

    with kdcore.testing.plugins(kernel):
        got = _updated(ours())
        assert kernel.calls == 3 * 6  # six float32 parameters, three steps
        bf16 = _updated(ours(), mx.bfloat16)
        assert kernel.calls == 3 * 6  # other dtypes: mlx's update
        monkeypatch.setenv("KD_KERNELS", "pure")
        pure = _updated(ours())
        assert kernel.calls == 3 * 6
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        np.testing.assert_array_equal(pure[key], want[key], err_msg=key)
    want_bf16 = _updated(mlx_class(learning_rate=schedule, **options), mx.bfloat16)
    for key in want_bf16:
        np.testing.assert_array_equal(bf16[key], want_bf16[key], err_msg=key)
    assert not np.array_equal(
        got["layers.2.weight"], _updated(mlx_class(0.0), steps=0)["layers.2.weight"]
    )


def test_adamw_on_real_gradients_equals_mlxs_update():
    """kdcore's AdamW with the native step against mlx.optimizers.AdamW, three steps of
    value_and_grad's own gradients (transposed views for the Linear weights)."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    from kdcore.engine.optim import AdamW

    kd_kernels = pytest.importorskip("kd_kernels")  # built by ./scripts/setup.sh

    def run(kernel):
        mx.random.seed(3)
        model = nn.Sequential(nn.Linear(37, 130), nn.LayerNorm(130), nn.Linear(130, 1001))
        x = mx.random.normal((8, 37))
        y = mx.random.randint(0, 1001, (8,))
        schedule = optim.cosine_decay(3e-2, 10)
        if kernel is None:
            opt = optim.AdamW(learning_rate=schedule, weight_decay=0.1, bias_correction=True)
        else:
            opt = AdamW(
                learning_rate=schedule, weight_decay=0.1, bias_correction=True, kernel=kernel
            )
        grad = nn.value_and_grad(model, lambda mod: nn.losses.cross_entropy(mod(x), y).mean())
        for _ in range(3):
            _, grads = grad(model)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
        flat = {**dict(tree_flatten(model.parameters())), **dict(tree_flatten(opt.state))}
        return {key: np.array(value) for key, value in flat.items()}

    want, got = run(None), run(kd_kernels.adam_factory())
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
