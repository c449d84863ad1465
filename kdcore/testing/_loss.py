"""A loss under test: built as a run builds it, called as the step calls it, on both of a
row loss's paths (fused with the output head, and on full logits)."""

from __future__ import annotations

from typing import Any

import attrs
import mlx.core as mx

from kdcore.engine.fused import FusedTerm, fused_pass
from kdcore.engine.terms import BuiltLoss
from kdcore.losses.inputs import LossInputs
from kdcore.losses.rows import as_list, rows_on_logits
from kdcore.models.output import ModelOutput
from kdcore.protocols import DeclaresRows
from kdcore.registry.manager import get_registry
from kdcore.registry.setup import Setup
from kdcore.spec.build import make_config


@attrs.frozen(eq=False)
class LossUnderTest:
    """A registered loss and its config. Calling it with :class:`kdcore.LossInputs` gives
    ``(value, metrics)`` as the step computes them: ``inputs.params`` is the config resolved
    at ``inputs.step`` (a scheduled float becomes a 0-d array) unless the inputs carry
    params already; a row loss runs on full logits. :meth:`fused` runs the same loss
    through the fused head path instead."""

    name: str
    config: Any
    loss: Any

    @property
    def declares_rows(self) -> bool:
        return isinstance(self.loss, DeclaresRows)

    def with_params(self, inputs: LossInputs) -> LossInputs:
        if inputs.params is not None:
            return inputs
        component = get_registry().get("loss", self.name)
        record = BuiltLoss(
            0, self.name, self.name, 1.0, self.config, component, self.loss, False, None
        )
        return attrs.evolve(inputs, params=record.params_at(inputs.step, inputs.total_steps))

    def rows(self, inputs: LossInputs):
        return self.loss.rows(self.with_params(inputs))

    def __call__(self, inputs: LossInputs) -> tuple[mx.array, dict]:
        inputs = self.with_params(inputs)
        declared = as_list(self.loss.rows(inputs)) if self.declares_rows else None
        if declared is None:
            return self.loss(inputs)
        return rows_on_logits(declared, inputs.student.logits, inputs.teacher, inputs.batch)

    def fused(self, inputs: LossInputs) -> tuple[mx.array, dict]:
        """``(value, metrics)`` through the fused pass the engine runs: the student's logits
        taken as hidden states under an identity head, so its gradient with respect to
        ``inputs.student.logits`` is the fused path's. Raises ``ValueError`` when the loss
        declares no rows for these inputs."""
        inputs = self.with_params(inputs)
        declared = as_list(self.loss.rows(inputs)) if self.declares_rows else None
        if declared is None:
            raise ValueError(f"{self.name} declares no rows for these inputs")
        logits = inputs.student.logits.astype(mx.float32)
        vocab = logits.shape[-1]
        eye = mx.eye(vocab, dtype=mx.float32)
        out = ModelOutput(
            final_hidden=logits, head=lambda h: h @ eye.T, head_weight=eye, vocab=vocab
        )
        terms = [
            FusedTerm(self.name, r, 1.0, inputs.batch["mask"] if r.mask is None else r.mask)
            for r in declared
        ]
        total, values = fused_pass(terms, out, inputs.teacher, inputs.batch, head_grad=False)
        metrics = {}
        for r, value in zip(declared, values):
            metrics.update(r.metrics)
            if r.name:
                metrics[r.name] = value
        return total, metrics


def build_loss(name: str, setup: Setup | None = None, **params: Any) -> LossUnderTest:
    """The registered loss ``name`` built from ``params`` (validated as a spec's), to call
    as the engine calls it.

    Example::

        loss = testing.build_loss("hinton", temperature=2.0)
        value, metrics = loss(kdcore.LossInputs(student=out, teacher=signal, batch=batch))
    """
    config = make_config("loss", name, **params)
    component = get_registry().get("loss", name)
    return LossUnderTest(name, config, component.factory(config, setup or Setup()))
