"""Teacher sources: a saved model directory (``model``); plugins add others (``cache``, ``ema``).

A teacher object has ``tokenizer`` (or None), ``model`` (or None), ``num_parameters`` and
``signal(batch, capture, student=None) -> TeacherSignal``. Teachers are frozen: their
signals are wrapped in ``stop_gradient``.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import mlx.core as mx

from kdcore.errors import SpecError
from kdcore.models.io import count_parameters, load_model
from kdcore.signal.teacher import TeacherSignal
from kdcore.tokenizers.simple import load_tokenizer


@attrs.define
class ModelSourceConfig:
    pass


class ModelTeacher:
    """A frozen model loaded from ``path`` (config.json, model.safetensors, tokenizer.json)."""

    def __init__(self, config: ModelSourceConfig, setup):
        ref = setup.teacher
        if ref is None or not ref.path:
            raise SpecError('a teacher needs path = "MODEL_DIR" or cache = "CACHE_DIR"')
        self.path = Path(setup.resolve(ref.path))
        self.model, self.architecture, self.config = load_model(self.path)
        self.model.freeze()
        self.model.eval()
        self.tokenizer = load_tokenizer(self.path)
        self.num_parameters = count_parameters(self.model)

    def signal(self, batch: dict, capture: frozenset = frozenset(), student=None) -> TeacherSignal:
        out = self.model(batch["input_ids"], capture=capture)
        sg = mx.stop_gradient
        return TeacherSignal(
            vocab_size=out.logits.shape[-1],
            logits=sg(out.logits),
            hidden_states=tuple(sg(h) for h in out.hidden_states) if out.hidden_states else None,
            attentions=tuple(sg(a) for a in out.attentions) if out.attentions else None,
        )
