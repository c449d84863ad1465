"""An mlx-lm student folder to one GGUF file (``kd export --gguf``) that llama.cpp, Ollama
and LM Studio load: ``convert.py`` run backwards, written as llama.cpp's own
``convert_hf_to_gguf.py`` writes a llama-family model, with its ``GGUFWriter``.

- header: the ``{arch}.*`` hyper-parameters, name, licence, file type; the tokenizer as
  ``tokenizer.ggml.*`` from tokenizer.json (byte-level BPE, llama.cpp's "gpt2"), its special
  ids, add_bos flag and chat template. The header is built (and checked) before any weight.
- weights: MLX-quantized ones dequantized; names back to llama.cpp's; llama's q/k rows
  permuted per head for its interleaved RoPE; 1-D tensors float32, matrices float16, Q8_0
  (``gguf.quants.quantize``, llama.cpp's own code) or float32."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kdcore.errors import CheckpointError
from kdcore.gguf.convert import IMPORT_RECORD, LAYER_NAMES, TOP_NAMES
from kdcore.gguf.read import require_gguf

# mlx-lm model_type -> (GGUF architecture, q/k rows permuted as llama.cpp's LlamaModel does).
# Mistral is a llama to llama.cpp; it runs Qwen2/3 with NEOX RoPE: their rows stay as they are.
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}  # gguf.LlamaFileType
GGUF_NAMES = {mlx: gguf for gguf, mlx in LAYER_NAMES.items()}
GGUF_TOP = {mlx: gguf for gguf, mlx in TOP_NAMES.items()}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType
# header value types as GGUFWriter's typed adders store them (ids, counts: uint32)
VALUE_TYPES = {bool: "BOOL", int: "UINT32", float: "FLOAT32", str: "STRING"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def student_folder(path: str | os.PathLike) -> Path:
    """The mlx-lm folder ``path`` names: a model folder, or a run folder's ``student/``."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "student" / "config.json").exists():
        return path / "student"
    if not (path / "config.json").exists():
        raise CheckpointError(f"not an mlx-lm model folder (no config.json): {path}")
    return path


def model_header(config: dict, arch: str, where: str) -> dict[str, Any]:
    """The ``{arch}.*`` keys llama.cpp's ``TextModel`` and ``LlamaModel`` write."""
    need = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
    for key in (*need, "vocab_size"):
        if not isinstance(config.get(key), int):
            raise CheckpointError(f"{where}: config.json has no {key}")
    heads = config["num_attention_heads"]
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    out = {
        "context_length": int(config.get("max_position_embeddings") or 4096),
        "embedding_length": config["hidden_size"],
        "block_count": config["num_hidden_layers"],
        "feed_forward_length": config["intermediate_size"],
        "rope.dimension_count": head_dim,
        "attention.head_count": heads,
        "attention.head_count_kv": int(config.get("num_key_value_heads") or heads),
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        "rope.freq_base": float(config.get("rope_theta", 10_000.0)),
        "vocab_size": config["vocab_size"],
    }
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        out.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(scaling["factor"])})
    elif kind not in (None, "default"):
        raise CheckpointError(f"{where}: rope_scaling type {kind!r} is not exported to GGUF")
    return {f"{arch}.{key}": value for key, value in out.items()}


def _token_id(value: Any, ids: dict[str, int]) -> int | None:
    """The id of a tokenizer_config.json special token (a string, or an AddedToken dict)."""
    text = value.get("content") if isinstance(value, dict) else value
    return ids.get(text) if isinstance(text, str) else None


def _adds_first(post: dict | None) -> bool:
    """Whether a tokenizer.json post-processor puts a special token before the text (how a
    Llama 3 tokenizer says it adds BOS; llama.cpp's SpecialVocab reads it the same way)."""
    if not post:
        return False
    if post.get("type") == "Sequence":
        return any(_adds_first(p) for p in post.get("processors", []))
    single = post.get("single") or [{}]
    return post.get("type") == "TemplateProcessing" and "SpecialToken" in single[0]


def _recognised_pre(tok: dict) -> str | None:
    """The ``tokenizer.ggml.pre`` whose split regexes a tokenizer.json from ``kd import``
    holds (``tokenizer.py``'s table read backwards): a student distilled from an imported
    teacher carries that tokenizer.json but not the import record."""
    from kdcore.gguf.tokenizer import PRE_TYPES

    steps = (tok.get("pre_tokenizer") or {}).get("pretokenizers") or []
    splits = tuple(s["pattern"].get("Regex") for s in steps if s.get("type") == "Split")
    ignore = bool(tok["model"].get("ignore_merges", False))
    return next((n for n, (r, i) in PRE_TYPES.items() if (r, i) == (splits, ignore)), None)


def tokenizer_header(folder: Path, config: dict, pre: str | None) -> dict[str, Any]:
    """``tokenizer.*`` keys as llama.cpp's ``get_vocab_base`` and ``SpecialVocab`` write
    them for a byte-level BPE vocabulary; ``pre`` None: recognised or refused."""
    where = str(folder)
    tok = _read_json(folder / "tokenizer.json")
    tok_config = _read_json(folder / "tokenizer_config.json")
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):  # byte fallback: SentencePiece
        kind = "SentencePiece" if model.get("byte_fallback") else model.get("type") or "missing"
        raise CheckpointError(f"{where}: tokenizer.json is {kind}; only byte-level BPE is exported")
    if not model.get("merges"):  # llama.cpp refuses a BPE vocabulary without them
        raise CheckpointError(f"{where}: tokenizer.json has no BPE merges")
    pre = pre or _recognised_pre(tok)
    if pre is None:
        raise CheckpointError(
            f"{where}: the llama.cpp pre-tokenizer of this tokenizer.json is not known: name "
            "it with --tokenizer-pre (e.g. llama-bpe, qwen2, smollm)"
        )
    ids = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    ids.update({text: t["id"] for text, t in added.items()})
    rows = config["vocab_size"]  # llama.cpp pads the list to the embedding's rows
    tokens, types = [f"[PAD{i}]" for i in range(rows)], [UNUSED] * rows
    for text, index in ids.items():
        if index >= rows:
            raise CheckpointError(f"{where}: token {text!r} has id {index}, past {rows} rows")
        tokens[index] = text
        special = added[text]["special"] if text in added else None
        types[index] = NORMAL if special is None else CONTROL if special else USER_DEFINED
    out: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        # tokenizers writes a merge as a pair since 0.20, as one "a b" string before
        "tokenizer.ggml.merges": [
            m if isinstance(m, str) else " ".join(m) for m in model["merges"]
        ],
    }
    # the tokenizer's own names first, config.json's ids where it names none (SpecialVocab)
    eos = config.get("eos_token_id")
    fallback = {"bos": config.get("bos_token_id"), "eos": eos[0] if isinstance(eos, list) else eos}
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        index = _token_id(tok_config.get(f"{kind}_token"), ids)
        index = fallback.get(kind) if index is None else index
        if index is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = int(index)
    add_bos = tok_config.get("add_bos_token", _adds_first(tok.get("post_processor")))
    out["tokenizer.ggml.add_bos_token"] = bool(add_bos)
    out["tokenizer.ggml.add_eos_token"] = bool(tok_config.get("add_eos_token", False))
    template = tok_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        out["tokenizer.chat_template"] = template
    elif template:  # named templates, as transformers lists them; "default" is the main one
        for entry in template:
            suffix = "" if entry["name"] == "default" else f".{entry['name']}"
            out[f"tokenizer.chat_template{suffix}"] = entry["template"]
    return out


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of a q or k projection (rows are axis 0): each
    head's rotary halves interleaved, the layout its RoPE (GGML_ROPE_TYPE_NORM) expects."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_name(name: str, where: str) -> str:
    """llama.cpp's name of mlx-lm parameter ``name`` (``convert.py``'s tables, reversed)."""
    stem, _, leaf = name.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, index, module = stem.split(".", 3)
        if module in GGUF_NAMES:
            return f"blk.{int(index)}.{GGUF_NAMES[module]}.{leaf}"
    elif stem in GGUF_TOP:
        return f"{GGUF_TOP[stem]}.{leaf}"
    raise CheckpointError(f"{where}: no GGUF name for weight {name!r}")


def float_weights(folder: Path, config: dict) -> Iterator[tuple[str, mx.array]]:
    """(name, float weight) of every parameter, MLX-quantized modules dequantized with the
    config's ``quantization`` group size and bits (per-module entries included)."""
    raw: dict[str, mx.array] = {}
    for file in sorted(folder.glob("*.safetensors")):
        raw.update(mx.load(str(file)))  # lazy: each array is read when it is used
    if not raw:
        raise CheckpointError(f"{folder}: no *.safetensors weights")
    quant = config.get("quantization")
    for name, value in raw.items():
        stem, _, leaf = name.rpartition(".")
        if f"{stem}.scales" not in raw:
            yield name, value
            continue
        if leaf != "weight":
            continue  # scales and biases go with their weight
        if not isinstance(quant, dict):
            raise CheckpointError(f"{folder}: {stem} is quantized, config.json says not how")
        q = quant[stem] if isinstance(quant.get(stem), dict) else quant
        scales, biases = raw[f"{stem}.scales"], raw.get(f"{stem}.biases")
        if (mode := q.get("mode", "affine")) == "affine":
            # in float32: float16 arithmetic would round every value a second time
            scales = scales.astype(mx.float32)
            biases = None if biases is None else biases.astype(mx.float32)
        yield name, mx.dequantize(value, scales, biases, q["group_size"], q["bits"], mode=mode)


def encode(values: np.ndarray, out_type: str) -> tuple[np.ndarray, Any]:
    """(data, GGML type to declare or None) as llama.cpp's converter stores a tensor: 1-D
    (norms, biases) float32; matrices at the chosen type, Q8_0 falling back to float16 for
    rows that are not whole 32-value blocks (llama.cpp does the same)."""
    gguf = require_gguf()
    if values.ndim <= 1 or out_type == "f32":
        return values.astype(np.float32), None
    if out_type == "q8_0":
        try:
            q8 = gguf.GGMLQuantizationType.Q8_0
            return gguf.quants.quantize(values, q8), q8
        except gguf.QuantError:
            pass
    return values.astype(np.float16), None


def export_gguf(
    student: str | os.PathLike,
    output: str | os.PathLike,
    out_type: str = "f16",
    *,
    force: bool = False,
    tokenizer_pre: str | None = None,
    license: str | None = None,
    name: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write mlx-lm folder ``student`` (or a run folder's ``student/``) as GGUF file
    ``output``, matrices at ``out_type`` (f16, q8_0 or f32). The file is written beside
    its destination under a temporary name and renamed at the end: ``output`` is the whole
    file or untouched; an existing one is refused unless ``force``. ``tokenizer_pre``,
    ``license`` and ``name`` override what the folder's import record says."""
    gguf = require_gguf()
    folder, output = student_folder(student), Path(output)
    where = str(folder)
    if out_type not in FILE_TYPES:
        raise CheckpointError(f"--type must be one of {', '.join(FILE_TYPES)}, not {out_type!r}")
    if output.is_dir():
        raise CheckpointError(f"{output} is a folder: name the .gguf file to write")
    if output.exists() and not force:
        raise CheckpointError(f"{output} exists: pass --force to replace it")
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not exported to GGUF "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    arch, permuted = ARCHITECTURES[model_type]
    if config.get("rope_traditional"):
        if not permuted:  # llama.cpp has no "traditional" RoPE for Qwen
            raise CheckpointError(f"{where}: a rope_traditional {model_type} is not exported")
        permuted = False  # already the interleaved layout llama.cpp's RoPE reads

    record = _read_json(folder / IMPORT_RECORD)
    licence = license or record.get("license")
    header: dict[str, Any] = {
        "general.name": name or record.get("name") or folder.name,
        # an import record says "unknown (...)" when the source named none: write nothing
        **({"general.license": licence} if licence and not licence.startswith("unknown") else {}),
        "general.file_type": int(gguf.LlamaFileType[FILE_TYPES[out_type]]),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        **model_header(config, arch, where),
        **tokenizer_header(folder, config, tokenizer_pre or record.get("tokenizer_pre")),
    }

    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    tensors = []
    for key, value in float_weights(folder, config):
        target = gguf_name(key, where)
        values = np.array(value.astype(mx.float32))
        kind = target.split(".")[-2]
        if kind == "token_embd" and values.shape[0] != config["vocab_size"]:
            raise CheckpointError(f"{where}: embedding rows != vocab_size {config['vocab_size']}")
        if permuted and kind in ("attn_q", "attn_k"):
            values = permute_rows(values, heads if kind == "attn_q" else kv_heads)
        tensors.append((target, *encode(values, out_type)))
    # llama.cpp's order: token_embd, the blocks by index, output_norm, output
    rank = {"token_embd": (0, 0), "output_norm": (2, 0), "output": (2, 1)}
    tensors.sort(key=lambda t: (rank.get(t[0].split(".")[0]) or (1, int(t[0].split(".")[1])), t))

    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(temp, arch)
        for key, value in header.items():
            kind = VALUE_TYPES.get(type(value), "ARRAY")
            writer.add_key_value(key, value, gguf.GGUFValueType[kind])
        for target, data, raw_dtype in tensors:
            writer.add_tensor(target, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(temp, 0o644)  # mkstemp makes it private; a model file is for sharing
        os.replace(temp, output)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    if log is not None:
        log(f"exported {folder} ({arch}, {len(tensors)} tensors, {out_type}) -> {output}")
    return output
