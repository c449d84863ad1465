"""The ``quantize`` student initializer: distil a model into its own low-bit version.

``[student.init] name = "quantize", params = { bits = 4, group_size = 64, mode = "affine",
skip = ["lm_head"] }`` turns the student's linear and embedding layers into MLX quantized
layers (subclasses of ``nn.QuantizedLinear`` and ``nn.QuantizedEmbedding`` that train
faster on the CPU, holding the same tensors; the same choice of layers as mlx-lm's
``quantize_model``), so the student starts as the plain round-to-nearest (RTN) model.
What trains is the quantization ``scales`` and ``biases`` (float in the ``affine`` mode);
the packed integer ``weight`` never does: the weights stay on their RTN grid points and
distillation moves the grids, as mlx-lm's DWQ does. A parameter group
(``[[train.param_groups]]`` with ``lr_mult > 0``) opens more: norms, the layers ``skip``
left in full precision.

``layers`` gives some layers their own bit width or group size, as mixed-precision recipes
keep the (tied) embedding and the head at 8 bits and the rest at 3 or 4::

    params = { bits = 4, group_size = 64, layers = [
        { pattern = "embed_tokens", bits = 8 },
        { pattern = "lm_head", bits = 8, group_size = 32 } ] }

Each entry's ``pattern`` is ``re.search``-ed on the layer paths, like ``skip``'s; a layer
takes the first entry that matches it (``skip`` comes first: a skipped layer stays in full
precision), and an unset ``bits`` or ``group_size`` is the top-level one. A list, not a
table keyed by pattern: which entry comes first decides, and a run's spec hash (what a
resume must share) reads a table's keys sorted, so two orders of one table would pass for
the same run. A tied head is the embedding (``embed_tokens`` in mlx-lm's models, ``embed``
in the built-in transformer): quantizing it at 8 bits quantizes the head at 8 bits.

``start`` says what is quantized: ``"teacher"`` copies the teacher's tensors first (the
``from-teacher`` initializer), ``"student"`` quantizes the student as built or loaded, and
``"auto"`` (the default) quantizes a student loaded from a ``path`` as it is and copies the
teacher into a freshly built one.

The engine unfreezes the whole model at each stage; :func:`refreeze` restores this split
right after. The student is saved by :mod:`kdcore.models.save`: an mlx-lm one as an mlx-lm
quantized folder (``config.json`` with its ``"quantization"`` entry, a per-layer entry for
each layer of its own width, packed ``model.safetensors``) that ``mlx_lm.load`` opens; the
built-in transformer in kdcore's layout, dequantized (every loader opens it), with the
packed tensors beside it.
"""

from __future__ import annotations

import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from kdcore.errors import SpecError
from kdcore.models.quantize_config import QuantizeConfig, QuantizeRecord

TRAINED_LEAVES = ("scales", "biases")


# ---------------------------------------------------------------- the quantized layers


def is_quantized(module: Any) -> bool:
    """An MLX quantized layer (``QuantizedLinear``, ``QuantizedEmbedding``, mlx-lm's
    ``QuantizedSwitchLinear``...): packed ``weight`` and ``scales``, and ``bits``."""
    return isinstance(module, nn.Module) and "scales" in module and hasattr(module, "bits")


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_quantized(m)]


def has_quantized(model: nn.Module) -> bool:
    return any(True for _ in quantized_modules(model))


def layer_params(module: nn.Module) -> dict[str, Any]:
    return {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}


def _floating(value: mx.array) -> bool:
    return mx.issubdtype(value.dtype, mx.floating)


def _on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def _dense(layer: nn.Module) -> mx.array:
    scales = layer["scales"]
    weight = mx.dequantize(
        layer["weight"],
        scales,
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )
    return weight.astype(scales.dtype) if _floating(scales) else weight


class TrainQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (same parameters, same saved tensors) whose product runs as
    ``x @ dequantize(W).T`` on the CPU: there MLX's quantized matmul, and its gradient with
    respect to the scales, run several times slower than the BLAS product of the dequantized
    weight; on a GPU the quantized kernel runs."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _on_cpu():
            return super().__call__(x)
        out = x @ _dense(self).T
        return out + self["bias"] if "bias" in self else out


class TrainQuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose tied-head product (``as_linear``) dequantizes on the
    CPU, as :class:`TrainQuantizedLinear` does; the lookup dequantizes its rows only."""

    def as_linear(self, x: mx.array) -> mx.array:
        if not _on_cpu():
            return super().as_linear(x)
        return x @ _dense(self).T


def _quantized_layer(module: nn.Module, params: dict[str, Any]) -> nn.Module:
    """The quantized twin of a layer: kdcore's CPU-friendly subclasses for plain linear and
    embedding layers, the layer's own ``to_quantized`` for any other (mlx-lm's switch
    layers)."""
    args = (params["group_size"], params["bits"], params.get("mode", "affine"))
    if type(module) is nn.Linear:
        return TrainQuantizedLinear.from_linear(module, *args)
    if type(module) is nn.Embedding:
        return TrainQuantizedEmbedding.from_embedding(module, *args)
    return module.to_quantized(**params)


def _swap_layers(target: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Quantize the leaf layers named in ``layers`` with their parameters (nn.quantize's
    own walk, with kdcore's layer classes)."""

    def swap(path: str, module: nn.Module) -> nn.Module:
        return _quantized_layer(module, layers[path]) if path in layers else module

    leaves = tree_map_with_path(swap, target.leaf_modules(), is_leaf=nn.Module.is_module)
    target.update_modules(leaves)


def _target(student: nn.Module) -> nn.Module:
    """The module whose layers are swapped: an mlx-lm student's wrapped model (its names
    are the student's), else the student itself."""
    from kdcore.models.mlxlm import MlxLmModel

    return student.lm if isinstance(student, MlxLmModel) else student


def _entry(entries: list, path: str) -> int | None:
    return next((i for i, (regex, _) in enumerate(entries) if regex.search(path)), None)


def quantize_student(student: nn.Module, config: QuantizeConfig) -> QuantizeRecord:
    """Swap the student's quantizable layers for quantized ones, in place.

    The layers are mlx-lm's ``quantize_model`` choice (every layer with ``to_quantized``,
    less what the model's own ``quant_predicate`` declines) minus ``skip``, each with the
    parameters of the first ``layers`` entry that matches it, else the top-level ones (or
    the model's ``quant_predicate``'s); layers already quantized (a quantized student
    folder) stay as they are. A layer whose input size its group size does not divide is
    an error, not a silent full-precision layer."""
    from kdcore.models.mlxlm import MlxLmModel

    target = _target(student)
    top = {"group_size": config.groups, "bits": config.bits, "mode": config.mode}
    patterns = [re.compile(p) for p in config.skip]
    entries = [(re.compile(e.pattern), e) for e in config.layers]
    declines = getattr(target, "quant_predicate", None)
    chosen: dict[str, dict] = {}
    matched: set[str] = set()
    used: set[int] = set()
    bad: dict[tuple[str, int], list[str]] = {}  # (its place, group size) -> layers
    already: list[str] = []
    paths: list[str] = []
    for path, module in tree_flatten(target.leaf_modules(), is_leaf=nn.Module.is_module):
        if is_quantized(module):
            already.append(path)
            continue
        if not hasattr(module, "to_quantized"):
            continue
        paths.append(path)
        hits = [p.pattern for p in patterns if p.search(path)]
        if hits:
            matched.update(hits)
            continue
        verdict = declines(path, module) if declines is not None else True
        if verdict is False:
            continue
        # the model's quant_predicate may give a layer its own parameters
        params = dict(verdict) if isinstance(verdict, dict) else dict(top)
        where = "group_size"
        if (i := _entry(entries, path)) is not None:
            used.add(i)
            entry = config.layers[i]
            params.update(
                {k: v for k in ("bits", "group_size") if (v := getattr(entry, k)) is not None}
            )
            if entry.group_size is not None:
                where = f"layers[{i}].group_size"
        group_size = params.get("group_size") or top["group_size"]
        if module.weight.shape[-1] % group_size:
            bad.setdefault((where, group_size), []).append(f"{path} ({module.weight.shape[-1]})")
            continue
        chosen[path] = params
    unused = [p for p in config.skip if p not in matched]
    if unused:
        like = ", ".join(paths[:3])
        raise SpecError(
            f"skip pattern(s) {unused} match no layer (re.search on layer paths such as "
            f"{like}) @ $.student.init.params.skip"
        )
    unused = [e.pattern for i, e in enumerate(config.layers) if i not in used]
    if unused:
        like = ", ".join(paths[:3])
        raise SpecError(
            f"layers pattern(s) {unused} match no layer this quantizes (re.search on layer "
            f"paths such as {like}; a skipped layer, or one an earlier pattern matches, "
            "does not count) @ $.student.init.params.layers"
        )
    for (where, size), layers in bad.items():
        more = f" and {len(layers) - 3} more" if len(layers) > 3 else ""
        raise SpecError(
            f"group_size {size} does not divide the input size of {', '.join(layers[:3])}"
            f"{more}: choose a group size that divides it, or leave those layers in full "
            f"precision with skip @ $.student.init.params.{where}"
        )
    if not chosen and not already:
        where = "skip" if config.skip else "start"
        raise SpecError(
            f"initializer 'quantize': no layer of {type(target).__name__} to quantize "
            f"@ $.student.init.params.{where}"
        )
    _swap_layers(target, chosen)
    if isinstance(student, MlxLmModel):
        student.sync()  # a swapped top-level layer (lm_head) is a new child
    return QuantizeRecord(
        bits=config.bits,
        group_size=config.groups,
        mode=config.mode,
        layers=dict(sorted((path, layer_params(m)) for path, m in quantized_modules(student))),
    )


# ---------------------------------------------------------------- what trains


def _leaf(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, leaf = path.split(".")
    node: Any = model
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, leaf


def refreeze(student: nn.Module, groups: list | None = None, prefix: str = "student.") -> None:
    """Restore what trains in a quantized student (no-op for other students).

    Packed weights (and any integer scales: the ``mx``/``nv`` modes' 8-bit exponents, which
    take no gradient) never train. A student the ``quantize`` initializer made trains its
    float ``scales`` and ``biases`` only, plus every floating parameter the first matching
    parameter group of ``groups`` opens (``lr_mult > 0``; patterns ``re.search`` the dotted
    name under ``prefix``, as the optimizer's groups do). ``groups`` is None at the
    initializer and the stage's groups in the engine, which also refuses a quantized
    student of which nothing trains."""
    modules = quantized_modules(student)
    if not modules:
        return
    record = getattr(student, "kd_quantize", None)
    if record is not None:
        student.freeze()
        for _, module in modules:
            keys = [k for k in TRAINED_LEAVES if k in module and _floating(module[k])]
            if keys:
                module.unfreeze(recurse=False, keys=keys)
        compiled = [(re.compile(g.pattern), g.lr_mult) for g in groups or ()]
        for path, value in tree_flatten(student.parameters()):
            if not _floating(value):
                continue
            mult = next((m for p, m in compiled if p.search(prefix + path)), None)
            if mult:
                owner, leaf = _leaf(student, path)
                owner.unfreeze(recurse=False, keys=[leaf])
    for _, module in modules:
        frozen = [k for k, v in module.items() if isinstance(v, mx.array) and not _floating(v)]
        module.freeze(recurse=False, keys=frozen, strict=False)
    if (
        record is not None
        and groups is not None
        and not tree_flatten(student.trainable_parameters())
    ):
        raise SpecError(
            f"nothing of the quantized student trains: mode {record.mode!r} keeps its scales "
            "as 8-bit exponents, which take no gradient; open norms or full-precision layers "
            'with a parameter group (pattern = "norm") @ $.train.param_groups'
        )


def trained_parameters(student: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(student.trainable_parameters()))


# ---------------------------------------------------------------- sizes


def parameter_count(model: nn.Module) -> int:
    """Parameters as mlx-lm counts them: a quantized layer's weights unpacked
    (``packed * 32 / bits``), its scales and biases not counted."""
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, module in quantized_modules(model):
        total -= sum(module[k].size for k in ("weight", *TRAINED_LEAVES) if k in module)
        total += module["weight"].size * 32 // module.bits
    return total


def bits_per_weight(model: nn.Module) -> float:
    """mlx-lm's figure (``compute_bits_per_weight``): all bytes * 8 / :func:`parameter_count`,
    full-precision layers, norms and scales included."""
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return nbytes * 8 / max(parameter_count(model), 1)


def quantized_bits_per_weight(model: nn.Module) -> float | None:
    """Bits per weight of the quantized layers alone (packed weights, scales, biases):
    ``bits + 32 * leaves / group_size`` for float32 scales and biases."""
    modules = quantized_modules(model)
    if not modules:
        return None
    nbytes = sum(m[k].nbytes for _, m in modules for k in ("weight", *TRAINED_LEAVES) if k in m)
    weights = sum(m["weight"].size * 32 // m.bits for _, m in modules)
    return nbytes * 8 / weights


def summary(student: nn.Module) -> dict[str, Any] | None:
    """The run summary's ``quantization`` entry (None for a student without quantized
    layers): the settings, the layers of other widths (``layers``: path -> parameters), how
    many layers, the unpacked parameter count, bits per weight."""
    modules = quantized_modules(student)
    if not modules:
        return None
    record = getattr(student, "kd_quantize", None)
    top = top_params(student)
    return {
        **top,
        "layers": own_params(student, top),
        "quantized_layers": len(modules),
        "parameters": parameter_count(student),
        "trainable_parameters": trained_parameters(student),
        "bits_per_weight": bits_per_weight(student),
        "quantized_bits_per_weight": quantized_bits_per_weight(student),
        "initializer": record is not None,
    }


def top_params(student: nn.Module) -> dict[str, Any]:
    """The common ``group_size``/``bits``/``mode``: the initializer's top-level ones, else
    (a quantized folder loaded) those most of the quantized layers have."""
    record = getattr(student, "kd_quantize", None)
    if record is not None:
        return record.top
    found = [layer_params(m) for _, m in quantized_modules(student)]
    return max(found, key=found.count)


def own_params(student: nn.Module, top: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """path -> parameters of each quantized layer whose parameters are not ``top``."""
    return {
        path: layer_params(m) for path, m in quantized_modules(student) if layer_params(m) != top
    }


def dequantized_weights(model: nn.Module) -> dict[str, mx.array]:
    """All weights with each quantized layer's ``weight`` dequantized (its scales and
    biases dropped): the full-precision model that computes what the quantized one does."""
    weights = dict(tree_flatten(model.parameters()))
    for path, module in quantized_modules(model):
        for leaf in TRAINED_LEAVES:
            weights.pop(f"{path}.{leaf}", None)
        weights[f"{path}.weight"] = _dense(module)
    return weights


def swap_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Quantize ``model``'s layers named in ``layers`` (path -> parameters, as a saved
    folder records them) empty-handed, ready for the saved tensors."""
    _swap_layers(_target(model), layers)


# ---------------------------------------------------------------- the initializer


def _start(config: QuantizeConfig, student: nn.Module, teachers: list) -> str:
    has_teacher = config.teacher < len(teachers) and teachers[config.teacher] is not None
    if config.start == "auto":
        if getattr(student, "source", None) is not None:
            return "student"  # loaded from a folder: its own weights are the point
        if has_teacher:
            return "teacher"
        raise SpecError(
            "initializer 'quantize' would quantize a freshly built (random) student: give it "
            'a teacher model to copy, load the student from a path, or say start = "student" '
            "@ $.student.init.params.start"
        )
    if config.start == "teacher" and not has_teacher:
        raise SpecError(
            f"initializer 'quantize' start = \"teacher\" needs a teacher model "
            f"(teachers[{config.teacher}] has none) @ $.student.init.params.teacher"
        )
    return config.start


def quantize_init(config: QuantizeConfig, setup=None):
    """Initializer factory: ``init(student, teachers) -> report``."""
    from kdcore.models.init import FromTeacherConfig, from_teacher

    def init(student, teachers):
        start = _start(config, student, teachers)
        copied = None
        if start == "teacher":
            copied = from_teacher(FromTeacherConfig(teacher=config.teacher))(student, teachers)
        record = quantize_student(student, config)
        student.kd_quantize = record
        refreeze(student)
        mx.eval(student.parameters())
        trained = trained_parameters(student)
        report = {
            "from": "quantize",
            "start": start,
            "bits": record.bits,
            "group_size": record.group_size,
            "mode": record.mode,
            "layers": {p: v for p, v in record.layers.items() if v != record.top},
            "quantized_layers": len(record.layers),
            "trainable_parameters": trained,
            "frozen_parameters": sum(v.size for _, v in tree_flatten(student.parameters()))
            - trained,
            "bits_per_weight": bits_per_weight(student),
        }
        if copied is not None:
            report["from_teacher"] = copied
        return report

    return init
