"""A hidden-state hint that needs no projection: compare how each model relates tokens.

For the last hidden layer of student (width Ds) and teacher (width Dt), each token's
row of cosine similarities to the other tokens of its sequence is an [L] vector whatever
the width. The loss is the masked mean over tokens of 1 - cos(row_student, row_teacher).
"""

import attrs
import mlx.core as mx

import kdcore


@attrs.define
class CosineHintConfig:
    layer: int = -1  # which hidden state (embeddings are 0)


EPS = 1e-12


def _norm(x: mx.array, keepdims: bool = False) -> mx.array:
    """Euclidean norm over the last axis with ``EPS`` inside the square root: the gradient
    of a plain norm is 0/0 at an all-zero row (a row whose tokens are all masked)."""
    return mx.sqrt((x * x).sum(-1, keepdims=keepdims) + EPS)


def _similarity_rows(hidden: mx.array, mask: mx.array) -> mx.array:
    h = hidden.astype(mx.float32)
    h = h / _norm(h, keepdims=True)
    rows = h @ h.transpose(0, 2, 1)  # [B, L, L]
    return rows * mask[:, None, :]  # masked tokens take no part


def cosine_hint(config: CosineHintConfig, setup):
    def loss(inputs: kdcore.LossInputs):
        mask = inputs.batch["mask"]
        s = _similarity_rows(inputs.student.hidden_states[config.layer], mask)
        t = _similarity_rows(inputs.teacher.hidden_states[config.layer], mask)
        cosine = (s * t).sum(-1) / (_norm(s) * _norm(t))
        return kdcore.masked_mean(1.0 - cosine, mask), {}

    return loss


@kdcore.hookimpl
def kd_losses():
    return [
        kdcore.Component(
            "cosine_hint",
            cosine_hint,
            CosineHintConfig,
            requires={"teacher", "hidden_states"},
            properties={"zero_at_identity"},
            doc="1 - cosine between student and teacher token-similarity rows",
        )
    ]
