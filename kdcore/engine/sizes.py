"""What one step of a run will hold in memory, estimated from the spec's shapes before any
weight or data is loaded, and the context lengths the spec's ``seq_len`` must fit.

``kd validate`` and ``kd distill`` refuse a run whose estimate exceeds the machine's memory
(``run.memory_check = false`` runs it anyway), naming the field that drives the estimate.
The estimate is an order of magnitude, not a budget: float32 weights (the CPU dtype
policy), the student's gradient and Adam moments, the activations its backward keeps per
layer (attention scores included: ``[B, heads, L, L]``), one teacher layer's transient
activations, and the fused loss's chunk temporaries (or whole ``[B, L, V]`` logits when
``train.fused_loss`` is off).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import mlx.nn as nn
from mlx.utils import tree_flatten

from kdcore.io import read_json

FLOAT = 4  # bytes: every model runs float32 on the CPU (kdcore.models.dtype)
FUSED_TEMPORARIES = 6 * (1 << 27)  # a few [C, V] float32 buffers of the fused pass (128 MiB)
GB = 1e9


@attrs.frozen
class Shape:
    """What the estimate needs of one model; None where the spec does not say."""

    params: int | None = None
    dim: int | None = None
    layers: int | None = None
    heads: int | None = None
    hidden: int | None = None  # the MLP's width
    vocab: int | None = None
    context: int | None = None  # the longest sequence it was built for


def shape_of_config(config: dict[str, Any]) -> Shape:
    """A model's shape from its ``config.json`` (kdcore's transformer or mlx-lm/HF keys)."""
    text = config.get("text_config") or {}
    merged = {**text, **config}

    def first(*keys: str) -> int | None:
        for key in keys:
            value = merged.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    dim = first("dim", "hidden_size", "n_embd", "d_model")
    layers = first("layers", "num_hidden_layers", "n_layer", "num_layers")
    hidden = first("hidden_dim", "intermediate_size", "n_inner") or (4 * dim if dim else None)
    vocab = first("vocab_size")
    heads = first("heads", "num_attention_heads", "n_head")
    kv_heads = first("kv_heads", "num_key_value_heads") or heads
    params = None
    if dim and layers and vocab:
        tied = merged.get("tie_embeddings", merged.get("tie_word_embeddings", True))
        kv_dim = dim * kv_heads // heads if heads and kv_heads else dim
        attention = 2 * dim * dim + 2 * dim * kv_dim  # q, o and the (grouped) k, v
        params = vocab * dim * (1 if tied else 2) + layers * (attention + 3 * dim * hidden)
    return Shape(
        params=params,
        dim=dim,
        layers=layers,
        heads=heads,
        hidden=hidden,
        vocab=vocab,
        context=first("max_seq_len", "max_position_embeddings", "n_positions", "seq_length"),
    )


def shape_of_folder(folder: Path) -> Shape | None:
    """A saved model's shape from its ``config.json`` (None: no readable config)."""
    try:
        return shape_of_config(read_json(folder / "config.json"))
    except Exception:  # noqa: BLE001 - unreadable here: the run's own load says why
        return None


def shape_of_module(model: nn.Module, config: Any) -> Shape:
    """A built model's shape: its parameters counted, the rest from its config."""
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    plain = attrs.asdict(config) if attrs.has(type(config)) else dict(vars(config))
    from_config = shape_of_config({k: v for k, v in plain.items() if isinstance(v, int)})
    return attrs.evolve(from_config, params=params)


def machine_memory() -> int:
    """Bytes of memory this process may use: the physical memory, or a cgroup's limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _layer_activations(shape: Shape, batch: int, seq_len: int) -> int:
    """Bytes one transformer layer keeps for its backward: ~14 width-``dim`` vectors and 4
    MLP-width ones per token, and the attention scores and probabilities."""
    dim, hidden, heads = shape.dim or 0, shape.hidden or 0, shape.heads or 1
    tokens = batch * seq_len
    return FLOAT * (tokens * (14 * dim + 4 * hidden) + 2 * batch * heads * seq_len * seq_len)


def step_bytes(
    student: Shape,
    teachers: list[Shape],
    batch: int,
    seq_len: int,
    fused: bool = True,
    checkpoint_layers: bool = False,
) -> dict[str, int]:
    """The estimate by part (bytes): ``student`` (weights, gradient, two Adam moments),
    ``teachers``, ``activations`` (the student's kept ones and one teacher layer's) and
    ``logits`` (the loss's temporaries)."""
    layer = _layer_activations(student, batch, seq_len)
    layers = student.layers or 0
    kept = layer * (1 if checkpoint_layers else layers)
    if checkpoint_layers:
        kept += FLOAT * batch * seq_len * (student.dim or 0) * layers
    teacher_layer = max((_layer_activations(t, batch, seq_len) for t in teachers), default=0)
    vocab = max([student.vocab or 0] + [t.vocab or 0 for t in teachers])
    tokens = batch * seq_len
    logits = FUSED_TEMPORARIES if fused else FLOAT * tokens * vocab * (3 + len(teachers))
    return {
        "student": 4 * FLOAT * (student.params or 0),
        "teachers": sum(FLOAT * (t.params or 0) for t in teachers),
        "activations": kept + teacher_layer,
        "logits": logits,
    }


def describe(parts: dict[str, int]) -> str:
    """``"15.2 GB (student 0.1, teachers 0.5, activations 14.1, logits 0.5)"``."""
    total = sum(parts.values())
    inner = ", ".join(f"{k} {v / GB:.1f}" for k, v in parts.items())
    return f"{total / GB:.1f} GB ({inner})"


def _student_shape(spec: Any) -> Shape:
    model = spec.student.model
    config = model.config
    if model.name == "mlx-lm":
        params = model.params or {}
        named = params.get("path") or params.get("base")
        folder = spec.path(str(named)) if named else None
        found = shape_of_folder(folder) if folder is not None and folder.is_dir() else None
        inline = shape_of_config(params.get("config") or {})
        if found is None:
            return inline
        return attrs.evolve(found, **{k: v for k, v in attrs.asdict(inline).items() if v})
    path = getattr(config, "path", None)
    if path is not None:
        return shape_of_folder(spec.path(path)) or Shape()
    if attrs.has(type(config)):
        plain = {k: v for k, v in attrs.asdict(config).items() if isinstance(v, int)}
        return shape_of_config(plain)
    return Shape()


def _teacher_shapes(spec: Any) -> list[tuple[int, Shape]]:
    shapes = []
    for i, ref in enumerate(spec.teachers):
        if ref.source_name != "model" or not ref.path:
            continue
        folder = spec.path(ref.path)
        if folder is not None and folder.is_dir():
            shape = shape_of_folder(folder)
            if shape is not None:
                shapes.append((i, shape))
    return shapes


def size_problems(spec: Any, memory: int | None = None) -> list[str]:
    """The spec's ``seq_len`` against each model's context, and the estimated memory of one
    step against ``memory`` (default: :func:`machine_memory`), as ``message @ $.path``."""
    seq_len = getattr(spec.data.config, "seq_len", None)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool):
        return []
    where = "$.data.params.seq_len"
    student = _student_shape(spec)
    teachers = _teacher_shapes(spec)
    problems = []
    for who, shape in [("student", student)] + [(f"teachers[{i}]", t) for i, t in teachers]:
        if shape.context is not None and seq_len > shape.context:
            problems.append(
                f"seq_len {seq_len} is longer than the {who}'s context of {shape.context} "
                f"tokens (lower seq_len to at most {shape.context}) @ {where}"
            )
    if not spec.run.memory_check:
        return problems
    batch = spec.train.batch_size
    parts = step_bytes(
        student,
        [t for _, t in teachers],
        batch,
        seq_len,
        fused=spec.train.fused_loss,
        checkpoint_layers=spec.train.checkpoint_layers,
    )
    limit = machine_memory() if memory is None else memory
    if sum(parts.values()) > limit:
        problems.append(
            f"one step would hold about {describe(parts)}, more than this machine's "
            f"{limit / GB:.1f} GB: lower train.batch_size ({batch}) or seq_len ({seq_len}), "
            "or set run.memory_check = false to run it anyway @ $.train.batch_size"
        )
    return problems
