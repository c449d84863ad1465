"""The ``mlx-lm`` teacher source: a frozen mlx-lm model, retokenizing the batch when its
tokenizer is not the run's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import attrs
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from kdcore.align.retokenize import Retokenizer
from kdcore.errors import SpecError
from kdcore.models.mlxlm import MlxLmModel, load_mlxlm, locate_model, shape_of
from kdcore.signal.aligned import AlignedSignal, gather_positions
from kdcore.signal.teacher import TeacherSignal, output_signal
from kdcore.tokenizers.hf import load_hf_tokenizer


@attrs.define
class MlxLmTeacherConfig:
    retokenize: bool | None = None  # None: when the teacher's tokenizer is not the run's
    alignment: Literal["offsets", "position"] = "offsets"
    # None: the dtype policy (kdcore.models.dtype: float32 on a CPU, as stored on a GPU)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None


def run_tokenizer(setup) -> Any:
    """The tokenizer the run's dataset will use (teachers are built before the dataset)."""
    from kdcore.data.datasets import resolve_tokenizer

    dataset = setup.extras.get("dataset") if setup is not None else None
    if dataset is not None:
        return dataset.tokenizer
    spec = getattr(setup, "spec", None)
    if spec is None:
        return None
    name = getattr(spec.data.config, "tokenizer", None)
    if isinstance(name, str) and name != "char":
        return resolve_tokenizer(name, Path(spec.base_dir))
    from kdcore.data.build import build_dataset

    return build_dataset(spec, setup).tokenizer


class MlxLmTeacher:
    """A frozen mlx-lm teacher from ``path``.

    When its tokenizer is not the run's (``retokenize`` unset), every batch is decoded to
    text, re-encoded with the teacher's tokenizer, and the teacher's outputs are read at
    the aligned positions (:class:`kdcore.align.retokenize.Retokenizer`); the signal then carries a
    ``position_mask`` and is still in the teacher's vocabulary (an aligner maps it).
    ``model`` is None for such a teacher, since its ids are not the run's.
    """

    def __init__(self, config: MlxLmTeacherConfig, setup):
        ref = setup.teacher
        if ref is None or not ref.path:
            raise SpecError('the mlx-lm teacher source needs path = "MODEL_DIR" @ $.teachers')
        teachers = getattr(setup.spec, "teachers", None) or [ref]
        index = next((i for i, t in enumerate(teachers) if t is ref), 0)
        self.path = locate_model(ref.path, setup.base_dir, f"$.teachers[{index}].path")
        lm, raw = load_mlxlm(self.path, config.dtype, f"$.teachers[{index}].params.dtype")
        self.dtype_choice = lm.dtype_choice
        self.adapter = MlxLmModel(lm, raw, self.path)
        self.adapter.freeze()
        self.adapter.eval()
        self.config = shape_of(raw)
        self.tokenizer = load_hf_tokenizer(self.path)
        self.num_parameters = sum(v.size for _, v in tree_flatten(self.adapter.parameters()))
        retokenize = config.retokenize
        data_tok = None
        if retokenize is None or retokenize:
            data_tok = run_tokenizer(setup)
        if retokenize is None:
            from kdcore.tokenizers.simple import fingerprint

            retokenize = (
                self.tokenizer is not None
                and data_tok is not None
                and fingerprint(self.tokenizer) != fingerprint(data_tok)
            )
        self.retokenizer = None
        if retokenize:
            if self.tokenizer is None or data_tok is None:
                raise SpecError(
                    f"retokenizing needs the teacher's tokenizer.json in {self.path} and the "
                    "run's tokenizer @ $.teachers"
                )
            self.retokenizer = Retokenizer(data_tok, self.tokenizer, config.alignment)
        self.model = None if retokenize else self.adapter

    def signal(self, batch: dict, capture: frozenset = frozenset(), student=None) -> TeacherSignal:
        sg = mx.stop_gradient
        if self.retokenizer is None:
            return output_signal(self.adapter(batch["input_ids"], capture=capture))
        if "attentions" in capture:
            raise SpecError(
                "attention maps of a teacher with another tokenizer do not line up with the "
                "student's tokens @ $.teachers"
            )
        t_ids, index, mask = self.retokenizer(np.array(batch["input_ids"]))
        out = self.adapter(mx.array(t_ids), capture=capture)
        index = mx.array(index)
        hidden = None
        if out.hidden_states:
            hidden = tuple(sg(gather_positions(h, index)) for h in out.hidden_states)
        if out.final_hidden is not None and not out.has_logits:
            head = out.head
            return AlignedSignal(
                vocab_size=out.vocab_size,
                final_hidden=sg(gather_positions(out.final_hidden, index)),
                head=lambda x: sg(head(x)),
                hidden_states=hidden,
                position_mask=mx.array(mask),
            )
        return AlignedSignal(
            vocab_size=out.logits.shape[-1],
            logits=sg(gather_positions(out.logits, index)),
            hidden_states=hidden,
            position_mask=mx.array(mask),
        )
