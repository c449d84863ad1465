"""Teacher sources: a saved model directory (``model``); plugins add others (``cache``, ``ema``).

A teacher object has ``tokenizer`` (or None), ``model`` (or None), ``num_parameters`` and
``signal(batch, capture, student=None) -> TeacherSignal``. Teachers are frozen: their
signals are wrapped in ``stop_gradient``.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from kdcore.errors import SpecError
from kdcore.models.io import count_parameters, load_model
from kdcore.signal.teacher import TeacherSignal, output_signal
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
        return output_signal(self.model(batch["input_ids"], capture=capture))
