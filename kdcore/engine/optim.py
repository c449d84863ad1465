"""Optimizers by name, with regex parameter groups.

Each trainable parameter falls into the first group whose ``pattern`` it matches
(``re.search`` on its dotted path, e.g. ``student.blocks.0.mlp.up_proj.weight``), else the
default group. A group's learning rate is the base rate times ``lr_mult``; ``lr_mult = 0``
freezes it (no gradient is computed). Parameters whose path matches a ``no_decay`` pattern
get no weight decay.

``adam`` and ``adamw`` are mlx's, with each float32 parameter's update handed to the native
``"adam"`` kernel they are built with (the engine passes the run's: hook ``kd_row_kernels``,
``kdcore.kernels.native.native_kernel("adam")``; kd-kernels has it): on a
Linux CPU mlx's update is ten scalar element-wise passes on one core (its share of a step:
the real-vocabulary breakdown in docs/performance.md), where the kernel makes one vectorised
pass, in place. The kernel gets eight float32 scalars rounded as
mlx rounds them: AdamW's decay ``1 - lr * weight_decay`` (1 for Adam), ``b1``, ``1 - b1``,
``b2``, ``1 - b2``, ``eps``, then ``lr`` and 1, or with bias correction ``c1 = lr / (1 -
b1**step)`` and ``c2 = rsqrt(1 - b2**step)``; the result equals mlx's bit for bit
(tests/test_engine.py). Other dtypes, no kernel (``KD_KERNELS=pure`` gives none) and other
devices run mlx's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from kdcore.errors import SpecError

# step(gradient, parameter, m, v, scalars, bias_correction) -> (parameter, m, v)
AdamStep = Callable[..., tuple[mx.array, mx.array, mx.array]]


def _scalars(opt: Adam | AdamW, weight_decay: float) -> mx.array:
    """The kernel's eight scalars for this step, made once per step and optimizer: every
    parameter's update takes the same (mlx's update makes them per parameter: a dozen
    small ops each)."""
    key = (weight_decay, *opt.betas, opt.eps, bool(opt.bias_correction))
    step, lr = opt.step, opt.learning_rate  # new arrays each step (and each schedule value)
    cached = opt._kernel_scalars
    if cached is not None and cached[0] is step and cached[1] is lr and cached[2] == key:
        return cached[3]
    lr32 = lr.astype(mx.float32)
    decay = (1 - lr32 * weight_decay).astype(mx.float32)  # AdamW's factor, as mlx rounds it
    b1, b2 = opt.betas
    if opt.bias_correction:
        first = (lr32 / (1 - b1**step)).astype(mx.float32)
        second = mx.rsqrt(1 - b2**step).astype(mx.float32)
    else:
        first, second = lr32, mx.array(1.0, mx.float32)
    constants = mx.array([b1, 1 - b1, b2, 1 - b2, opt.eps], mx.float32)
    scalars = mx.concatenate([decay.reshape(1), constants, first.reshape(1), second.reshape(1)])
    opt._kernel_scalars = (step, lr, key, scalars)
    return scalars


def _native_step(
    opt: Adam | AdamW, gradient: mx.array, parameter: mx.array, state: dict, weight_decay: float
) -> mx.array | None:
    """The native kernel's new parameter (``state`` takes the new moments), or None where
    mlx's update runs. ``weight_decay`` 0 is Adam (a decay of exactly 1)."""
    step = opt.kernel
    # the kernel is a CPU primitive: on another default device mlx's update runs
    if step is None or mx.default_device().type != mx.cpu:
        return None
    m, v = state["m"], state["v"]
    if any(x.dtype != mx.float32 for x in (gradient, parameter, m, v)):
        return None
    scalars = _scalars(opt, weight_decay)
    parameter, state["m"], state["v"] = step(
        gradient, parameter, m, v, scalars, bool(opt.bias_correction)
    )
    return parameter


class Adam(optim.Adam):
    """mlx's Adam; float32 updates in one native pass when built with a ``kernel``."""

    def __init__(self, *args: Any, kernel: AdamStep | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kernel = kernel
        self._kernel_scalars = None  # (step, learning rate, constants, scalars): _scalars

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        out = _native_step(self, gradient, parameter, state, 0.0)
        return super().apply_single(gradient, parameter, state) if out is None else out


class AdamW(optim.AdamW):
    """mlx's AdamW; float32 updates in one native pass when built with a ``kernel``."""

    def __init__(self, *args: Any, kernel: AdamStep | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kernel = kernel
        self._kernel_scalars = None  # (step, learning rate, constants, scalars): _scalars

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        out = _native_step(self, gradient, parameter, state, self.weight_decay)
        return super().apply_single(gradient, parameter, state) if out is None else out


OPTIMIZERS = {
    "adamw": AdamW,
    "adam": Adam,
    "sgd": optim.SGD,
    "lion": optim.Lion,
    "adafactor": optim.Adafactor,
    "rmsprop": optim.RMSprop,
    "adagrad": optim.Adagrad,
}
_DECAYING = {"adamw", "sgd", "lion"}


@attrs.frozen
class GroupPlan:
    """Which optimizer slot each parameter path uses, and each slot's lr multiplier."""

    slot_of: dict[str, int]
    lr_mults: list[float]
    decays: list[float]
    frozen: list[str]
    counts: list[int]


def plan_groups(module: nn.Module, groups, no_decay: list[str], weight_decay: float) -> GroupPlan:
    patterns = []
    for i, group in enumerate(groups):
        try:
            patterns.append(re.compile(group.pattern))
        except re.error as exc:
            raise SpecError(
                f"bad regex {group.pattern!r}: {exc} @ $.train.param_groups[{i}]"
            ) from None
    no_decay_res = [re.compile(p) for p in no_decay]
    slots: dict[tuple[float, float], int] = {}
    slot_of, frozen, lr_mults, decays, counts = {}, [], [], [], []
    for path, value in tree_flatten(module.parameters()):
        mult, decay = 1.0, weight_decay
        for group, pattern in zip(groups, patterns):
            if pattern.search(path):
                mult = group.lr_mult
                if group.weight_decay is not None:
                    decay = group.weight_decay
                break
        if mult == 0:
            frozen.append(path)
            continue
        if any(r.search(path) for r in no_decay_res) or value.ndim < 2:
            decay = 0.0
        key = (mult, decay)
        if key not in slots:
            slots[key] = len(lr_mults)
            lr_mults.append(mult)
            decays.append(decay)
            counts.append(0)
        slot_of[path] = slots[key]
        counts[slots[key]] += value.size
    return GroupPlan(slot_of, lr_mults, decays, frozen, counts)


def freeze_paths(module: nn.Module, paths: list[str]) -> None:
    """Freeze parameters by their dotted paths."""
    for path in paths:
        *parents, leaf = path.split(".")
        node = module
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else getattr(node, part)
        node.freeze(recurse=False, keys=[leaf])


def build_optimizer(
    section, plan: GroupPlan, lr: float, adam: AdamStep | None = None
) -> optim.Optimizer:
    """The spec's optimizer, one member per parameter group; ``adam`` is the native Adam
    step that ``adam`` and ``adamw`` hand their float32 updates to (None: mlx's update)."""
    name = section.name.lower()
    if name not in OPTIMIZERS:
        raise SpecError(
            f"unknown optimizer {section.name!r} (known: {', '.join(OPTIMIZERS)}) "
            "@ $.train.optimizer.name"
        )
    cls = OPTIMIZERS[name]
    members = []
    for mult, decay in zip(plan.lr_mults or [1.0], plan.decays or [0.0]):
        kwargs = dict(section.params)
        if name in _DECAYING:
            kwargs["weight_decay"] = decay
        if cls in (Adam, AdamW):
            kwargs["kernel"] = adam
        try:
            members.append(cls(learning_rate=lr * mult, **kwargs))
        except TypeError as exc:
            raise SpecError(f"optimizer {name}: {exc} @ $.train.optimizer.params") from None
    if len(members) == 1:
        return members[0]
    filters = [
        (lambda slot: lambda path, _value: plan.slot_of.get(path) == slot)(i)
        for i in range(len(members) - 1)
    ]
    return optim.MultiOptimizer(members, filters)


def set_learning_rate(optimizer: optim.Optimizer, plan: GroupPlan, lr: float) -> None:
    members = optimizer.optimizers if isinstance(optimizer, optim.MultiOptimizer) else [optimizer]
    for member, mult in zip(members, plan.lr_mults or [1.0]):
        member.learning_rate = lr * mult
