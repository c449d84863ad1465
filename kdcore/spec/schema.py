"""The spec's attrs classes (what a TOML/JSON spec structures into) and the one table of
component slots that both parsing phases, the run builder and the checks read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs

from kdcore.spec.validators import fraction, in_range, non_negative, positive, unit_interval

# The largest count (steps, batch rows, micro-batches) a spec may ask for: far beyond any
# run, small enough that a typo (1e12 steps) is refused instead of started.
MAX_COUNT = 10**9

# Range validators come from kdcore.spec.validators; their errors begin with the field's name
# ("steps must be > 0"), which kdcore.spec.convert.structure_errors turns into the field's
# path ($.train.steps). The ones below are this file's own.


def _seed(_instance, attribute, value) -> None:
    # NumPy's and MLX's generators take an unsigned 64-bit seed
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{attribute.name} must be an integer in [0, 2**64), got {value}")


def _some_losses(_instance, attribute, value) -> None:
    if not value:
        raise ValueError(f'{attribute.name} must hold at least one loss (e.g. name = "ce")')


@attrs.define
class ComponentRef:
    """``{name = "...", params = {...}}``; ``config`` is filled in by :func:`resolve`."""

    name: str
    params: dict[str, Any] = attrs.field(factory=dict)
    config: Any = attrs.field(default=None, init=False, eq=False, repr=False)


@attrs.define
class LossRef:
    name: str
    weight: float = 1.0
    params: dict[str, Any] = attrs.field(factory=dict)
    label: str | None = None  # metric key; defaults to the name (name#2 for repeats)
    config: Any = attrs.field(default=None, init=False, eq=False, repr=False)


@attrs.define
class RunSection:
    name: str = "run"
    seed: int = attrs.field(default=0, validator=_seed)
    output: str | None = None
    # false: run even when one step's estimated memory exceeds the machine's
    memory_check: bool = True


def default_source(source: str | None, cache: str | None, server: str | None) -> str:
    """The teacher source an entry names: ``source``, else by the key it gives (a
    ``cache`` beside a ``path`` or ``server`` is read, the other naming its origin)."""
    if source:
        return source
    if cache:
        return "cache"
    return "server" if server else "model"


@attrs.define
class TeacherRef:
    """A teacher: ``path`` (a saved model), ``cache`` (a top-k cache), ``server`` (the
    address of a teacher server) or a named ``source``."""

    source: str | None = None
    path: str | None = None
    cache: str | None = None
    server: str | None = None
    params: dict[str, Any] = attrs.field(factory=dict)
    label: str | None = None
    config: Any = attrs.field(default=None, init=False, eq=False, repr=False)

    @property
    def source_name(self) -> str:
        return default_source(self.source, self.cache, self.server)


@attrs.define
class StudentSection:
    model: ComponentRef = attrs.field(factory=lambda: ComponentRef("transformer"))
    init: ComponentRef = attrs.field(factory=lambda: ComponentRef("random"))


@attrs.define
class OptimizerSection:
    name: str = "adamw"
    lr: float = attrs.field(default=1e-3, validator=non_negative)
    weight_decay: float = attrs.field(default=0.0, validator=non_negative)
    params: dict[str, Any] = attrs.field(factory=dict)  # extra keyword arguments


@attrs.define
class ParamGroup:
    """Parameters whose dotted name matches ``pattern`` (a regex; first match wins)."""

    pattern: str
    lr_mult: float = attrs.field(default=1.0, validator=non_negative)  # 0 freezes the group
    weight_decay: float | None = attrs.field(default=None, validator=non_negative)


@attrs.define
class Stage:
    steps: int = attrs.field(validator=positive)
    name: str | None = None
    param_groups: list[ParamGroup] = attrs.field(factory=list)
    lr: float | None = attrs.field(default=None, validator=non_negative)


def _token_ids(_instance, attribute, value) -> None:
    if value is not None and any(t < 0 for t in value):
        raise ValueError(f"{attribute.name} must hold token ids >= 0, got {value}")


@attrs.define
class OnPolicySection:
    """On-policy distillation as TRL's GKD defines it (kdcore.engine.onpolicy): a share
    ``lmbda`` of batches is the student's own continuations of the batch's prompts, which
    the teachers score and every token loss learns from."""

    lmbda: float = attrs.field(default=0.0, validator=unit_interval)  # 0: off (the default)
    max_new_tokens: int = attrs.field(default=64, validator=positive)
    temperature: float = attrs.field(default=1.0, validator=positive)
    top_p: float = attrs.field(default=1.0, validator=in_range(0.0, 1.0, low_open=True))
    # None: the tokenizer's end-of-sequence token, if it has one; [] never stops early
    stop_tokens: list[int] | None = attrs.field(default=None, validator=_token_ids)
    # sample from (1 - a) q + a p (MiniLLM's teacher-mixed sampling); 0: the student alone;
    # a = 1 would sample from the teacher alone: that is sequence-level KD (kd sample)
    teacher_mix_alpha: float = attrs.field(default=0.0, validator=fraction)
    # the prompt of a row whose dataset has none (every token carries loss): its first tokens
    prompt_length: int = attrs.field(default=16, validator=positive)


@attrs.define
class TrainSection:
    steps: int = attrs.field(default=100, validator=in_range(1, MAX_COUNT))
    batch_size: int = attrs.field(default=8, validator=in_range(1, MAX_COUNT))
    optimizer: OptimizerSection = attrs.field(factory=OptimizerSection)
    # 0 or None (JSON null): no clipping
    grad_clip: float | None = attrs.field(default=1.0, validator=non_negative)
    grad_accum: int = attrs.field(default=1, validator=in_range(1, MAX_COUNT))
    param_groups: list[ParamGroup] = attrs.field(factory=list)
    stages: list[Stage] = attrs.field(factory=list)
    no_decay: list[str] = attrs.field(factory=lambda: ["norm", "bias"])
    log_every: int = attrs.field(default=10, validator=positive)
    checkpoint_every: int = attrs.field(default=0, validator=non_negative)  # 0: none on the way
    keep_checkpoints: int = attrs.field(default=2, validator=positive)
    # The resumable state (weights and optimizer, ~3x the student) at the last step too:
    # off, a finished run leaves student/ alone, and --resume cannot extend it past its
    # newest earlier checkpoint. Kept anyway when the run learns parameters outside the
    # student (a learnable aggregator or loss): student/ does not hold those.
    final_checkpoint: bool = False
    # Token losses that declare rows run fused with the output heads, never holding
    # [tokens, vocab] logits; false runs every loss on full logits (the reference path).
    fused_loss: bool = True
    # Recompute each transformer layer's activations in the backward (mx.checkpoint):
    # memory of one layer instead of all, for about one more forward of compute.
    checkpoint_layers: bool = False
    on_policy: OnPolicySection = attrs.field(factory=OnPolicySection)


@attrs.define
class EvalSection:
    every: int = attrs.field(default=0, validator=non_negative)  # 0: only at the end
    batches: int = attrs.field(default=8, validator=in_range(1, MAX_COUNT))


@attrs.define
class RunSpec:
    data: ComponentRef
    student: StudentSection = attrs.field(factory=StudentSection)
    run: RunSection = attrs.field(factory=RunSection)
    teachers: list[TeacherRef] = attrs.field(factory=list)
    aggregator: ComponentRef = attrs.field(factory=lambda: ComponentRef("mean"))
    aligner: ComponentRef = attrs.field(factory=lambda: ComponentRef("identity"))
    losses: list[LossRef] = attrs.field(factory=lambda: [LossRef("ce")], validator=_some_losses)
    train: TrainSection = attrs.field(factory=TrainSection)
    eval: EvalSection = attrs.field(factory=EvalSection)
    callbacks: list[ComponentRef] = attrs.field(factory=list)
    base_dir: str = attrs.field(default=".", init=False, eq=False, repr=False)
    # the --set overrides the spec was read with, so that a problem they cause says so
    overrides: list[str] = attrs.field(factory=list, init=False, eq=False, repr=False)

    def path(self, relative: str | None) -> Path | None:
        """A path from the spec, relative to the spec file's folder."""
        if relative is None:
            return None
        p = Path(os.path.expanduser(relative))
        return p if p.is_absolute() else Path(self.base_dir) / p


@attrs.frozen
class Slot:
    """Where components of one kind sit in a spec: ``keys`` from the top table, ``many``
    for a list of entries, ``default`` the entry used when the spec has none."""

    kind: str
    keys: tuple[str, ...]
    many: bool = False
    default: dict | None = None

    @property
    def path(self) -> str:
        return "$." + ".".join(self.keys)

    def raw_entries(self, data: dict) -> list[tuple[str, dict]]:
        """(path, entry) of this slot's entries in a raw spec table."""
        node: Any = data
        for key in self.keys:
            node = node.get(key) if isinstance(node, dict) else None
        if node is None and self.default is not None:
            node = [self.default] if self.many else self.default
        if self.many:
            items = node if isinstance(node, list) else []
            return [(f"{self.path}[{i}]", e) for i, e in enumerate(items) if isinstance(e, dict)]
        if isinstance(node, dict):
            return [(self.path, node)]
        return [(self.path, self.default)] if self.default is not None else []

    def refs(self, spec: RunSpec) -> list[tuple[str, Any]]:
        """(path, ref) of this slot's entries in a structured spec."""
        node: Any = spec
        for key in self.keys:
            node = getattr(node, key)
        if self.many:
            return [(f"{self.path}[{i}]", ref) for i, ref in enumerate(node)]
        return [(self.path, node)]


# Every component slot of a spec, in one table: both parsing phases, the resolved-spec
# writer and the checks read it.
SLOTS = (
    Slot("dataset", ("data",)),
    Slot("model", ("student", "model"), default={"name": "transformer"}),
    Slot("student_initializer", ("student", "init"), default={"name": "random"}),
    Slot("teacher_aggregator", ("aggregator",), default={"name": "mean"}),
    Slot("vocab_aligner", ("aligner",), default={"name": "identity"}),
    Slot("loss", ("losses",), many=True, default={"name": "ce"}),
    Slot("teacher_source", ("teachers",), many=True),
    Slot("run_callback", ("callbacks",), many=True),
)
