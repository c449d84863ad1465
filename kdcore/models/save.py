"""Saving students that kdcore's own layout does not fit: LoRA adapters, mlx-lm folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.nn as nn

from kdcore.io import save_arrays, write_json
from kdcore.models.mlxlm import MlxLmModel, save_mlxlm_student


def save_student(
    student: nn.Module, directory: Path, arch: str, config: Any, tokenizer: Any
) -> bool:
    """The engine's hook for students kdcore's own format does not fit; True if it saved.

    - a LoRA student: ``adapters.safetensors`` + ``adapter_config.json``, and with
      ``fuse`` the fused model beside them (an mlx-lm directory for an mlx-lm student,
      kdcore's layout otherwise) so that the directory loads as a whole model too;
    - a quantized student (the ``quantize`` initializer, or a quantized folder loaded): an
      mlx-lm quantized directory for an mlx-lm student, else kdcore's layout dequantized
      with the packed tensors beside it (:func:`kdcore.models.quantize.save_builtin`);
    - a full mlx-lm student: an mlx-lm directory (:func:`save_mlxlm_student`).
    """
    from kdcore.models import lora, quantize

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
            quantized = quantize.mlx_lm_config(student)
            save_mlxlm_student(student, directory, run_tok=tokenizer, config=quantized)
        else:
            quantize.save_builtin(student, directory, arch, config, tokenizer)
        return True
    if isinstance(student, MlxLmModel):
        save_mlxlm_student(student, directory, run_tok=tokenizer)
        return True
    return False
