"""Built-in vocabulary aligners: ``identity`` (verified), ``truncate``, ``token-map``, ``uld``."""

from kdcore.align.basic import Identity, IdentityConfig, Truncate, TruncateConfig
from kdcore.align.token_map import TokenMap, TokenMapConfig
from kdcore.align.uld import UldAligner, UldAlignerConfig
from kdcore.registry.components import Component
from kdcore.registry.manager import hookimpl


@hookimpl
def kd_vocab_aligners():
    return [
        Component("identity", Identity, IdentityConfig, doc="same vocabulary, verified"),
        Component(
            "truncate", Truncate, TruncateConfig, doc="student vocab is a prefix of the teacher's"
        ),
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
