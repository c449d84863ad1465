"""The real-model tier: SmolLM2-135M-Instruct from its GGUF as the teacher of a short run
on GSM8K chat records, and the students that come out of it, opened by mlx-lm itself."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from kdcore.cli.main import main as kd
from kdcore.engine.distill import distill
from kdcore.models.mlxlm import load_mlxlm

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "examples" / "smollm2" / "data" / "gsm8k_chat.jsonl"


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    """40 GSM8K problems as chat records (the example's file, or made the same way)."""
    path = tmp_path_factory.mktemp("gsm8k") / "chat.jsonl"
    lines = GSM8K.read_text(encoding="utf-8").splitlines()[:40]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def spec(chat_data: Path, teacher: Path, tokenizer: Path, student: dict, **train) -> dict:
    return {
        "run": {"name": "smollm2-tier", "seed": 0},
        "data": {
            "name": "chat",
            "params": {"path": str(chat_data), "tokenizer": str(tokenizer), "seq_len": 128},
        },
        "teachers": [{"source": "mlx-lm", "path": str(teacher)}],
        "student": student,
        "losses": [{"name": "ce", "weight": 0.5}, {"name": "hinton", "weight": 0.5}],
        "train": {
            "steps": 2,
            "batch_size": 2,
            "optimizer": {"name": "adamw", "lr": 1e-5},
            "log_every": 1,
            **train,
        },
        "eval": {"batches": 1},
    }


def test_half_depth_student_from_the_gguf_teacher(
    chat_data, smollm2_gguf, smollm2_dir, tmp_path, monkeypatch
):
    """The teacher named by its .gguf file (imported into KD_CACHE on first use); a
    student of a few of its layers built from its config and initialised from it."""
    from mlx_lm import load

    monkeypatch.setenv("KD_CACHE", str(tmp_path / "cache"))
    student = {
        "model": {
            "name": "mlx-lm",
            "params": {"base": str(smollm2_gguf), "config": {"num_hidden_layers": 4}},
        },
        "init": {"name": "from-teacher"},
    }
    out = tmp_path / "run"
    summary = distill(spec(chat_data, smollm2_gguf, smollm2_dir, student), output=out)
    assert summary["steps"] == 2
    assert (tmp_path / "cache" / "gguf").is_dir()  # imported once, keyed by the file's hash
    # copied from the teacher's (dequantized) layers by the uniform map, then two tiny steps
    init = summary["init"]
    assert init["from"] == "teacher" and init["layer_map"] == [0, 10, 19, 29]
    teacher, _ = load_mlxlm(smollm2_dir)  # the CPU policy dequantizes it
    trained = mx.load(str(out / "student" / "model.safetensors"))
    for i, t in enumerate(init["layer_map"]):
        want = np.array(teacher.model.layers[t].mlp.down_proj.weight)
        got = np.array(trained[f"model.layers.{i}.mlp.down_proj.weight"])
        assert np.abs(got - want).max() < 1e-3  # lr 1e-5: two steps move a weight ~2e-5
    folder = out / "student"
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and "quantization" not in config
    assert config["eos_token_id"] == 2
    model, tokenizer = load(str(folder))
    assert tokenizer.eos_token_ids == {2}
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )


def test_distilled_student_generates_and_stops_at_end_of_turn(chat_data, smollm2_dir, tmp_path):
    """A full-depth copy trained two small steps: mlx-lm's generate applies the shipped
    chat template and stops at <|im_end|> well before the token limit."""
    from mlx_lm import load, stream_generate

    student = {"model": {"name": "mlx-lm", "params": {"path": str(smollm2_dir)}}}
    out = tmp_path / "run"
    distill(spec(chat_data, smollm2_dir, smollm2_dir, student, batch_size=1), output=out)
    model, tokenizer = load(str(out / "student"))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )
    pieces = list(stream_generate(model, tokenizer, prompt, max_tokens=80))
    text = "".join(p.text for p in pieces)
    assert pieces[-1].finish_reason == "stop", text
    assert len(pieces) < 80 and "Paris" in text


def test_validate_names_the_dtype_of_each_model(
    chat_data, smollm2_gguf, smollm2_dir, tmp_path, capsys
):
    student = {
        "model": {
            "name": "mlx-lm",
            "params": {"base": str(smollm2_dir), "config": {"num_hidden_layers": 2}},
        }
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec(chat_data, smollm2_gguf, smollm2_dir, student)))
    assert kd(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "teachers[0]: float32, quantized layers dequantized (stored: float16, float32; "
        "CPU device: float16/quantized matmuls run" in out
    )
    assert "student: as stored (stored: float32; already float32)" in out
    with_dtype = spec(chat_data, smollm2_gguf, smollm2_dir, student)
    with_dtype["teachers"][0]["params"] = {"dtype": "float16"}
    path.write_text(json.dumps(with_dtype))
    assert kd(["validate", str(path)]) == 0
    assert "teachers[0]: float16 (stored: float16, float32; set by teachers[0].params.dtype)" in (
        capsys.readouterr().out
    )
