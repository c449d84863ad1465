"""Real models and real scale: mlx-lm models and teachers, LoRA students, and the
cross-tokenizer aligners (``token-map``, ``uld``) with ULD's loss.

The mlx-lm parts need the optional extra ``kdcore[mlx-lm]``; they are registered always
(``kd components`` lists them) and say so when it is missing.
"""

from kdcore.components import Component
from kdcore.lora import LoraConfig, lora_init
from kdcore.mlxlm import MlxLmModelConfig, MlxLmTeacher, MlxLmTeacherConfig, mlxlm_model
from kdcore.plugins import hookimpl
from kdcore.vocab import (
    TokenMap,
    TokenMapConfig,
    UldAligner,
    UldAlignerConfig,
    UldLossConfig,
    uld_loss,
)


@hookimpl
def kd_models():
    return [
        Component(
            "mlx-lm",
            mlxlm_model,
            MlxLmModelConfig,
            doc="an mlx-lm model: a local directory (path) or a fresh config (extra: mlx-lm)",
        )
    ]


@hookimpl
def kd_teacher_sources():
    return [
        Component(
            "mlx-lm",
            MlxLmTeacher,
            MlxLmTeacherConfig,
            doc="a local mlx-lm model directory (path); retokenizes when its tokenizer differs",
        )
    ]


@hookimpl
def kd_student_initializers():
    return [
        Component(
            "lora",
            lora_init,
            LoraConfig,
            doc="mlx-lm LoRA/DoRA layers; only the adapters train; saves adapters.safetensors",
        )
    ]


@hookimpl
def kd_vocab_aligners():
    return [
        Component(
            "token-map",
            TokenMap,
            TokenMapConfig,
            doc="teacher tokens onto student tokens with the same bytes (exact or prefix)",
        ),
        Component(
            "uld",
            UldAligner,
            UldAlignerConfig,
            doc="teacher probabilities sorted (rank space, any vocabulary); use with loss 'uld'",
        ),
    ]


@hookimpl
def kd_losses():
    return [
        Component(
            "uld",
            uld_loss,
            UldLossConfig,
            requires={"teacher"},
            properties={"zero_at_identity", "shift_invariant", "sparse_ok"},
            doc="Universal Logit Distillation: L1 between sorted probabilities, any vocabularies",
        )
    ]
