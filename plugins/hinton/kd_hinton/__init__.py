"""kdcore plugin kd-hinton: soft-target distillation, its selective variant, and an EMA teacher."""

import kdcore
from kd_hinton.ema import EmaConfig, EmaTeacher
from kd_hinton.losses import HintonConfig, SelectiveConfig, hinton, selective

__all__ = ["EmaConfig", "EmaTeacher", "HintonConfig", "SelectiveConfig", "hinton", "selective"]

_PROPERTIES = {"zero_at_identity", "shift_invariant", "sparse_ok"}


@kdcore.hookimpl
def kd_losses():
    return [
        kdcore.Component(
            "hinton",
            hinton,
            HintonConfig,
            requires={"teacher"},
            properties=_PROPERTIES,
            doc="T^2 KL(teacher || student) at temperature T, optional top-k teacher",
        ),
        kdcore.Component(
            "selective",
            selective,
            SelectiveConfig,
            requires={"teacher"},
            properties=_PROPERTIES,
            doc="top-k KL only at positions where the teacher's entropy exceeds a threshold",
        ),
    ]


@kdcore.hookimpl
def kd_teacher_sources():
    return [
        kdcore.Component(
            "ema",
            EmaTeacher,
            EmaConfig,
            doc="exponential moving average of the student (self-distillation)",
        )
    ]
