"""Saving students that kdcore's own layout does not fit: LoRA adapters, mlx-lm folders,
quantized students (and loading those back)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from kdcore.errors import CheckpointError
from kdcore.io import load_arrays, read_json, save_arrays, write_json
from kdcore.models import quantize
from kdcore.models.mlxlm import MlxLmModel, save_mlxlm_student

QUANTIZED_WEIGHTS = "quantized.safetensors"  # beside a built-in student's dequantized model
QUANTIZATION_JSON = "quantization.json"


def save_student(
    student: nn.Module, directory: Path, arch: str, config: Any, tokenizer: Any
) -> bool:
    """The engine's hook for students kdcore's own format does not fit; True if it saved.

    - a LoRA student: ``adapters.safetensors`` + ``adapter_config.json``, and with
      ``fuse`` the fused model beside them (an mlx-lm directory for an mlx-lm student,
      kdcore's layout otherwise) so that the directory loads as a whole model too;
    - a quantized student (the ``quantize`` initializer, or a quantized folder loaded): an
      mlx-lm quantized directory for an mlx-lm student (:func:`mlx_lm_config`), else
      kdcore's layout dequantized with the packed tensors beside it (:func:`save_builtin`);
    - a full mlx-lm student: an mlx-lm directory (:func:`save_mlxlm_student`).
    """
    from kdcore.models import lora

    directory = Path(directory)
    if lora.has_lora(student):
        lora.save_adapters(student, directory)
        if not student.kd_lora.fuse:
            return True
        fused = lora.fused_weights(student)
        if isinstance(student, MlxLmModel):
            save_mlxlm_student(student, directory, run_tok=tokenizer, weights=fused)
        else:
            from kdcore.spec.convert import converter
            from kdcore.tokenizers.simple import save_tokenizer

            save_arrays(directory / "model.safetensors", fused, metadata={"format": "mlx"})
            write_json(
                directory / "config.json", {"kd_model": arch, **converter.unstructure(config)}
            )
            save_tokenizer(tokenizer, directory)
        return True
    if quantize.has_quantized(student):
        if isinstance(student, MlxLmModel):
            quantized = mlx_lm_config(student)
            save_mlxlm_student(student, directory, run_tok=tokenizer, config=quantized)
        else:
            save_builtin(student, directory, arch, config, tokenizer)
        return True
    if isinstance(student, MlxLmModel):
        save_mlxlm_student(student, directory, run_tok=tokenizer)
        return True
    return False


# ---------------------------------------------------------------- quantized students


def mlx_lm_quantization(student: nn.Module) -> dict[str, Any]:
    """The ``"quantization"`` entry of an mlx-lm config.json for ``student``: the common
    ``group_size``/``bits``/``mode``, and a per-layer entry (as mlx-lm's ``quantize_model``
    writes one, and its loader's ``class_predicate`` reads first) for each quantized layer
    that differs from them: ``{"group_size": 64, "bits": 4, "mode": "affine",
    "model.embed_tokens": {"group_size": 64, "bits": 8, "mode": "affine"}}``."""
    top = quantize.top_params(student)
    names = {path for path, _ in quantize.quantized_modules(student)}
    old = getattr(student, "mlx_config", {}).get("quantization") or {}
    entry = dict(top)
    for key, value in old.items():  # a source folder's per-layer entries for other layers
        if key not in top and key not in names:
            entry[key] = value
    entry.update(quantize.own_params(student, top))
    return entry


def mlx_lm_config(student: nn.Module) -> dict[str, Any]:
    """The student's mlx-lm config with its quantization entries (``quantization`` and the
    Hugging Face ``quantization_config`` copy mlx-lm writes beside it)."""
    entry = mlx_lm_quantization(student)
    return {**student.mlx_config, "quantization": entry, "quantization_config": dict(entry)}


def save_builtin(
    student: nn.Module, directory: Path, arch: str, config: Any, tokenizer: Any
) -> None:
    """A quantized built-in student: kdcore's layout with the dequantized weights (every
    kdcore loader opens it), plus the packed tensors (``quantized.safetensors``) and each
    quantized layer's parameters (``quantization.json``) for :func:`load_quantized_model`."""
    from kdcore.spec.convert import converter
    from kdcore.tokenizers.simple import save_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dense = quantize.dequantized_weights(student)
    save_arrays(directory / "model.safetensors", dense, metadata={"format": "mlx"})
    write_json(directory / "config.json", {"kd_model": arch, **converter.unstructure(config)})
    save_tokenizer(tokenizer, directory)
    save_arrays(
        directory / QUANTIZED_WEIGHTS,
        dict(tree_flatten(student.parameters())),
        metadata={"format": "mlx"},
    )
    layers = {path: quantize.layer_params(m) for path, m in quantize.quantized_modules(student)}
    write_json(directory / QUANTIZATION_JSON, {**quantize.top_params(student), "layers": layers})


def load_quantized_model(directory: str | Path) -> nn.Module:
    """The quantized student a run saved, its layers quantized as saved: an mlx-lm folder
    through mlx-lm's loader (its per-layer entries), a built-in one from its packed tensors
    and ``quantization.json``."""
    from kdcore.models.dtype import stored_dtypes
    from kdcore.models.io import load_model

    directory = Path(directory)
    info_path = directory / QUANTIZATION_JSON
    if not info_path.exists():
        # a dtype named keeps the layers quantized (the CPU policy would dequantize them)
        stored = sorted(stored_dtypes(directory)[0])
        model = load_model(directory, stored[0] if len(stored) == 1 else "float32")[0]
        if not quantize.has_quantized(model):
            raise CheckpointError(f"{directory} holds no quantized model")
        return model
    model = load_model(directory)[0]
    info = read_json(info_path, "quantization settings")
    layers = info.get("layers") if isinstance(info, dict) else None
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise CheckpointError(f"{info_path}: no table of layers (path -> parameters)")
    try:
        quantize.swap_layers(model, layers)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{info_path}: layers it cannot quantize as given: {exc}") from None
    weights = load_arrays(directory / QUANTIZED_WEIGHTS, "quantized weights")
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise CheckpointError(
            f"{directory}/{QUANTIZED_WEIGHTS} does not match {QUANTIZATION_JSON}: {exc}"
        ) from exc
    mx.eval(model.parameters())
    return model
