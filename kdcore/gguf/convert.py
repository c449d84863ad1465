"""A GGUF file to an mlx-lm folder (``kd import``): config.json from the header, weights
renamed to mlx-lm's names with llama.cpp's per-architecture fix-ups undone, tokenizer
files rebuilt from ``tokenizer.ggml.*``, generation config, and the licence named.

Weights in a format MLX reads natively (Q4_0, Q4_1, Q8_0: affine, group size 32) stay
quantized, scales in their stored dtype (the dtype policy casts them at load); every other
type (k-quants, IQ types) is dequantized with the ``gguf`` package, llama.cpp's own code.
``dtype`` dequantizes everything and writes that float type instead."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kdcore.errors import CheckpointError
from kdcore.gguf.read import BULKY, open_gguf, read_metadata, require_gguf
from kdcore.io import kd_cache_root, save_arrays, sha256_file, write_json

# GGML types mx.load returns as MLX affine triples (weight, scales, biases).
MLX_NATIVE = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
MLX_READS = set(MLX_NATIVE) | {"F32", "F16", "BF16"}  # every type mx.load takes
GGUF_GROUP_SIZE = 32
FLOAT_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# The marker an imported folder carries: provenance, licence, what was done to the weights.
IMPORT_RECORD = "kdcore_import.json"

# GGUF tensor suffix within a block -> mlx-lm module path within a decoder layer.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 has four norms per layer; llama.cpp names them after where they sit.
GEMMA3_LAYER_NAMES = {
    **LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# general.architecture -> (mlx-lm model_type, layer names, q/k rows permuted by llama.cpp,
# norm weights stored as 1 + w)
ARCHITECTURES = {
    "llama": ("llama", LAYER_NAMES, True, False),
    "mistral": ("llama", LAYER_NAMES, True, False),
    "qwen2": ("qwen2", LAYER_NAMES, False, False),
    "qwen3": ("qwen3", LAYER_NAMES, False, False),
    "gemma3": ("gemma3_text", GEMMA3_LAYER_NAMES, False, True),
}


def architecture_of(meta: dict, where: str) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: GGUF architecture {arch!r} is not supported by kd import "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return arch


def config_from_metadata(meta: dict, where: str = "GGUF") -> dict[str, Any]:
    """The mlx-lm ``config.json`` a GGUF header describes (no weights read)."""
    arch = architecture_of(meta, where)
    model_type = ARCHITECTURES[arch][0]

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise CheckpointError(f"{where}: the GGUF header has no {arch}.{key}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise CheckpointError(f"{where}: the GGUF header gives no vocabulary size")
    config: dict[str, Any] = {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(get("context_length", 4096)),
    }
    rope_base = get("rope.freq_base", None, required=False)
    if rope_base is not None:
        config["rope_theta"] = float(rope_base)
    scaling = get("rope.scaling.type", None, required=False)
    if scaling not in (None, "none"):
        factor = get("rope.scaling.factor", None, required=False)
        config["rope_scaling"] = {"type": scaling, "rope_type": scaling, "factor": factor}
    if arch == "gemma3":
        window = get("attention.sliding_window", None, required=False)
        if window is not None:
            config["sliding_window"] = int(window)
        # llama.cpp keeps these fixed for Gemma 3 rather than in the header
        config["query_pre_attn_scalar"] = config["head_dim"]
        config["rope_local_base_freq"] = 10_000.0
        config["sliding_window_pattern"] = 6
    if arch == "qwen2":
        config["tie_word_embeddings"] = False  # set from the tensors in convert_gguf
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "pad")):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[key] = int(value)
    return config


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of a q or k projection (it interleaves each head's
    rotary halves for its RoPE); rows are axis 0, so a quantized triple is undone alike."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def mlx_name(gguf_name: str, layer_names: dict, where: str) -> str:
    stem, _, leaf = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, index, kind = stem.split(".", 2)
        if kind not in layer_names:
            raise CheckpointError(f"{where}: unknown GGUF tensor {gguf_name!r}")
        return f"model.layers.{int(index)}.{layer_names[kind]}.{leaf}"
    if stem not in TOP_NAMES:
        raise CheckpointError(f"{where}: unknown GGUF tensor {gguf_name!r}")
    return f"{TOP_NAMES[stem]}.{leaf}"


def _dequantized(reader, where: str, every: bool) -> dict[str, np.ndarray]:
    """Tensors as float32 through ``gguf``: those MLX cannot read as they are, or
    ``every`` one (MLX's GGUF reader refuses a whole file over one type it lacks)."""
    gguf = require_gguf()
    out = {}
    for tensor in reader.tensors:
        if not every and tensor.tensor_type.name in MLX_READS:
            continue
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise CheckpointError(
                f"{where}: tensor {tensor.name} has GGML type {tensor.tensor_type.name}, which "
                f"the gguf package cannot dequantize ({exc})"
            ) from exc
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest first
        out[tensor.name] = values.reshape(shape).astype(np.float32)
    return out


def _load_tensors(path: Path, reader, where: str) -> tuple[dict[str, mx.array], dict[str, int]]:
    """``{gguf name: array}`` (quantized triples as ``NAME.weight/.scales/.biases``) and
    ``{gguf tensor stem: bits}`` of the tensors kept quantized."""
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    loaded: dict[str, mx.array] = {}
    if set(types.values()) <= MLX_READS:
        try:
            loaded = mx.load(str(path))
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{where}: MLX could not read the GGUF ({exc})") from exc
    # with k-quants in the file every tensor comes through gguf (then nothing stays quantized)
    dense = _dequantized(reader, where, every=not loaded)
    # a dequantized matrix is stored as float16 unless a dtype is asked for: half the size
    # of float32, and the originals these files were made from are 16-bit
    tensors = {
        name: mx.array(values.astype(np.float16) if values.ndim > 1 else values)
        for name, values in dense.items()
    }
    bits = {}
    for name, kind in types.items():
        if name in dense:
            continue
        stem = name.rsplit(".", 1)[0]
        if kind in MLX_NATIVE:
            for leaf in ("weight", "scales", "biases"):
                if f"{stem}.{leaf}" not in loaded:
                    raise CheckpointError(f"{where}: MLX returned no {stem}.{leaf} for {kind}")
                tensors[f"{stem}.{leaf}"] = loaded[f"{stem}.{leaf}"]
            bits[stem] = MLX_NATIVE[kind]
        elif name in loaded:
            tensors[name] = loaded[name]
        else:
            raise CheckpointError(f"{where}: MLX returned no tensor {name} ({kind})")
    return tensors, bits


def convert_weights(
    path: Path, config: dict, arch: str, dtype: str | None, where: str, reader=None
) -> tuple[dict[str, mx.array], dict[str, Any] | None]:
    """(mlx-lm weights, the config's ``quantization`` entry or None)."""
    _, layer_names, permuted, norm_plus_one = ARCHITECTURES[arch]
    raw, bits = _load_tensors(path, reader or open_gguf(path), where)
    weights: dict[str, mx.array] = {}
    quantized: dict[str, int] = {}
    for stem in sorted({name.rsplit(".", 1)[0] for name in raw}):
        target = mlx_name(f"{stem}.weight", layer_names, where).rsplit(".", 1)[0]
        leaves = {
            leaf: raw[f"{stem}.{leaf}"]
            for leaf in ("weight", "scales", "biases", "bias")
            if f"{stem}.{leaf}" in raw
        }
        if stem in bits and dtype is not None:
            w = leaves.pop("weight")
            leaves["weight"] = mx.dequantize(
                w, leaves.pop("scales"), leaves.pop("biases"), GGUF_GROUP_SIZE, bits[stem]
            )
        elif stem in bits:
            quantized[target] = bits[stem]
        kind = stem.split(".")[-1]
        if permuted and kind in ("attn_q", "attn_k"):
            heads = config["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"]
            leaves = {
                leaf: mx.array(unpermute_rows(np.array(value), heads))
                for leaf, value in leaves.items()
            }
        if norm_plus_one and kind.endswith("norm"):
            # llama.cpp stores Gemma's RMSNorm scale as 1 + w; mlx-lm adds the 1 itself
            leaves["weight"] = leaves["weight"].astype(mx.float32) - 1.0
        for leaf, value in leaves.items():
            if dtype is not None and leaf in ("weight", "bias"):
                value = value.astype(FLOAT_DTYPES[dtype])
            weights[f"{target}.{leaf}"] = value
    if "lm_head.weight" not in weights:
        config["tie_word_embeddings"] = True
    else:
        config["tie_word_embeddings"] = False
    if not quantized:
        return weights, None
    common = max(set(quantized.values()), key=list(quantized.values()).count)
    entry: dict[str, Any] = {"group_size": GGUF_GROUP_SIZE, "bits": common}
    for module, b in quantized.items():
        if b != common:
            entry[module] = {"group_size": GGUF_GROUP_SIZE, "bits": b}
    return weights, entry


def generation_config(meta: dict) -> dict[str, Any]:
    """``generation_config.json``: bos, pad, and every id that ends a turn as eos (mlx-lm's
    generate stops at any of them)."""
    ends = []
    for name in ("eos", "eot", "eom"):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None and int(value) not in ends:
            ends.append(int(value))
    out: dict[str, Any] = {}
    if meta.get("tokenizer.ggml.bos_token_id") is not None:
        out["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    if ends:
        out["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        out["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    return out


def licence_of(meta: dict) -> str:
    for key in ("general.license", "general.license.name"):
        if meta.get(key):
            return str(meta[key])
    return "unknown (the GGUF names none: check the model's own terms before use)"


def import_gguf(
    source: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write the mlx-lm folder of GGUF file ``source`` to ``output`` (created whole or not
    at all: the files go to a temporary folder beside it, renamed at the end).
    ``mlx_lm.load(output)`` opens it. See the module docstring for ``dtype``."""
    from kdcore.gguf.tokenizer import tokenizer_files

    source, output = Path(source), Path(output)
    where = str(source)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, not {dtype!r}")
    if output.exists() and any(output.iterdir()):
        raise CheckpointError(f"{output} exists and is not empty: choose a new folder")
    reader = open_gguf(source)
    meta = read_metadata(source, reader=reader)
    arch = architecture_of(meta, where)
    config = config_from_metadata(meta, where)
    weights, quantization = convert_weights(source, config, arch, dtype, where, reader)
    if quantization is not None:
        config["quantization"] = quantization
    files = tokenizer_files(meta)
    record = {
        "source": str(source.resolve()),
        "sha256": sha256_file(source),
        "architecture": arch,
        "name": meta.get("general.name"),
        "license": licence_of(meta),
        "tensor_types": _type_counts(reader),
        "dtype": dtype or "as stored (MLX-native quantized kept, others float16)",
        "tokenizer_pre": meta.get("tokenizer.ggml.pre"),
        "tokenizer_model": meta.get("tokenizer.ggml.model"),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a model folder is for sharing
    try:
        save_arrays(staging / "model.safetensors", weights, {"format": "mlx"})
        write_json(staging / "config.json", config)
        for name, content in files.items():
            write_json(staging / name, content)
        write_json(staging / "generation_config.json", generation_config(meta))
        write_json(staging / IMPORT_RECORD, record)
        if output.exists():
            output.rmdir()
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    if log is not None:
        log(f"imported {meta.get('general.name') or source.name} ({arch}) -> {output}")
        log(f"licence: {record['license']}")
    return output


def _type_counts(reader) -> dict[str, int]:
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def imported_folder(source: str | os.PathLike, dtype: str | None = None) -> Path:
    """The mlx-lm folder of GGUF ``source``, imported on first use into the cache, keyed by
    the file's SHA-256 (a changed file is imported anew, the same file once)."""
    source = Path(source)
    if not source.is_file():
        raise CheckpointError(f"GGUF file not found: {source}")
    key = f"{sha256_file(source)[:20]}-{dtype or 'stored'}"
    folder = kd_cache_root() / "gguf" / key
    if (folder / IMPORT_RECORD).exists():
        return folder
    if folder.exists():  # a folder without the record is a broken earlier try
        shutil.rmtree(folder)
    return import_gguf(source, folder, dtype)


def header_config(source: str | os.PathLike) -> dict[str, Any]:
    """config.json of GGUF ``source`` from its header alone (for ``kd validate``)."""
    reader = open_gguf(source)
    skip = tuple(k for k in BULKY if k != "tokenizer.ggml.tokens")  # tokens: the vocab size
    config = config_from_metadata(read_metadata(source, skip, reader), str(source))
    config["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
    return config
