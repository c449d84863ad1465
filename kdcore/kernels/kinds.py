"""What the kernels compute: the divergence kinds and their parameters.

The lowest module of ``kdcore.kernels``: the native dispatch (:mod:`kdcore.kernels.native`)
names its kernels after these kinds and the divergence maths
(:mod:`kdcore.kernels.divergence`) builds on that dispatch, so the kinds sit below both.
"""

from __future__ import annotations

import mlx.core as mx

KINDS = ("forward_kl", "reverse_kl", "gjsd", "skew_kl", "skew_reverse_kl", "tvd")


def canonical(kind: str, beta: float | mx.array = 0.5, alpha: float | mx.array = 0.1):
    """``(kind, coefficient)`` with the endpoints mapped to plain KLs.

    ``gjsd`` with ``beta`` 0 or 1 becomes ``forward_kl`` / ``reverse_kl``; the skew KLs with
    ``alpha = 0`` become the plain KL of the same direction.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown divergence {kind!r}; known: {', '.join(KINDS)}")
    if kind == "gjsd":
        b = float(beta)
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"gjsd: beta must be in [0, 1], got {b}")
        if b == 0.0:
            return "forward_kl", 0.0
        if b == 1.0:
            return "reverse_kl", 0.0
        return "gjsd", b
    if kind in ("skew_kl", "skew_reverse_kl"):
        a = float(alpha)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"{kind}: alpha must be in [0, 1], got {a}")
        if a == 0.0:
            return ("forward_kl" if kind == "skew_kl" else "reverse_kl"), 0.0
        return kind, a
    return kind, 0.0


def _temperature(value: float | mx.array) -> float:
    t = float(value)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {t}")
    return t
