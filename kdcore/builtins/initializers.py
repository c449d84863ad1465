"""Built-in student initializers: ``random``, ``from-teacher``, ``lora`` and ``quantize``."""

from kdcore.models.init import FromTeacherConfig, RandomConfig, from_teacher, random_init
from kdcore.models.lora import LoraConfig, lora_init
from kdcore.models.quantize import QuantizeConfig, quantize_init
from kdcore.registry.components import Component
from kdcore.registry.manager import hookimpl


@hookimpl
def kd_student_initializers():
    return [
        Component("random", random_init, RandomConfig, doc="the model's own random init"),
        Component(
            "from-teacher",
            from_teacher,
            FromTeacherConfig,
            doc="copy teacher tensors through a layer map (truncate/interpolate mismatches)",
        ),
        Component(
            "lora",
            lora_init,
            LoraConfig,
            doc="mlx-lm LoRA/DoRA layers; only the adapters train; saves adapters.safetensors",
        ),
        Component(
            "quantize",
            quantize_init,
            QuantizeConfig,
            doc="MLX quantized layers (the RTN model); only scales/biases train, as in DWQ",
        ),
    ]
