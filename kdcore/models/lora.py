"""The ``lora`` student initializer: mlx-lm LoRA (or DoRA) layers, only the adapters train.

``[student.init] name = "lora", params = { rank = 8, scale = 20.0, dropout = 0.0,
num_layers = -1, keys = ["self_attn.q_proj", "self_attn.v_proj"] }`` replaces the chosen
linear layers of the last ``num_layers`` decoder layers (-1: all) by mlx-lm's
``LoRALinear``: ``y = W x + scale * (dropout(x) A) B`` with ``A`` [in, r] uniform in
``+-1/sqrt(in)`` and ``B`` [r, out] zero, so the student starts as the base model. ``keys``
(paths inside a layer) default to every linear layer of the layer, as in mlx-lm.

The base weights stay frozen for the whole run (:func:`refreeze`, which the engine calls
after it unfreezes the model at each stage). The saved student holds
``adapters.safetensors`` + ``adapter_config.json`` in mlx-lm's format, so
``mlx_lm.load(BASE, adapter_path=DIR)`` applies them; with ``fuse = true`` (the default) the
directory also holds the fused model (``W + scale * B^T A^T``).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from kdcore.errors import SpecError
from kdcore.io import save_arrays, write_json
from kdcore.spec.validators import fraction, number, positive

ADAPTER_LEAVES = ("lora_a", "lora_b", "m")  # "m": DoRA's magnitude


@attrs.define
class LoraConfig:
    rank: int = attrs.field(default=8, validator=positive)
    scale: float = 20.0  # mlx-lm's default; the update is scale * (x A) B
    dropout: float = attrs.field(default=0.0, validator=[number, fraction])
    num_layers: int = -1  # the last N decoder layers get adapters; -1: all
    keys: list[str] | None = None  # module paths inside a layer; default: every linear
    dora: bool = False  # weight-decomposed LoRA (mlx-lm's DoRALinear)
    fuse: bool = True  # also save the fused model next to the adapters


@attrs.frozen
class LoraRecord:
    """What was applied, kept on the student for saving (not a parameter)."""

    num_layers: int
    rank: int
    scale: float
    dropout: float
    keys: tuple[str, ...] | None
    dora: bool
    fuse: bool


def is_lora_module(module: nn.Module) -> bool:
    return isinstance(module, nn.Module) and "lora_a" in module and "lora_b" in module


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_lora_module(m)]


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_modules(model))


def _decoder_layers(student: nn.Module) -> list:
    for name in ("layers", "blocks"):
        layers = getattr(student, name, None)
        if isinstance(layers, list):
            return layers
    raise SpecError(
        f"initializer 'lora' cannot find the decoder layers of {type(student).__name__} "
        "@ $.student.init"
    )


def apply_lora(student: nn.Module, config: LoraConfig) -> int:
    """Freeze ``student`` and swap its chosen linear layers for LoRA layers; returns how many."""
    from kdcore.models.mlxlm import MlxLmModel, require_mlx_lm

    require_mlx_lm()
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if not isinstance(config.scale, (int, float)) or not isinstance(config.dropout, (int, float)):
        raise SpecError("lora scale and dropout are fixed numbers, not schedules @ $.student.init")
    student.freeze()
    params = {"rank": config.rank, "scale": float(config.scale), "dropout": float(config.dropout)}
    if config.keys is not None:
        params["keys"] = list(config.keys)
    if isinstance(student, MlxLmModel):
        target = student.lm
    else:
        # mlx-lm's converter reads ``model.layers``; kdcore's transformer calls them blocks.
        target = types.SimpleNamespace(
            layers=_decoder_layers(student),
            named_modules=student.named_modules,
            update_modules=student.update_modules,
        )
    layers = _decoder_layers(student)
    if config.num_layers > len(layers):
        raise SpecError(
            f"lora num_layers {config.num_layers} > the student's {len(layers)} layers "
            "@ $.student.init.params.num_layers"
        )
    before = len(lora_modules(student))
    try:
        linear_to_lora_layers(target, config.num_layers, params, use_dora=config.dora)
    except (KeyError, ValueError) as exc:
        raise SpecError(f"initializer 'lora': {exc} @ $.student.init.params") from None
    if isinstance(student, MlxLmModel):
        student.sync()
    count = len(lora_modules(student)) - before
    if count == 0:
        raise SpecError(
            f"initializer 'lora': no layer matched keys {config.keys} @ $.student.init.params.keys"
        )
    return count


def refreeze(student: nn.Module) -> None:
    """Freeze everything of a LoRA student but its adapters (no-op for other students).

    The engine unfreezes the whole model at the start of each stage; this restores the
    LoRA split right after.
    """
    modules = lora_modules(student)
    if not modules:
        return
    student.freeze()
    for _, module in modules:
        module.unfreeze(recurse=False, keys=[k for k in ADAPTER_LEAVES if k in module])


def adapter_weights(student: nn.Module) -> dict[str, mx.array]:
    """The adapter tensors by mlx-lm parameter name (``...q_proj.lora_a``)."""
    prefixes = {name for name, _ in lora_modules(student)}
    out = {}
    for key, value in tree_flatten(student.parameters()):
        parent, _, leaf = key.rpartition(".")
        if leaf in ADAPTER_LEAVES and parent in prefixes:
            out[key] = value
    return out


def fused_weights(student: nn.Module) -> dict[str, mx.array]:
    """All weights with every LoRA layer folded into its base (``W + scale * B^T A^T``),
    under the base layer's names; the student itself is not changed."""
    weights = dict(tree_flatten(student.parameters()))
    for name, module in lora_modules(student):
        weights = {k: v for k, v in weights.items() if not k.startswith(name + ".")}
        for key, value in tree_flatten(module.fuse().parameters()):
            weights[f"{name}.{key}"] = value
    return weights


def adapter_config(record: LoraRecord, base: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"rank": record.rank, "scale": record.scale, "dropout": record.dropout}
    if record.keys is not None:
        params["keys"] = list(record.keys)
    config: dict[str, Any] = {
        "fine_tune_type": "dora" if record.dora else "lora",
        "num_layers": record.num_layers,
        "lora_parameters": params,
    }
    if base is not None:
        config["model"] = base
    return config


def save_adapters(student: nn.Module, directory: str | Path) -> None:
    """``adapters.safetensors`` + ``adapter_config.json`` as ``mlx_lm.lora`` writes them."""
    record = getattr(student, "kd_lora", None)
    if record is None:
        raise SpecError("this student has LoRA layers that the 'lora' initializer did not make")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_arrays(directory / "adapters.safetensors", adapter_weights(student))
    source = getattr(student, "source", None)
    write_json(
        directory / "adapter_config.json", adapter_config(record, str(source) if source else None)
    )


def lora_init(config: LoraConfig, setup=None):
    """Initializer factory: ``init(student, teachers) -> report``."""

    def init(student, teachers):
        count = apply_lora(student, config)
        student.kd_lora = LoraRecord(
            num_layers=config.num_layers,
            rank=config.rank,
            scale=float(config.scale),
            dropout=float(config.dropout),
            keys=tuple(config.keys) if config.keys is not None else None,
            dora=config.dora,
            fuse=config.fuse,
        )
        refreeze(student)
        adapters = sum(v.size for v in adapter_weights(student).values())
        total = sum(v.size for _, v in tree_flatten(student.parameters()))
        return {
            "from": "lora",
            "lora_layers": count,
            "adapter_parameters": adapters,
            "frozen_parameters": total - adapters,
        }

    return init
