"""Reverse KL, DistiLLM's skew KLs, the generalised JSD and total variation, on the chunked
kernels of kdcore.

With ``q = softmax(s / T)`` (student) and ``p = softmax(t / T)`` (teacher), per token, summed
over the vocabulary, masked mean over tokens (times ``T^2`` when ``t_squared``):

- ``reverse_kl``: ``KL(q || p)`` (the single-step term of MiniLLM, Gu et al. 2024);
- ``skew_kl``: ``KL(p || alpha p + (1 - alpha) q)`` (DistiLLM SKL, Ko et al. 2024);
- ``skew_reverse_kl``: ``KL(q || alpha q + (1 - alpha) p)`` (DistiLLM SRKL);
- ``tvd``: ``1/2 sum_v |p_v - q_v|`` (total variation, as in DistiLLM and Liger-Kernel);
- ``gjsd``: ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``
  (GKD, Agarwal et al. 2024, TRL's convention): ``beta = 0`` is forward KL, ``beta = 1``
  reverse KL. Those endpoints are special-cased, as in TRL: the mixture formula itself
  tends to 0 there (about ``beta KL(p || q)`` just above 0), so the loss jumps at
  ``beta = 0`` and ``beta = 1`` (``kd explain gjsd``).

From a top-k teacher cache they use ``testing.TAIL_POLICIES``; the default ``tail-bucket``
compares the two distributions on the top-k tokens plus one class for the rest, a lower
bound of the full divergence (see ``kdcore.token_divergence``).
"""

from __future__ import annotations

from typing import Literal

import attrs

import kdcore
from kdcore import validators

Tail = Literal["renormalize", "tail-bucket"]
_PROPERTIES = {"zero_at_identity", "shift_invariant", "sparse_ok"}


@attrs.define
class ReverseKLConfig:
    temperature: float = attrs.field(default=1.0, validator=validators.positive)
    t_squared: bool = False
    tail: Tail = "tail-bucket"


@attrs.define
class SkewKLConfig:
    """``alpha``: the teacher's (``skew_kl``) or student's (``skew_reverse_kl``) share of the
    mixture; DistiLLM's default is 0.1."""

    alpha: float = attrs.field(default=0.1, validator=validators.unit_interval)
    temperature: float = attrs.field(default=1.0, validator=validators.positive)
    t_squared: bool = False
    tail: Tail = "tail-bucket"


@attrs.define
class GJSDConfig:
    """``beta`` in [0, 1] (schedulable); TRL's GKD default is 0.5."""

    beta: float = attrs.field(default=0.5, validator=validators.unit_interval)
    temperature: float = attrs.field(default=1.0, validator=validators.positive)
    t_squared: bool = False
    tail: Tail = "tail-bucket"


# Shown by ``kd explain NAME`` after the one-line doc.
_DETAILS = {
    "gjsd": (
        "GJSD_beta = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.\n"
        "The endpoints are special-cased as in TRL's GKDTrainer: beta = 0 is forward\n"
        "KL(p || q) and beta = 1 is reverse KL(q || p). The mixture formula itself tends to 0\n"
        "there (m becomes q, or p): just above beta = 0 the loss is about beta KL(p || q), just\n"
        "below beta = 1 about (1 - beta) KL(q || p). So the loss jumps at beta = 0 and at\n"
        "beta = 1, from nearly 0 to the full KL: a beta schedule that reaches an endpoint\n"
        "changes the objective abruptly there. For a KL, use forward_kl or reverse_kl; for\n"
        "a smooth schedule, keep beta inside (0, 1)."
    ),
}


def divergence_loss(kind: str):
    """A loss factory for one of ``kdcore.DIVERGENCES``."""

    def factory(config, setup=None):
        def rows(inputs: kdcore.LossInputs):
            params = inputs.params
            temperature = float(params.temperature)
            return kdcore.teacher_rows(
                inputs.teacher,
                kind,
                temperature=temperature,
                beta=getattr(params, "beta", 0.5),
                alpha=getattr(params, "alpha", 0.1),
                tail=params.tail,
                weight=temperature * temperature if params.t_squared else 1.0,
            )

        return kdcore.RowLoss(rows)

    factory.__name__ = kind
    factory.__doc__ = f"Loss: masked mean of the {kind} divergence (kdcore.token_divergence)."
    if kind in _DETAILS:
        factory.__doc__ += "\n" + _DETAILS[kind]
    return factory


def components() -> list[kdcore.Component]:
    return [
        kdcore.Component(
            "reverse_kl",
            divergence_loss("reverse_kl"),
            ReverseKLConfig,
            requires={"teacher"},
            properties=_PROPERTIES,
            doc="KL(student || teacher) per token (mode-seeking)",
        ),
        kdcore.Component(
            "skew_kl",
            divergence_loss("skew_kl"),
            SkewKLConfig,
            requires={"teacher"},
            properties=_PROPERTIES,
            doc="DistiLLM skew KL: KL(p || alpha p + (1 - alpha) q)",
        ),
        kdcore.Component(
            "skew_reverse_kl",
            divergence_loss("skew_reverse_kl"),
            SkewKLConfig,
            requires={"teacher"},
            properties=_PROPERTIES,
            doc="DistiLLM skew reverse KL: KL(q || alpha q + (1 - alpha) p)",
        ),
        kdcore.Component(
            "gjsd",
            divergence_loss("gjsd"),
            GJSDConfig,
            requires={"teacher"},
            properties=_PROPERTIES,
            doc="generalised JSD with beta (0: forward KL, 1: reverse KL), as in GKD",
        ),
        kdcore.Component(
            "tvd",
            divergence_loss("tvd"),
            ReverseKLConfig,
            requires={"teacher"},
            properties=_PROPERTIES,
            doc="total variation distance 1/2 sum |p - q| per token (bounded by 1)",
        ),
    ]
