"""kd design, kd temperature, kd compare and kd eval --grads / --worst on a tiny real run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import kdcore
from kdcore import app
from kdcore.analysis import pareto_front
from kdcore.cli.main import main
from kdcore.engine.rundir import load_run_spec
from kdcore.io import load_arrays, save_arrays, write_json
from kdcore.models.io import count_parameters, load_model
from kdcore.models.transformer import Transformer, TransformerConfig
from kdcore.registry.manager import reset_registry
from kdcore.tokenizers.simple import ByteTokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@attrs.define
class FklConfig:
    temperature: float = 2.0


def forward_kl(config, setup):
    """T^2 KL(p_T || q_T), summed over the vocabulary, masked mean over tokens."""

    def loss(inputs):
        T = inputs.params.temperature
        lt = kdcore.log_softmax(inputs.teacher.logits, T)
        ls = kdcore.log_softmax(inputs.student.logits, T)
        kl = (mx.exp(lt) * (lt - ls)).sum(-1)
        return kdcore.masked_mean(kl, inputs.batch["mask"]) * T * T, {}

    return loss


class KdPlugin:
    @kdcore.hookimpl
    def kd_losses(self):
        return [
            kdcore.Component(
                "test_fkl",
                forward_kl,
                FklConfig,
                requires={"teacher"},
                doc="forward KL for these tests",
            )
        ]


def _spec(corpus, **changes) -> dict:
    spec = {
        "run": {"name": "kd", "seed": 0},
        "data": {
            "name": "text",
            "params": {"path": str(corpus), "seq_len": 32, "val_fraction": 0.1},
        },
        "student": {
            "model": {
                "name": "transformer",
                "params": {"dim": 32, "layers": 2, "heads": 2, "max_seq_len": 32},
            }
        },
        "losses": [{"name": "ce"}],
        "train": {
            "steps": 6,
            "batch_size": 4,
            "log_every": 2,
            "optimizer": {"name": "adamw", "lr": 3e-3},
        },
        "eval": {"batches": 2},
    }
    spec.update(changes)
    return spec


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, teacher_dir):
    """A distilled student (ce + forward KL) and a smaller ce-only student, 6 steps each."""
    reset_registry([(KdPlugin(), "test-kd")])
    root = tmp_path_factory.mktemp("analysis")
    kd = _spec(
        corpus,
        teachers=[{"path": str(teacher_dir)}],
        losses=[
            {"name": "ce", "weight": 0.5},
            {"name": "test_fkl", "weight": 0.5, "params": {"temperature": 2.0}},
        ],
    )
    app.distill(app.load_spec(kd), output=root / "kd", progress=False)
    ce = _spec(corpus, run={"name": "ce", "seed": 0})
    ce["student"]["model"]["params"].update(dim=16, layers=1)
    app.distill(app.load_spec(ce), output=root / "ce", progress=False)
    yield {"kd": root / "kd", "ce": root / "ce", "teacher": teacher_dir.parent, "root": root}
    reset_registry()


def run_kd(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- kd design


def test_design_counts_the_instantiated_model_and_prints_a_usable_spec(
    capsys, runs, teacher_dir, corpus
):
    teacher_params = count_parameters(load_model(teacher_dir)[0])
    designs = {}
    for keep in ("depth", "width", "balanced"):
        code, out, _ = run_kd(
            capsys,
            "design",
            "--teacher",
            teacher_dir,
            "--compression",
            "2",
            "--keep",
            keep,
            "--json",
        )
        assert code == 0
        d = json.loads(out)
        designs[keep] = d
        params = d["student"]["params"]
        model = Transformer(TransformerConfig(**params))
        assert count_parameters(model) == d["student"]["parameters"]
        assert d["teacher"]["parameters"] == teacher_params
        assert params["dim"] % params["heads"] == 0 and (params["dim"] // params["heads"]) % 2 == 0
        assert abs(d["relative_error"]) <= 0.11  # within the 10% window (log terms)
        assert d["compression"] == pytest.approx(teacher_params / d["student"]["parameters"])
        # The printed snippet is a [student] table the engine accepts as it is.
        student = tomllib.loads(d["toml"])["student"]
        spec = app.load_spec(_spec(corpus, student=student))
        assert spec.student.model.config.dim == params["dim"]
    assert (
        designs["depth"]["student"]["shape"]["layers"]
        >= designs["width"]["student"]["shape"]["layers"]
    )
    assert (
        designs["width"]["student"]["shape"]["dim"] >= designs["depth"]["student"]["shape"]["dim"]
    )
    code, out, _ = run_kd(capsys, "design", "--teacher", teacher_dir, "--compression", "2")
    assert code == 0 and "[student]" in out and "compression" in out


def test_design_keeps_grouped_kv_heads(capsys, tmp_path):
    teacher = tmp_path / "gqa"
    write_json(
        teacher / "config.json",
        {
            "kd_model": "transformer",
            "vocab_size": 256,
            "dim": 128,
            "layers": 4,
            "heads": 8,
            "kv_heads": 2,
            "hidden_dim": 352,
            "max_seq_len": 64,
        },
    )
    code, out, _ = run_kd(capsys, "design", "--teacher", teacher, "--params", "150k", "--json")
    assert code == 0
    d = json.loads(out)
    p = d["student"]["params"]
    assert p["heads"] // p["kv_heads"] == 4 and p["heads"] % p["kv_heads"] == 0
    assert p["hidden_dim"] < 352 and p["hidden_dim"] % 16 == 0
    assert d["target_parameters"] == 150_000
    assert count_parameters(Transformer(TransformerConfig(**p))) == d["student"]["parameters"]
    assert abs(d["student"]["parameters"] / 150_000 - 1) < 0.11


def test_design_mlxlm_llama_and_qwen3(capsys, tmp_path, corpus):
    from kdcore.models.mlxlm import build_mlxlm

    llama = {
        "model_type": "llama",
        "hidden_size": 256,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 704,
        "vocab_size": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    }
    # qwen3 sizes heads apart from the hidden size: head_dim 64 with 8 heads and hidden 256
    qwen3 = {
        "model_type": "qwen3",
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 768,
        "vocab_size": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "head_dim": 64,
        "max_position_embeddings": 512,
        "rope_theta": 1e6,
    }
    for name, config in (("llama", llama), ("qwen3", qwen3)):
        write_json(tmp_path / name / "config.json", config)
        code, out, _ = run_kd(
            capsys, "design", "--teacher", tmp_path / name, "--compression", "3", "--json"
        )
        assert code == 0, name
        d = json.loads(out)
        assert d["teacher"]["parameters"] == count_parameters(build_mlxlm(config))
        student = tomllib.loads(d["toml"])["student"]
        assert student["model"]["name"] == "mlx-lm"
        cfg = student["model"]["params"]["config"]
        assert count_parameters(build_mlxlm(cfg)) == d["student"]["parameters"]
        group = config["num_attention_heads"] // config["num_key_value_heads"]
        assert cfg["num_attention_heads"] == group * cfg["num_key_value_heads"]
        assert cfg["model_type"] == name and cfg["rms_norm_eps"] == config["rms_norm_eps"]
        assert abs(d["relative_error"]) <= 0.11
        app.load_spec(_spec(corpus, student=student))  # the engine accepts the snippet
    assert cfg["head_dim"] == 64  # qwen3 keeps its head size
    assert cfg["hidden_size"] < 256


def test_temperature_of_an_mlxlm_folder(capsys, tmp_path, corpus):
    from kdcore.models.mlxlm import create_mlxlm_dir

    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    }
    create_mlxlm_dir(tmp_path / "lm", config)
    code, out, _ = run_kd(
        capsys,
        "temperature",
        tmp_path / "lm",
        "--data",
        corpus,
        "--batches",
        "1",
        "--temperatures",
        "1,4",
        "--png",
        tmp_path / "t.png",
        "--json",
    )
    assert code == 0
    rows = json.loads(out)["rows"]
    assert rows[0]["entropy"] < rows[1]["entropy"] <= np.log(256) + 1e-4


def test_design_rejects_bad_requests(capsys, tmp_path, teacher_dir):
    code, _, err = run_kd(capsys, "design", "--teacher", teacher_dir, "--compression", "0.5")
    assert code == 2 and "--compression must be >= 1" in err
    code, _, err = run_kd(capsys, "design", "--teacher", teacher_dir, "--params", "1e12")
    assert code == 2 and "--params must be in" in err
    code, _, err = run_kd(capsys, "design", "--teacher", teacher_dir, "--params", "lots")
    assert code == 2 and "250k" in err
    other = tmp_path / "other"
    write_json(other / "config.json", {"kd_model": "rnn"})
    code, _, err = run_kd(capsys, "design", "--teacher", other, "--compression", "2")
    assert code == 1 and "'rnn'" in err


# ---------------------------------------------------------------- kd temperature


def _numpy_shape(logits: np.ndarray, mask: np.ndarray, T: float) -> dict[str, float]:
    z = logits.astype(np.float64) / T
    z -= z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    keep = mask > 0
    p = p[keep]
    top = -np.sort(-p, axis=-1)
    return {
        "entropy": float((-(p * np.log(p)).sum(-1)).mean()),
        "support": float((p > 1 / p.shape[-1]).sum(-1).mean()),
        "top1_mass": float(top[:, 0].mean()),
        "top5_mass": float(top[:, :5].sum(-1).mean()),
        "top10_mass": float(top[:, :10].sum(-1).mean()),
    }


def test_temperature_matches_a_direct_computation(capsys, runs, teacher_dir, tmp_path):
    png = tmp_path / "t.png"
    code, out, _ = run_kd(
        capsys,
        "temperature",
        runs["kd"],
        "--temperatures",
        "1,2,4",
        "--batches",
        "2",
        "--png",
        png,
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert [r["temperature"] for r in report["rows"]] == [1.0, 2.0, 4.0]
    assert png.read_bytes()[:4] == b"\x89PNG"
    # The same numbers, computed with NumPy from the teacher's logits on the run's val split.
    spec = load_run_spec(runs["kd"])
    teacher = load_model(teacher_dir)[0]
    from kdcore.data.datasets import TextDataset

    dataset = TextDataset(
        spec.data.config, kdcore.Setup(base_dir=Path(spec.base_dir), tokenizer=ByteTokenizer())
    )
    batches = list(dataset.batches(spec.train.batch_size, "val", 2))
    logits = np.concatenate([np.array(teacher(mx.array(b["input_ids"])).logits) for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert report["tokens"] == int(mask.sum())
    for row in report["rows"]:
        expected = _numpy_shape(logits, mask, row["temperature"])
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=2e-4, abs=1e-4), (row["temperature"], key)
    entropies = [r["entropy"] for r in report["rows"]]
    assert entropies == sorted(entropies) and entropies[-1] <= report["max_entropy"]
    top1 = [r["top1_mass"] for r in report["rows"]]
    assert top1 == sorted(top1, reverse=True)
    # A model folder outside a run needs --data; inside a run it uses that run's val split.
    code, out, _ = run_kd(
        capsys,
        "temperature",
        teacher_dir,
        "--temperatures",
        "1",
        "--batches",
        "2",
        "--png",
        tmp_path / "u.png",
    )
    assert code == 0 and "T" in out and "entropy" in out
    lone = tmp_path / "lone"
    shutil.copytree(teacher_dir, lone)
    code, _, err = run_kd(capsys, "temperature", lone, "--png", tmp_path / "v.png")
    assert code == 2 and "--data" in err


# ---------------------------------------------------------------- kd compare


def test_pareto_front():
    # (loss, params): lower is better in both.
    points = [(3.0, 100), (2.5, 200), (2.6, 300), (2.5, 200), (4.0, 50)]
    assert pareto_front(points, [False, False]) == [True, True, False, True, True]
    # speed: higher is better
    assert pareto_front([(3.0, 10.0), (2.0, 5.0), (3.5, 9.0)], [False, True]) == [True, True, False]


def test_compare_marks_the_frontier(capsys, runs, tmp_path):
    png = tmp_path / "c.png"
    code, out, _ = run_kd(
        capsys, "compare", runs["kd"], runs["ce"], runs["teacher"], "--json", "--png", png
    )
    assert code == 0
    report = json.loads(out)
    rows = {r["run"]: r for r in report["rows"]}
    assert set(rows) == {"kd", "ce", "tiny"}
    for name, path in (("kd", runs["kd"]), ("ce", runs["ce"])):
        summary = json.loads((path / "summary.json").read_text())
        assert rows[name]["parameters"] == summary["student_parameters"]
        assert rows[name]["val_loss"] == summary["eval"]["val_loss"]
        assert rows[name]["tokens_per_s"] > 0
    kd = rows["kd"]
    assert kd["retention"] == pytest.approx(np.exp(kd["teacher_val_loss"] - kd["val_loss"]))
    points = [(r["val_loss"], r["parameters"]) for r in report["rows"]]
    assert [r["size_frontier"] for r in report["rows"]] == pareto_front(points, [False, False])
    # The smallest run and the best-loss run are always on the size frontier.
    assert min(report["rows"], key=lambda r: r["parameters"])["size_frontier"]
    assert min(report["rows"], key=lambda r: r["val_loss"])["size_frontier"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run_kd(
        capsys, "compare", runs["kd"], runs["ce"], "--no-speed", "--png", tmp_path / "d.png"
    )
    assert code == 0 and "pareto" in out and "kd" in out


# ---------------------------------------------------------------- kd eval --grads / --worst


def test_eval_grads_uses_the_spec_losses(capsys, runs):
    code, out, _ = run_kd(
        capsys, "eval", runs["kd"], "--batches", "1", "--grads", "--grad-batches", "2", "--json"
    )
    assert code == 0
    grads = json.loads(out)["grads"]
    assert [b["step"] for b in grads["batches"]] == [4, 5]
    student = load_model(runs["kd"] / "student")[0]
    groups = {g["group"]: g for g in grads["groups"]}
    assert sum(g["parameters"] for g in groups.values()) == count_parameters(student)
    assert "student.blocks.1.attention" in groups and "student.embed" in groups
    assert grads["nonfinite"] == 0
    for b in grads["batches"]:
        assert set(b["terms"]) == {"ce", "test_fkl"}
        assert b["grad_norm"] > 0
    # The loss of the last batch, recomputed here from the spec's definition.
    spec = load_run_spec(runs["kd"])
    from kdcore.data.datasets import TextDataset

    dataset = TextDataset(
        spec.data.config,
        kdcore.Setup(base_dir=Path(spec.base_dir), seed=0, tokenizer=ByteTokenizer()),
    )
    batch = dataset.batch(5, spec.train.batch_size)
    teacher = load_model(spec.path(spec.teachers[0].path))[0]
    ids = mx.array(batch["input_ids"])
    s, t = student(ids).logits, teacher(ids).logits
    ce = nn.losses.cross_entropy(s, mx.array(batch["labels"])).mean().item()
    lt, ls = nn.log_softmax(t / 2.0, -1), nn.log_softmax(s / 2.0, -1)
    fkl = ((mx.exp(lt) * (lt - ls)).sum(-1).mean() * 4.0).item()
    last = grads["batches"][-1]
    assert last["terms"]["ce"] == pytest.approx(ce, rel=1e-4)
    assert last["terms"]["test_fkl"] == pytest.approx(fkl, rel=1e-4)
    assert last["loss"] == pytest.approx(0.5 * ce + 0.5 * fkl, rel=1e-4)


def test_eval_grads_counts_nans(capsys, runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs["kd"], broken)
    weights = load_arrays(broken / "student" / "model.safetensors")
    w = np.array(weights["blocks.1.mlp.up_proj.weight"])
    w[0, 0] = np.nan
    weights["blocks.1.mlp.up_proj.weight"] = mx.array(w)
    save_arrays(broken / "student" / "model.safetensors", weights)
    code, out, _ = run_kd(
        capsys, "eval", broken, "--batches", "1", "--grads", "--grad-batches", "1"
    )
    assert code == 0
    assert "warning:" in out and "non-finite gradient entries" in out
    line = next(x for x in out.splitlines() if x.startswith("student.blocks.1.mlp "))
    assert int(line.split()[-2]) > 0  # the nan column


def test_eval_worst_positions(capsys, runs, tmp_path):
    out_file = tmp_path / "worst.jsonl"
    code, out, err = run_kd(
        capsys,
        "eval",
        runs["kd"],
        "--batches",
        "2",
        "--worst",
        "6",
        "--positions-out",
        out_file,
        "--context",
        "12",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    positions = report["positions"]
    assert positions["written"] == 6 and positions["file"] == str(out_file)
    # Over the same batches, the mean per-position KL is kd eval's KL(teacher||student).
    assert positions["mean"]["kl"] == pytest.approx(report["kl_teacher_student"], rel=1e-4)
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["rank"] for r in records] == list(range(1, 7))
    kls = [r["kl"] for r in records]
    assert kls == sorted(kls, reverse=True) and kls[0] >= positions["mean"]["kl"]
    # Each record is that position: recompute its KL and context from the val split.
    spec = load_run_spec(runs["kd"])
    from kdcore.data.datasets import TextDataset

    dataset = TextDataset(
        spec.data.config, kdcore.Setup(base_dir=Path(spec.base_dir), tokenizer=ByteTokenizer())
    )
    student = load_model(runs["kd"] / "student")[0]
    teacher = load_model(spec.path(spec.teachers[0].path))[0]
    val = dataset._examples["val"]
    tok = ByteTokenizer()
    for r in records[:3]:
        ids = val["input_ids"][r["example_index"]]
        c = r["position"]
        lt = nn.log_softmax(teacher(mx.array(ids[None])).logits[0, c], -1)
        ls = nn.log_softmax(student(mx.array(ids[None])).logits[0, c], -1)
        assert r["kl"] == pytest.approx((mx.exp(lt) * (lt - ls)).sum().item(), rel=1e-3)
        assert r["context"] == tok.decode(ids[max(0, c - 11) : c + 1])
        assert r["target"] == tok.decode([val["labels"][r["example_index"], c]])
        assert len(r["teacher_top"]) == 5 and 0 <= r["top10_agreement"] <= 1
        assert r["teacher_top"][0][1] == int(np.argmax(np.array(lt)))
    # by top-10 agreement: the worst are the lowest
    code, out, _ = run_kd(
        capsys,
        "eval",
        runs["kd"],
        "--batches",
        "2",
        "--worst",
        "4",
        "--worst-by",
        "top10",
        "--positions-out",
        out_file,
        "--force",  # the file the first call wrote
        "--json",
    )
    agreements = [json.loads(x)["top10_agreement"] for x in out_file.read_text().splitlines()]
    assert agreements == sorted(agreements)
    assert agreements[0] <= json.loads(out)["positions"]["mean"]["top10"]


def test_eval_positions_out_needs_worst(capsys, runs, tmp_path):
    code, _, err = run_kd(capsys, "eval", runs["ce"], "--positions-out", tmp_path / "x.jsonl")
    assert code == 2 and "--worst" in err
    code, _, err = run_kd(capsys, "eval", runs["ce"], "--worst", "3")
    assert code == 2 and "no teacher" in err
