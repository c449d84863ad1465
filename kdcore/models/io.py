"""Models: the built-in transformer, and saving/loading a model directory.

A model directory holds ``config.json`` (with ``"kd_model"`` naming the architecture),
``model.safetensors`` and ``tokenizer.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from kdcore.errors import CheckpointError
from kdcore.io import load_arrays, read_json, save_arrays, write_json
from kdcore.models.output import ModelOutput
from kdcore.models.transformer import Transformer, TransformerConfig

__all__ = [
    "ModelOutput",
    "Transformer",
    "TransformerConfig",
    "count_parameters",
    "load_model",
    "save_model",
]


def count_parameters(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def save_model(model: nn.Module, directory: str | os.PathLike, name: str, config) -> None:
    """Write ``config.json`` and ``model.safetensors`` (atomically) into ``directory``."""
    from kdcore.spec.convert import converter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    save_arrays(directory / "model.safetensors", weights, metadata={"format": "mlx"})
    write_json(directory / "config.json", {"kd_model": name, **converter.unstructure(config)})


def load_model(
    directory: str | os.PathLike,
    dtype: str | None = None,
    where: str = "$.teachers[0].params.dtype",
) -> tuple[nn.Module, str, object]:
    """(model, architecture name, config) from a model directory (or a ``.gguf`` file or a
    hub name, see ``kdcore.models.mlxlm.locate_model``), cast by the dtype policy
    (``kdcore.models.dtype``; ``dtype`` is the spec's choice)."""
    from kdcore.models.dtype import apply_policy
    from kdcore.models.mlxlm import locate_model
    from kdcore.registry.manager import get_registry
    from kdcore.registry.setup import Setup
    from kdcore.spec.convert import structure_config

    directory = locate_model(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory not found: {directory}")
    raw = read_json(directory / "config.json", "model config")
    name = raw.pop("kd_model", None)
    if name is None and "model_type" in raw:  # an mlx-lm directory (Hugging Face layout)
        from kdcore.models.mlxlm import load_kd_model

        return load_kd_model(directory, dtype, where)
    if name is None:
        raise CheckpointError(f"{directory}/config.json does not name its architecture (kd_model)")
    try:
        component = get_registry().get("model", name)
    except KeyError as exc:
        raise CheckpointError(f"{directory}: {exc.args[0]}") from None
    config, problems = structure_config(component, raw, "$")
    if problems:
        raise CheckpointError(f"{directory}/config.json: " + "; ".join(problems))
    model = component.factory(config, Setup(base_dir=directory))
    weights = load_arrays(directory / "model.safetensors", "model weights")
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise CheckpointError(
            f"{directory}/model.safetensors does not match config.json: {exc}"
        ) from exc
    model.dtype_choice = apply_policy(model, dtype, where)
    mx.eval(model.parameters())
    return model, name, config
