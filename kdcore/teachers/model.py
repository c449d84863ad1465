"""Teacher sources: a saved model directory (``model``); plugins add others (``cache``, ``ema``).

A teacher object has ``tokenizer`` (or None), ``model`` (or None), ``num_parameters`` and
``signal(batch, capture, student=None) -> TeacherSignal``. Teachers are frozen: their
signals are wrapped in ``stop_gradient``.
"""

from __future__ import annotations

from typing import Literal

import attrs

from kdcore.errors import SpecError
from kdcore.models.io import count_parameters, load_model
from kdcore.models.mlxlm import locate_model
from kdcore.signal.teacher import TeacherSignal, output_signal
from kdcore.tokenizers.simple import load_tokenizer


@attrs.define
class ModelSourceConfig:
    # None: the dtype policy (kdcore.models.dtype: float32 on a CPU, as stored on a GPU)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None


class ModelTeacher:
    """A frozen model loaded from ``path`` (config.json, model.safetensors, tokenizer.json)."""

    def __init__(self, config: ModelSourceConfig, setup):
        ref = setup.teacher
        if ref is None or not ref.path:
            raise SpecError('a teacher needs path = "MODEL_DIR" or cache = "CACHE_DIR"')
        teachers = getattr(setup.spec, "teachers", None) or [ref]
        index = next((i for i, t in enumerate(teachers) if t is ref), 0)
        self.path = locate_model(ref.path, setup.base_dir, f"$.teachers[{index}].path")
        where = f"$.teachers[{index}].params.dtype"
        self.model, self.architecture, self.config = load_model(self.path, config.dtype, where)
        self.dtype_choice = self.model.dtype_choice
        self.model.freeze()
        self.model.eval()
        self.tokenizer = load_tokenizer(self.path)
        self.num_parameters = count_parameters(self.model)

    def signal(self, batch: dict, capture: frozenset = frozenset(), student=None) -> TeacherSignal:
        return output_signal(self.model(batch["input_ids"], capture=capture))
