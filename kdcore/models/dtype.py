"""One dtype policy for every model kdcore loads (teachers, students, ``kd cache``,
``kd sample``, ``kd eval``): what a model computes in, and why.

On a CPU device float16/bfloat16 weights and quantization scales compute in float32, and
quantized layers are dequantized to float32, unless the spec names a dtype: MLX's CPU
backend sends float32 matmuls to BLAS but runs 16-bit ones and ``quantized_matmul`` in
plain loops, ~20-30x slower. A named dtype casts the float weights and scales and keeps
quantized layers quantized (the memory-saving choice). On a GPU the checkpoint's dtype and
quantization stay. When float32 would not fit the machine's memory the policy refuses and
names the choice instead of swapping."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from kdcore.errors import SpecError

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}
# Share of physical memory one float32 model may take before the policy refuses it.
MEMORY_SHARE = 0.7


@attrs.frozen
class DtypeChoice:
    """``dtype``: what the model's float weights and scales compute in (None: as stored);
    ``dequantize``: quantized layers become dense layers of that dtype;
    ``reason``: one line for ``kd validate`` and ``kd doctor``."""

    dtype: str | None
    reason: str
    dequantize: bool = False

    def describe(self, stored: Iterable[str]) -> str:
        stored = ", ".join(sorted(stored)) or "no float weights"
        dense = ", quantized layers dequantized" if self.dequantize else ""
        return f"{self.dtype or 'as stored'}{dense} (stored: {stored}; {self.reason})"


def on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def choose_dtype(
    requested: str | None,
    stored: Iterable[str],
    float_elements: int = 0,
    where: str = "$.teachers[0].params.dtype",
    gpu: bool | None = None,
    quantized: bool = False,
) -> DtypeChoice:
    """The policy. ``stored``: the float dtypes of the checkpoint's weights and scales;
    ``float_elements``: how many float values it holds once dense (for the memory check);
    ``quantized``: whether it has quantized layers."""
    stored = set(stored)
    if requested is not None:
        if requested not in DTYPES:
            raise SpecError(
                f"dtype must be one of {', '.join(DTYPES)}, not {requested!r} @ {where}"
            )
        return DtypeChoice(requested, f"set by {where.removeprefix('$.')}")
    if gpu if gpu is not None else on_gpu():
        return DtypeChoice(None, "GPU device: the checkpoint's dtype")
    half = stored & {"float16", "bfloat16"}
    if not half and not quantized:
        return DtypeChoice(None, "already float32" if stored else "nothing to cast")
    memory = physical_memory()
    slow = "/".join([*sorted(half), *(["quantized"] if quantized else [])])
    if memory and float_elements * 4 > MEMORY_SHARE * memory:
        raise SpecError(
            f"computing this {slow} model in float32 (the CPU default: 16-bit and quantized "
            f"matmuls run ~20-30x slower there) needs {float_elements * 4 / 2**30:.1f} GiB, "
            f"more than {MEMORY_SHARE:.0%} of this machine's {memory / 2**30:.1f} GiB; set "
            f"dtype = '{sorted(half or {'float16'})[0]}' to keep it as stored (slow but "
            f"fitting) @ {where}"
        )
    return DtypeChoice(
        "float32",
        f"CPU device: {slow} matmuls run ~20-30x slower than float32 on MLX's CPU backend "
        "(set dtype to keep them)",
        dequantize=quantized,
    )


def float_dtypes(model: nn.Module) -> tuple[set[str], int, bool]:
    """(float dtypes among the parameters, scales included; float elements once every
    quantized layer is dense; whether any layer is quantized)."""
    names, count, quantized = set(), 0, False
    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            names.add(NAMES.get(value.dtype, str(value.dtype)))
            count += value.size
    for _, module in model.named_modules():
        if hasattr(module, "bits") and "scales" in module:
            quantized = True
            count += module["weight"].size * 32 // module.bits
    return names, count, quantized


def cast_model(model: nn.Module, dtype: str | None) -> None:
    """Cast every float parameter (quantization scales and biases included) to ``dtype``."""
    if dtype is None:
        return
    target = DTYPES[dtype]
    model.update(
        tree_map(
            lambda a: a.astype(target) if mx.issubdtype(a.dtype, mx.floating) else a,
            model.parameters(),
        )
    )


def dense_weights(model: nn.Module) -> dict[str, mx.array]:
    """Every weight by name, each quantized layer's ``weight`` dequantized in its scales'
    dtype (its ``scales`` and ``biases`` dropped): what copying from a model reads."""
    weights = dict(tree_flatten(model.parameters()))
    for path, module in model.named_modules():
        if hasattr(module, "bits") and "scales" in module:
            prefix = f"{path}." if path else ""
            weights.pop(f"{prefix}scales")
            biases = weights.pop(f"{prefix}biases", None)
            weights[f"{prefix}weight"] = mx.dequantize(
                module["weight"],
                module["scales"],
                biases,
                module.group_size,
                module.bits,
                mode=getattr(module, "mode", "affine"),
            )
    return weights


def dequantize_layers(model: nn.Module) -> None:
    """Quantized linear and embedding layers to dense ones (mlx-lm's own conversion)."""
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)


def apply_policy(
    model: nn.Module, requested: str | None, where: str = "$.teachers[0].params.dtype"
) -> DtypeChoice:
    """Choose and apply the dtype of a loaded ``model``; the choice, for the log."""
    stored, count, quantized = float_dtypes(model)
    choice = choose_dtype(requested, stored, count, where, quantized=quantized)
    cast_model(model, choice.dtype)
    if choice.dequantize:  # after the cast: 16-bit scales would make 16-bit weights
        dequantize_layers(model)
    return choice


# Float dtypes as safetensors headers and GGML types name them; the 16-bit scales of
# GGUF's Q4_0/Q4_1/Q8_0 blocks count as float16 (kd import keeps them so).
STORED_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
GGML_SCALED = {"Q4_0", "Q4_1", "Q8_0"}


def stored_dtypes(path: str | os.PathLike) -> tuple[set[str], int, bool]:
    """(float dtypes, float elements once dense, whether quantized) of a model folder or
    GGUF file, from headers alone (no weights read: ``kd validate`` stays cheap)."""
    from pathlib import Path

    from kdcore.io import check_safetensors

    path = Path(path)
    names: set[str] = set()
    count, quantized = 0, False
    if path.suffix.lower() == ".gguf":
        from kdcore.gguf.read import open_gguf

        for tensor in open_gguf(path).tensors:
            kind = tensor.tensor_type.name
            # k-quants and other types are dequantized to float16 on import
            names.add(STORED_NAMES.get(kind, "float16"))
            quantized |= kind in GGML_SCALED
            count += int(tensor.n_elements)
        return names, count, quantized
    for file in sorted(path.glob("model*.safetensors")):
        header = check_safetensors(file, "model weights")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            size = math.prod(info.get("shape") or [1])
            if info.get("dtype") in STORED_NAMES:
                names.add(STORED_NAMES[info["dtype"]])
                count += size
            elif name.endswith(".weight") and f"{name[:-7]}.scales" in header:
                quantized = True  # packed uint32: 32 bits hold 32 / bits values
                scales = header[f"{name[:-7]}.scales"].get("shape") or [1]
                count += math.prod(scales) * 32  # at least group size 32 per scale
    return names, count, quantized


def planned(path: str | os.PathLike, requested: str | None, where: str) -> str:
    """One line for ``kd validate``: what the model at ``path`` will compute in, and why
    (a float32 model too big for this machine is the policy's error, raised here)."""
    stored, count, quantized = stored_dtypes(path)
    return choose_dtype(requested, stored, count, where, quantized=quantized).describe(stored)
