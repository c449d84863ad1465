"""``kd design``: a student configuration of a chosen size for a teacher.

Teachers: the built-in ``transformer`` (a kdcore model folder) and mlx-lm llama, mistral,
qwen2 and qwen3 folders (``config.json`` with ``model_type``; needs ``kdcore[mlx-lm]``). An
mlx-lm student is printed as ``{name = "mlx-lm", params = {config = {...}}}``: the teacher's
config with the size fields replaced.

The search is over shapes of the teacher's own family: ``layers`` from 1 to the teacher's,
and widths ``dim = heads * head_size`` with ``heads`` up to the teacher's and an even head
size up to the teacher's (multiples of 16 when the teacher's is 64 or more, of 8 when 32 or
more, else every even size from 4); per ``dim`` the pair closest to the teacher's in
``ln(heads/H_t)^2 + ln(size/S_t)^2``. The MLP keeps the teacher's ``hidden_dim / dim``
ratio; grouped-query teachers keep their ``heads / kv_heads`` group size.

Parameter counts are never computed from a formula: for each width the model is
instantiated with one and with two layers (MLX arrays are lazy, so nothing is allocated),
which gives exactly ``P(L) = P(1) + (L - 1) * (P(2) - P(1))`` since blocks are identical;
the chosen configuration is then instantiated in full and counted again.

Choice among the shapes within 10% of the target (``|ln(P / target)| <= 0.1``), or when
there are none, within 2% of the closest one:

- ``depth``: the most layers (closest to the teacher's depth), then the closest count;
- ``width``: the widest (closest to the teacher's ``dim``), then the closest count;
- ``balanced``: smallest ``|ln(L/L_t) - 2 ln(d/d_t)|``, i.e. depth and width squared shrink
  by the same factor (a block's weights grow as ``dim^2``), then the closest count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import mlx.nn as nn

from kdcore.errors import CheckpointError, KdError, SpecError
from kdcore.io import read_json
from kdcore.models.io import count_parameters

KEEP = ("depth", "width", "balanced")
TOLERANCE = 0.10  # |ln(P / target)| accepted as "on target"
SLACK = 0.02  # when no shape is on target: |ln(P / target)| slack over the best one


@attrs.frozen
class Shape:
    """The size fields of a decoder-only transformer, whatever the family calls them."""

    dim: int
    layers: int
    heads: int
    kv_heads: int
    hidden_dim: int
    head_size: int  # dim // heads, except in families that size heads on their own (qwen3)


@attrs.define
class Family:
    """How to read a teacher's shape, build a model of another shape, and write its config.

    ``build(shape)`` returns an (unevaluated) ``nn.Module``; ``params(shape)`` the fields a
    spec's ``[student] model.params`` (or an mlx-lm ``config.json``) takes.
    """

    architecture: str
    teacher: Shape
    build: Callable[[Shape], nn.Module]
    params: Callable[[Shape], dict[str, Any]]
    grouped_kv: bool
    hidden_multiple: int = 16
    decoupled_heads: bool = False  # head size fixed apart from dim (qwen3's head_dim)
    default_hidden: Callable[[int], int] | None = None


def _builtin_family(raw: dict) -> Family:
    from kdcore.models.transformer import Transformer, TransformerConfig
    from kdcore.registry.manager import get_registry
    from kdcore.spec.convert import structure_config

    component = get_registry().get("model", "transformer")
    config, problems = structure_config(component, raw, "$")
    if problems:
        raise CheckpointError("teacher config.json: " + "; ".join(problems))
    default = TransformerConfig(dim=config.dim, heads=config.heads).hidden_dim

    def student_config(shape: Shape) -> TransformerConfig:
        return attrs.evolve(
            config,
            dim=shape.dim,
            layers=shape.layers,
            heads=shape.heads,
            kv_heads=shape.kv_heads,
            hidden_dim=shape.hidden_dim,
        )

    def params(shape: Shape) -> dict[str, Any]:
        cfg = student_config(shape)
        defaults = TransformerConfig()
        out = {
            "vocab_size": cfg.vocab_size,
            "dim": cfg.dim,
            "layers": cfg.layers,
            "heads": cfg.heads,
            "kv_heads": cfg.kv_heads,
            "hidden_dim": cfg.hidden_dim,
            "max_seq_len": cfg.max_seq_len,
        }
        for f in attrs.fields(TransformerConfig):
            if f.name not in out and getattr(cfg, f.name) != getattr(defaults, f.name):
                out[f.name] = getattr(cfg, f.name)
        return out

    teacher = Shape(
        config.dim,
        config.layers,
        config.heads,
        config.kv_heads,
        config.hidden_dim,
        config.dim // config.heads,
    )
    return Family(
        architecture="transformer",
        teacher=teacher,
        build=lambda shape: Transformer(student_config(shape)),
        params=params,
        grouped_kv=config.kv_heads != config.heads,
        default_hidden=(
            (lambda d: TransformerConfig(dim=d, heads=1).hidden_dim)
            if config.hidden_dim == default
            else None
        ),
    )


# mlx-lm families whose config uses the Hugging Face llama names for every size field.
MLXLM_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _mlxlm_family(raw: dict, directory: Path) -> Family:
    from kdcore.models.mlxlm import build_mlxlm, require_mlx_lm

    require_mlx_lm()
    model_type = raw.get("model_type")
    if model_type not in MLXLM_TYPES:
        raise CheckpointError(
            f"{directory}: kd design sizes mlx-lm {', '.join(MLXLM_TYPES)} configs, "
            f"not model_type {model_type!r}"
        )
    base = {k: v for k, v in raw.items() if k not in ("quantization", "quantization_config")}
    heads = int(base["num_attention_heads"])
    kv = int(base.get("num_key_value_heads") or heads)
    dim = int(base["hidden_size"])
    head_size = int(base.get("head_dim") or dim // heads)
    layers, hidden = int(base["num_hidden_layers"]), int(base["intermediate_size"])
    teacher = Shape(dim, layers, heads, kv, hidden, head_size)

    def config(shape: Shape) -> dict[str, Any]:
        cfg = dict(base)
        cfg.update(
            hidden_size=shape.dim,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            intermediate_size=shape.hidden_dim,
        )
        if "head_dim" in cfg:
            cfg["head_dim"] = shape.head_size
        return cfg

    return Family(
        architecture="mlx-lm",
        teacher=teacher,
        build=lambda shape: build_mlxlm(config(shape)),
        params=lambda shape: {"config": config(shape)},
        grouped_kv=kv != heads,
        hidden_multiple=16,
        decoupled_heads=head_size * heads != dim,
    )


def load_family(teacher_dir: str | Path) -> Family:
    """The family of the model in ``teacher_dir`` (a kdcore model or an mlx-lm directory)."""
    directory = Path(teacher_dir)
    raw = read_json(directory / "config.json", "teacher config")
    name = raw.pop("kd_model", None)
    if name == "transformer":
        return _builtin_family(raw)
    if name is None and "model_type" in raw:
        return _mlxlm_family(raw, directory)
    raise CheckpointError(
        f"{directory}/config.json: kd design sizes the built-in 'transformer' and mlx-lm "
        f"llama/qwen families, not {name or raw.get('model_type')!r}"
    )


def _round(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _group(family: Family) -> int:
    """Query heads per KV head in the teacher (1 without grouped-query attention)."""
    t = family.teacher
    return t.heads // t.kv_heads if family.grouped_kv else 1


def _hidden(family: Family, dim: int) -> int:
    if family.default_hidden is not None:
        return family.default_hidden(dim)
    t = family.teacher
    multiple = family.hidden_multiple if t.hidden_dim < 1024 else 64
    return _round(t.hidden_dim * dim / t.dim, multiple)


def _head_sizes(teacher_size: int) -> range:
    """Even head sizes up to the teacher's, on a grid as coarse as real families use:
    multiples of 16 (teacher's >= 64), of 8 (>= 32), else every even size from 4."""
    step = 16 if teacher_size >= 64 else 8 if teacher_size >= 32 else 2
    start = step if step > 2 else min(4, teacher_size - teacher_size % 2)
    return range(start, teacher_size + 1, step)


def widths(family: Family) -> list[Shape]:
    """One single-layer shape per reachable ``dim``: for each ``dim`` the (heads, head size)
    pair whose log-ratios to the teacher's are smallest in the squared sum. Grouped-query
    families keep the teacher's group size, so ``heads`` steps by it."""
    t = family.teacher
    group = _group(family)
    best: dict[int, tuple[float, Shape]] = {}
    if family.decoupled_heads:
        # The head size stays the teacher's; heads shrink with dim (in steps of the group).
        step = 64 if t.dim >= 1024 else 16
        for dim in range(step, t.dim + 1, step):
            heads = max(group, round(t.heads * dim / t.dim / group) * group)
            shape = Shape(dim, 1, heads, heads // group, _hidden(family, dim), t.head_size)
            best[dim] = (0.0, shape)
    else:
        # From the teacher's head count down, so that ties keep more heads.
        for heads in range(t.heads - t.heads % group, 0, -group):
            for size in _head_sizes(t.head_size):
                dim = heads * size
                if dim > t.dim:
                    continue
                cost = math.log(size / t.head_size) ** 2 + math.log(heads / t.heads) ** 2
                shape = Shape(dim, 1, heads, heads // group, _hidden(family, dim), size)
                if dim not in best or cost < best[dim][0]:
                    best[dim] = (cost, shape)
    if t.dim not in best:  # the teacher's own width, even if its head size is unusual
        best[t.dim] = (0.0, attrs.evolve(t, layers=1))
    return [shape for _, (_, shape) in sorted(best.items())]


def _select(candidates: list[dict], keep: str, teacher: Shape) -> dict:
    error_min = min(c["error"] for c in candidates)
    window = [c for c in candidates if c["error"] <= max(TOLERANCE, error_min + SLACK)]

    def key(c):
        shape = c["shape"]
        depth = math.log(shape.layers / teacher.layers)
        width = math.log(shape.dim / teacher.dim)
        preference = {"depth": -depth, "width": -width, "balanced": abs(depth - 2 * width)}
        return (round(abs(preference[keep]), 9), c["error"])

    return min(window, key=key)


def design_student(
    teacher_dir: str | Path,
    compression: float | None = None,
    params: int | None = None,
    keep: str = "balanced",
) -> dict[str, Any]:
    """A student shape for the teacher in ``teacher_dir`` with about ``teacher / compression``
    (or exactly-as-close-as-possible ``params``) parameters; see the module docstring."""
    if keep not in KEEP:
        raise SpecError(f"--keep must be one of {', '.join(KEEP)}, got {keep!r}")
    if (compression is None) == (params is None):
        raise SpecError("give exactly one of --compression R or --params N")
    family = load_family(teacher_dir)
    teacher_params = count_parameters(family.build(family.teacher))
    if compression is not None:
        if not compression >= 1.0:
            raise SpecError(f"--compression must be >= 1, got {compression}")
        target = teacher_params / compression
    else:
        if not 0 < params <= teacher_params:
            raise SpecError(
                f"--params must be in (0, {teacher_params}] (the teacher's), got {params}"
            )
        target = float(params)

    candidates = []
    for width in widths(family):
        one = count_parameters(family.build(width))
        per_layer = count_parameters(family.build(attrs.evolve(width, layers=2))) - one
        for layers in range(1, family.teacher.layers + 1):
            count = one + (layers - 1) * per_layer
            candidates.append(
                {
                    "shape": attrs.evolve(width, layers=layers),
                    "parameters": count,
                    "error": abs(math.log(count / target)),
                }
            )
    chosen = _select(candidates, keep, family.teacher)
    shape = chosen["shape"]
    student_params = count_parameters(family.build(shape))
    if student_params != chosen["parameters"]:
        raise KdError(
            f"{family.architecture}: the layers of this family are not all alike "
            f"({student_params:,} counted, {chosen['parameters']:,} predicted); kd design "
            "cannot size it"
        )
    spec_params = family.params(shape)
    notes = []
    if abs(math.log(student_params / target)) > TOLERANCE:
        notes.append(
            f"the shapes of this family are coarse near {target:,.0f} parameters: this "
            f"one is {student_params / target - 1:+.1%} off (--keep changes the trade-off)"
        )
    return {
        "teacher": {
            "path": str(teacher_dir),
            "architecture": family.architecture,
            "parameters": teacher_params,
            "shape": attrs.asdict(family.teacher),
        },
        "keep": keep,
        "target_parameters": round(target),
        "student": {
            "architecture": family.architecture,
            "parameters": student_params,
            "shape": attrs.asdict(shape),
            "params": spec_params,
        },
        "compression": teacher_params / student_params,
        "relative_error": student_params / target - 1.0,
        "candidates_considered": len(candidates),
        "notes": notes,
        "toml": student_toml(family.architecture, spec_params),
    }


def student_toml(architecture: str, params: dict[str, Any]) -> str:
    """The ``[student]`` table of a spec, as TOML."""
    from kdcore.spec.tomlwrite import dumps

    return dumps({"student": {"model": {"name": architecture, "params": params}}}).strip() + "\n"
