"""Built-in model architectures."""

from kdcore.components import Component
from kdcore.models.transformer import Transformer, TransformerConfig
from kdcore.plugins import hookimpl


@hookimpl
def kd_models():
    return [
        Component(
            "transformer",
            lambda config, setup: Transformer(config),
            TransformerConfig,
            doc="decoder-only transformer (RMSNorm, RoPE, GQA, SwiGLU)",
        )
    ]
