"""Built-in losses: ``ce`` and ULD's ``uld`` (the divergence family comes from plugins)."""

from kdcore.align.uld import UldLossConfig, uld_loss
from kdcore.losses.cross_entropy import CrossEntropyConfig, cross_entropy
from kdcore.registry.components import Component
from kdcore.registry.manager import hookimpl


@hookimpl
def kd_losses():
    return [
        Component(
            "ce",
            cross_entropy,
            CrossEntropyConfig,
            properties={"shift_invariant"},
            doc="cross-entropy on the hard labels, masked mean over tokens",
        ),
        Component(
            "uld",
            uld_loss,
            UldLossConfig,
            requires={"teacher"},
            properties={"zero_at_identity", "shift_invariant", "sparse_ok"},
            doc="Universal Logit Distillation: L1 between sorted probabilities, any vocabularies",
        ),
    ]
