"""Self-distillation teacher: an exponential moving average of the student.

After every optimiser step ``theta_ema <- d * theta_ema + (1 - d) * theta_student`` with the
decay ``d`` (schedulable). The average starts as a copy of the student the first time it is
needed (the engine builds teachers before the student exists), is frozen, and is saved in
every checkpoint through ``state_arrays`` / ``load_state_arrays`` so a resumed run continues
with the same teacher.
"""

from __future__ import annotations

import copy

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from kdcore import TeacherSignal, validators, value_at
from kdcore.app import count_parameters


@attrs.define
class EmaConfig:
    """``decay`` d in [0, 1] (schedulable): 0 copies the student every step, 1 never moves."""

    decay: float = attrs.field(default=0.99, validator=validators.unit_interval)


class EmaTeacher:
    """A teacher source whose model is the moving average of the student's parameters."""

    tokenizer = None  # the student's own vocabulary

    def __init__(self, config: EmaConfig, setup=None):
        self.config = config
        self.model: nn.Module | None = None
        self.updates = 0
        self._pending: dict[str, mx.array] | None = None

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model) if self.model is not None else 0

    def _ensure(self, student: nn.Module) -> nn.Module:
        if self.model is None:
            if student is None:
                raise ValueError("the ema teacher needs the student to start from")
            model = copy.deepcopy(student)
            model.freeze()
            model.eval()
            self.model = model
            if self._pending is not None:
                self.load_state_arrays(self._pending)
        return self.model

    def signal(self, batch: dict, capture: frozenset = frozenset(), student=None) -> TeacherSignal:
        model = self._ensure(student)
        out = model(batch["input_ids"], capture=capture)
        sg = mx.stop_gradient
        return TeacherSignal(
            vocab_size=out.logits.shape[-1],
            logits=sg(out.logits),
            hidden_states=tuple(sg(h) for h in out.hidden_states) if out.hidden_states else None,
            attentions=tuple(sg(a) for a in out.attentions) if out.attentions else None,
        )

    def after_step(self, student: nn.Module, step: int, total_steps: int) -> None:
        model = self._ensure(student)
        d = value_at(self.config.decay, step, total_steps)
        averaged = tree_map(
            lambda e, s: d * e + (1.0 - d) * mx.stop_gradient(s),
            model.parameters(),
            student.parameters(),
        )
        model.update(averaged)
        mx.eval(model.parameters())
        self.updates += 1

    def state_arrays(self) -> dict[str, mx.array]:
        if self.model is None:
            return dict(self._pending or {})
        state = {f"param.{k}": v for k, v in tree_flatten(self.model.parameters())}
        state["updates"] = mx.array(self.updates, dtype=mx.int64)
        return state

    def load_state_arrays(self, arrays: dict[str, mx.array]) -> None:
        if not arrays:
            return
        if self.model is None:  # applied when the model is first built
            self._pending = dict(arrays)
            return
        params = [(k[len("param.") :], v) for k, v in arrays.items() if k.startswith("param.")]
        self.model.load_weights(params, strict=True)
        mx.eval(self.model.parameters())
        if "updates" in arrays:
            self.updates = int(arrays["updates"].item())
        self._pending = None
