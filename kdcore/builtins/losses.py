"""Built-in losses."""

from kdcore.components import Component
from kdcore.losses import CrossEntropyConfig, cross_entropy
from kdcore.plugins import hookimpl


@hookimpl
def kd_losses():
    return [
        Component(
            "ce",
            cross_entropy,
            CrossEntropyConfig,
            properties={"shift_invariant"},
            doc="cross-entropy on the hard labels, masked mean over tokens",
        )
    ]
