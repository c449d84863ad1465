"""kdcore plugin kd-bild: BiLD (top-k logit differences) and a bidirectional KL."""

import kdcore
from kd_bild.losses import (
    BidirectionalConfig,
    BildConfig,
    bidirectional_kl,
    bild,
    bild_divergence,
    plain_bild,
)

__all__ = [
    "BidirectionalConfig",
    "BildConfig",
    "bidirectional_kl",
    "bild",
    "bild_divergence",
    "plain_bild",
]

_PROPERTIES = {"zero_at_identity", "shift_invariant", "sparse_ok"}


@kdcore.hookimpl
def kd_losses():
    return [
        kdcore.Component(
            "bild",
            bild,
            BildConfig,
            requires={"teacher"},
            properties=_PROPERTIES,
            doc="BiLD: KL over top-k logit differences, teacher-led + student-led (Li et al. 2024)",
        ),
        kdcore.Component(
            "bidirectional_kl",
            bidirectional_kl,
            BidirectionalConfig,
            requires={"teacher"},
            properties=_PROPERTIES,
            doc="T^2 (w_f KL(p||q) + w_r KL(q||p)); not BiLD",
        ),
    ]
