"""Optimizers by name, with regex parameter groups.

Each trainable parameter falls into the first group whose ``pattern`` it matches
(``re.search`` on its dotted path, e.g. ``student.blocks.0.mlp.up_proj.weight``), else the
default group. A group's learning rate is the base rate times ``lr_mult``; ``lr_mult = 0``
freezes it (no gradient is computed). Parameters whose path matches a ``no_decay`` pattern
get no weight decay.
"""

from __future__ import annotations

import re

import attrs
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from kdcore.errors import SpecError

OPTIMIZERS = {
    "adamw": optim.AdamW,
    "adam": optim.Adam,
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


def build_optimizer(section, plan: GroupPlan, lr: float) -> optim.Optimizer:
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
