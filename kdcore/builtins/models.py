"""Built-in model architectures: the small ``transformer`` and any ``mlx-lm`` model."""

from kdcore.models.mlxlm import MlxLmModelConfig, mlxlm_model
from kdcore.models.transformer import Transformer, TransformerConfig
from kdcore.registry.components import Component
from kdcore.registry.manager import hookimpl


@hookimpl
def kd_models():
    return [
        Component(
            "transformer",
            lambda config, setup: Transformer(config),
            TransformerConfig,
            doc="decoder-only transformer (RMSNorm, RoPE, GQA, SwiGLU)",
        ),
        Component(
            "mlx-lm",
            mlxlm_model,
            MlxLmModelConfig,
            doc="an mlx-lm model: a local directory (path) or a fresh config (extra: mlx-lm)",
        ),
    ]
