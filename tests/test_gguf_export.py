"""``kd export --gguf``: a student folder to a GGUF file, checked with an independent reader
(transformers' GGUF loader, torch, test-only) and by ``kd import`` of the file it wrote.

The student is the imported SmolLM2-135M-Instruct cut to its first 4 layers (the suite stays
fast; the embedding, 28M of the 42M weights left, is whole), still MLX-quantized (4-bit
layers, 8-bit embedding) as ``kd import`` left it, so the export has to dequantize."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from kdcore.cli.main import main as kd
from kdcore.errors import CheckpointError
from kdcore.gguf import convert, export
from kdcore.models.mlxlm import load_mlxlm

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "examples" / "shakespeare" / "data" / "tinyshakespeare.txt"
CHAT = [
    {"role": "user", "content": "Natalia sold clips to 48 of her friends. How many in all?"},
    {"role": "assistant", "content": "She sold 48 + 24 = 72 clips.\n#### 72"},
]
LAYERS = 4


def token_nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """Per-token next-token loss (nats) of ``logits`` [T, V] for ``ids`` [T + 1]."""
    logits = logits[:-1].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return logz - logits[np.arange(len(ids) - 1), ids[1:]]


def kdcore_logits(folder: Path, ids: list[int]) -> np.ndarray:
    lm, _ = load_mlxlm(folder)
    return np.array(lm(mx.array([ids])).astype(mx.float32)[0])


@pytest.fixture(scope="module")
def student(smollm2_dir, tmp_path_factory) -> Path:
    """The imported SmolLM2 with only its first LAYERS layers, quantization kept."""
    out = tmp_path_factory.mktemp("export") / "student"
    shutil.copytree(smollm2_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["num_hidden_layers"] = LAYERS
    (out / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(smollm2_dir / "model.safetensors"))
    kept = {
        k: v
        for k, v in weights.items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < LAYERS
    }
    mx.save_safetensors(str(out / "model.safetensors"), kept, {"format": "mlx"})
    return out


@pytest.fixture(scope="module")
def files(student) -> dict[str, Path]:
    """The student exported by the CLI as float16 and as Q8_0."""
    out = {kind: student.parent / f"student-{kind}.gguf" for kind in ("f16", "q8_0")}
    for kind, path in out.items():
        assert kd(["export", str(student), "--gguf", str(path), "--type", kind]) == 0
    return out


@pytest.fixture(scope="module")
def reference(files):
    """transformers' tokenizer (read from the exported F16 file) and a function giving
    transformers' float32 logits of an exported file."""
    torch = pytest.importorskip("torch", reason="torch==2.13.0 is in kdcore[test]")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = files["f16"]
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # read from the F16 file once (each parse of the 49k-token header takes seconds); the
    # Q8_0 file's header differs only in general.file_type
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)

    def logits(path: Path, ids: list[int]) -> np.ndarray:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=torch.float32
        )
        with torch.no_grad():
            return model.eval()(torch.tensor([ids])).logits[0].float().numpy()

    return tok, logits


@pytest.fixture(scope="module")
def text_ids(reference) -> list[int]:
    tok, _ = reference
    return tok(SHAKESPEARE.read_text(encoding="utf-8")[:4000])["input_ids"][:320]


@pytest.fixture(scope="module")
def f16_logits(files, reference, text_ids) -> np.ndarray:
    """transformers' logits of the exported F16 file."""
    return reference[1](files["f16"], text_ids)


@pytest.fixture(scope="module")
def source_logits(student, text_ids) -> np.ndarray:
    """kdcore's own forward of the student folder, its quantized weights taken exactly.
    dtype float32 keeps the layers quantized with float32 scales; they are then dequantized
    (mlx-lm's own function) for a fast dense forward. The CPU default policy dequantizes
    with the stored float16 scales, whose float16 arithmetic rounds each weight again."""
    from mlx_lm.utils import dequantize_model

    lm, _ = load_mlxlm(student, "float32")
    dequantize_model(lm)
    return np.array(lm(mx.array([text_ids])).astype(mx.float32)[0])


def test_header_is_what_llama_cpp_writes(files):
    reader = export.require_gguf().GGUFReader(str(files["f16"]))
    meta = {key: field.contents() for key, field in reader.fields.items()}
    # the values llama.cpp's converter wrote into the SmolLM2 GGUF this student came from
    want = {
        "general.architecture": "llama",
        "general.license": "apache-2.0",
        "general.file_type": 1,  # MOSTLY_F16
        "llama.block_count": LAYERS,
        "llama.context_length": 8192,
        "llama.embedding_length": 576,
        "llama.feed_forward_length": 1536,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
        "llama.rope.dimension_count": 64,
        "llama.rope.freq_base": 100000.0,
        "llama.vocab_size": 49152,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {key: meta.get(key) for key in want} == want
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["general.name"].startswith("Smollm2 135M")
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert meta["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # control
    assert meta["tokenizer.ggml.merges"][:2] == ["Ġ t", "Ġ a"]
    assert len(meta["tokenizer.ggml.merges"]) == 48900
    assert "<|im_start|>assistant" in meta["tokenizer.chat_template"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len(types) == 2 + 9 * LAYERS and "output.weight" not in types  # tied: no output
    assert {t for n, t in types.items() if n.endswith("norm.weight")} == {"F32"}
    assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {"F16"}
    assert list(types)[0] == "token_embd.weight" and list(types)[-1] == "output_norm.weight"
    # Q8_0: 34 bytes per 32 values against float16's 64 (the norms stay float32)
    ratio = files["q8_0"].stat().st_size / files["f16"].stat().st_size
    assert 0.52 < ratio < 0.56, ratio


def test_f16_file_gives_kdcore_losses_in_transformers(f16_logits, text_ids, source_logits):
    got = token_nll(f16_logits, text_ids)
    want = token_nll(source_logits, text_ids)
    diff = np.abs(got - want)
    # The only change is each weight rounded to float16 (relative 2^-11 at most). A 4-layer
    # cut of a 30-layer model is far from calibrated (mean loss ~16.8 nats, logits up to
    # ~75), which magnifies it: measured max 0.012, mean 0.003 nats (max 0.008 for all 30
    # layers). Rows left unpermuted cost nats, not hundredths.
    assert diff.max() < 3e-2 and diff.mean() < 6e-3, (diff.max(), diff.mean())


def test_q8_0_file_gives_kdcore_losses_in_transformers(files, reference, text_ids, source_logits):
    _, logits = reference
    got = token_nll(logits(files["q8_0"], text_ids), text_ids)
    want = token_nll(source_logits, text_ids)
    diff = np.abs(got - want)
    # Q8_0 stores a block of 32 weights as int8 steps of max|w|/127, an error ~10-20x
    # float16's, and it requantizes weights that were 4-bit (their levels are not on Q8_0's
    # grid). Measured: max 0.15, mean 0.033 nats (12x float16's), mean loss shifted 0.007.
    # The file itself reads back exactly: kd import of it matches transformers within 4e-5.
    assert diff.max() < 0.4 and diff.mean() < 0.06, (diff.max(), diff.mean())
    assert abs(got.mean() - want.mean()) < 0.05


def test_kd_import_of_the_f16_file_round_trips(
    student, files, reference, text_ids, f16_logits, source_logits, tmp_path
):
    from transformers import AutoTokenizer

    back = convert.import_gguf(files["f16"], tmp_path / "back")
    # every weight comes back exactly as the student's, dequantized and rounded to float16:
    # names mapped back, q/k rows un-permuted by kd import's own inverse
    config = json.loads((student / "config.json").read_text())
    want = dict(export.float_weights(student, config))
    got = mx.load(str(back / "model.safetensors"))
    assert set(got) == set(want)
    for name, value in want.items():
        assert mx.array_equal(got[name], value.astype(mx.float16)).item(), name
    # kdcore's forward of it: what transformers computes from the same file (two
    # implementations, one set of weights: measured 4e-5 nats), and within the float16
    # rounding of the source (as in the test above)
    back_nll = token_nll(kdcore_logits(back, text_ids), text_ids)
    assert np.abs(back_nll - token_nll(f16_logits, text_ids)).max() < 1e-3
    assert np.abs(back_nll - token_nll(source_logits, text_ids)).max() < 3e-2
    # the tokenizer rebuilt from the exported header: the same chat text and ids as the
    # student's own tokenizer.json, and as transformers' reading of the file
    ours = AutoTokenizer.from_pretrained(student)
    theirs = AutoTokenizer.from_pretrained(back)
    text = ours.apply_chat_template(CHAT, tokenize=False)
    assert theirs.apply_chat_template(CHAT, tokenize=False) == text
    assert reference[0].apply_chat_template(CHAT, tokenize=False) == text
    ids = ours(text, add_special_tokens=False)["input_ids"]
    assert theirs(text, add_special_tokens=False)["input_ids"] == ids
    assert reference[0](text, add_special_tokens=False)["input_ids"] == ids
    assert ids.count(2) == 3  # three turns, each ending in <|im_end|> as one token


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_students_match_transformers(model_type, tmp_path):
    """The families llama.cpp does not permute: q/k/v biases (qwen2), q/k norms (qwen3), an
    untied head (qwen2), on small random models with a small byte-level BPE."""
    torch = pytest.importorskip("torch", reason="torch==2.13.0 is in kdcore[test]")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM

    from kdcore.models.mlxlm import create_mlxlm_dir

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    tok.train_from_iterator([SHAKESPEARE.read_text(encoding="utf-8")[:20_000]], trainer)
    config = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 128,  # transformers reads no head_dim from a qwen3 GGUF: its default
        "rms_norm_eps": 1e-6,
        "vocab_size": tok.get_vocab_size(),
        "rope_theta": 1e6,
        "max_position_embeddings": 512,
        "tie_word_embeddings": model_type == "qwen3",
    }
    folder = create_mlxlm_dir(tmp_path / "m", config, json.loads(tok.to_str()), 0, "<|endoftext|>")
    # random init gives near-zero logits; scaled-up weights make a wrong mapping show
    weights = {
        k: v * 4 if v.ndim == 2 else v
        for k, v in mx.load(str(folder / "model.safetensors")).items()
    }
    mx.save_safetensors(str(folder / "model.safetensors"), weights, {"format": "mlx"})
    out = export.export_gguf(folder, tmp_path / "m.gguf", "f32", tokenizer_pre="qwen2")
    ids = list(range(1, config["vocab_size"], 5))
    lm, _ = load_mlxlm(folder)
    ours = np.array(lm(mx.array([ids])).astype(mx.float32)[0])
    model = AutoModelForCausalLM.from_pretrained(
        out.parent, gguf_file=out.name, dtype=torch.float32
    )
    with torch.no_grad():
        theirs = model.eval()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours).max() > 1.0  # logits that a swapped tensor would change
    assert np.abs(ours - theirs).max() < 1e-3, np.abs(ours - theirs).max()


def test_q_k_rows_permuted_as_llama_cpp_does():
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, written out here
    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2)

    w = np.arange(3 * 8 * 5).reshape(3 * 8, 5)
    stored = export.permute_rows(w, 3)
    np.testing.assert_array_equal(stored, permute(w, 3).reshape(w.shape))
    assert not np.array_equal(stored, w)
    np.testing.assert_array_equal(convert.unpermute_rows(stored, 3), w)


def test_tokenizer_pre_from_the_record_the_tokenizer_or_the_flag(student, tmp_path):
    config = json.loads((student / "config.json").read_text())
    folder = tmp_path / "student"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(student / name, folder / name)
    # no import record (a distilled student has none): the regexes kd import wrote say it
    assert export.tokenizer_header(folder, config, None)["tokenizer.ggml.pre"] == "smollm"
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="--tokenizer-pre") as caught:
        export.tokenizer_header(folder, config, None)
    assert str(folder) in str(caught.value)
    assert export.tokenizer_header(folder, config, "gpt-2")["tokenizer.ggml.pre"] == "gpt-2"


def test_unsupported_model_type_is_refused(tmp_path, capsys):
    folder = tmp_path / "run" / "student"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    out = tmp_path / "model.gguf"
    with pytest.raises(CheckpointError, match="model_type 'gemma3_text' is not exported") as e:
        export.export_gguf(folder, out)
    assert str(folder) in str(e.value)
    # a run folder names its student/
    assert kd(["export", str(tmp_path / "run"), "--gguf", str(out)]) == 1
    assert "gemma3_text" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]


def test_existing_file_refused_unless_forced(student, files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"keep me")
    assert kd(["export", str(student), "--gguf", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert out.read_bytes() == b"keep me"
    # a write that fails half-way leaves the old file and no temporary one
    gguf = export.require_gguf()

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
        with pytest.raises(OSError, match="disk full"):
            export.export_gguf(student, out, "f32", force=True)
    assert out.read_bytes() == b"keep me" and list(tmp_path.iterdir()) == [out]
    assert kd(["export", str(student), "--gguf", str(out), "--type", "f32", "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and list(tmp_path.iterdir()) == [out]
    # float32 matrices: about twice the float16 file
    ratio = out.stat().st_size / files["f16"].stat().st_size
    assert 1.9 < ratio < 2.0, ratio
