"""kd-kernels: kdcore's loss rows, Adam step and layer kernels as native MLX primitives on
the CPU.

kdcore computes every token divergence (against dense or top-k teachers) and the
cross-entropy per chunk of rows with a *row function* ``rows(scale [C, 1], s [C, V],
*inputs) -> (values [C], scale * d values / d s)`` (``kdcore.kernels.chunked`` and the
fused head + loss pass call them). Its own row
functions are sequences of MLX element-wise ops, which on a Linux CPU run scalar on one
core. This plugin registers C++ replacements through the ``kd_row_kernels`` hook: one MLX
primitive per call that reads each row's logits from memory once, keeps the row in the
core's cache for its remaining passes, writes the gradient once, vectorised (AVX-512, AVX2
or the baseline instruction set, chosen at run time) and split across the CPU's cores.

The layer kernels (``"attention"``, flash attention, ``"softmax"``, attention's softmax, and
``"swiglu"``, each with its backward) run inside the built-in transformer's and mlx-lm's
layers through ``kdcore.models.ops``: on a real model most of a layer's time is that
element-wise work.

kdcore uses them on the CPU unless ``KD_KERNELS=pure`` (tests/test_stress.py is the stress
check); on a GPU and for anything not registered its pure-MLX row functions run.
``kd doctor`` says which are in use. Environment: ``KD_KERNELS_THREADS`` (threads per
call, default: the CPUs this process may use), ``KD_KERNELS_ISA`` (``avx512``, ``avx2`` or
``base``: a lower instruction set than the best, to compare them).

Built against the MLX of the environment (``pip install --no-build-isolation -e
plugins/kernels``, which scripts/setup.sh runs); a module built against another MLX version
is refused (the plugin fails to load, saying so) rather than risk MLX's C++ ABI.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import mlx.core as mx

import kdcore

# The C++ enum's order (csrc/rows.h); a kind kdcore adds later is simply not registered.
NATIVE_KINDS = ("forward_kl", "reverse_kl", "gjsd", "skew_kl", "skew_reverse_kl", "tvd")

try:
    from kd_kernels import _ext
except ImportError as error:  # not built: the plugin says why when it is loaded
    _ext = None
    _IMPORT_ERROR = str(error)
else:
    _IMPORT_ERROR = ""

REBUILD = "pip install --no-build-isolation -e plugins/kernels (cmake and nanobind installed)"


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def unavailable_reason() -> str | None:
    """Why the native module cannot be used here, or None when it can."""
    if _ext is None:
        return f"the native module kd_kernels._ext is not built ({_IMPORT_ERROR}); run {REBUILD}"
    if _release(_ext.mlx_version) != _release(mx.__version__):
        return (
            f"kd_kernels._ext was built against MLX {_ext.mlx_version} but MLX "
            f"{mx.__version__} is installed; rebuild it: {REBUILD}"
        )
    return None


def build_info() -> dict:
    """How the native module was built and what it uses on this machine."""
    if _ext is None:
        return {"available": False, "reason": unavailable_reason()}
    return {
        "available": unavailable_reason() is None,
        "isa": _ext.isa(),
        "isas": list(_ext.isas()),
        "threads": _ext.threads(),
        "compiler": _ext.compiler,
        "flags": _ext.flags,
        "mlx": _ext.mlx_version,
    }


def description() -> str:
    info = build_info()
    return (
        f"{info['isa']}, {info['threads']} threads; built with {info['compiler']} "
        f"({info['flags']}) against MLX {info['mlx']}"
    )


def dense_factory(kind: str) -> Callable:
    """``factory(coef, temperature, teacher_temperature) -> rows(scale, s, t)``: the native
    form of ``kdcore.kernels.divergence.dense_rows(kind, ...)`` (``coef`` is the beta or alpha
    that ``canonical`` gives)."""
    index = NATIVE_KINDS.index(kind)

    def factory(coef: float, temperature: float, teacher_temperature: float):
        coef, inv_t, inv_tt = float(coef), 1.0 / temperature, 1.0 / teacher_temperature

        def rows(scale: mx.array, s: mx.array, t: mx.array):
            return _ext.dense_rows(scale, s, t, index, coef, inv_t, inv_tt)

        return rows

    factory.__name__ = f"native_{kind}"
    return factory


TAILS = ("renormalize", "tail-bucket")  # the C++ enum's order


def sparse_factory(kind: str) -> Callable:
    """``factory(coef, temperature, tail) -> rows(scale, s, ids, lp)``: the native form of
    ``kdcore.kernels.divergence.sparse_rows(kind, ...)`` (a top-k teacher)."""
    index = NATIVE_KINDS.index(kind)

    def factory(coef: float, temperature: float, tail: str):
        if tail not in TAILS:
            return None  # a policy kdcore added later: its own rows
        coef, inv_t, policy = float(coef), 1.0 / temperature, TAILS.index(tail)

        def rows(scale: mx.array, s: mx.array, ids: mx.array, lp: mx.array):
            return _ext.sparse_rows(scale, s, ids, lp, index, coef, inv_t, policy)

        return rows

    factory.__name__ = f"native_sparse_{kind}"
    return factory


def cross_entropy_factory(label_smoothing: float = 0.0):
    """``rows(scale, s, labels)``: the native ``kdcore.kernels.fused.cross_entropy_rows``."""
    smoothing = float(label_smoothing)

    def rows(scale: mx.array, s: mx.array, labels: mx.array):
        return _ext.cross_entropy_rows(scale, s, labels, smoothing, kdcore.IGNORE_INDEX)

    return rows


def adam_factory():
    """``step(gradient, parameter, m, v, scalars, bias_correction) -> (parameter, m, v)``:
    one Adam(W) step of float32 arrays in one vectorised, threaded pass, in place where
    MLX lets it (``kdcore.engine.optim`` builds the scalars as mlx.optimizers.AdamW rounds
    them)."""
    return _ext.adam_step


def softmax_factory():
    """``softmax(x, scale, causal)``: attention's softmax of float32 scores [..., L, S] in one
    vectorised, threaded pass per row, with its backward (``kdcore.models.ops.attention``)."""
    return _ext.softmax


def swiglu_factory():
    """``swiglu(gate, up)``: ``silu(gate) * up`` of float32 arrays in one pass, with its
    backward (``kdcore.models.ops.swiglu``)."""
    return _ext.swiglu


def attention_factory():
    """``attention(q, k, v, scale, causal)``: ``softmax(scale q k^T) v`` of float32 q [B, Hq,
    L, D] and k, v [B, Hkv, S, D], flash style (tiles, an online softmax; the scores are never
    held), forward and backward each one threaded primitive (``kdcore.models.ops.attention``)."""
    return _ext.flash_attention


@kdcore.hookimpl
def kd_row_kernels():
    reason = unavailable_reason()
    if reason is not None:
        # A load failure of this plugin alone, listed by kd plugins / kd doctor with the
        # reason; kdcore keeps its pure-MLX rows.
        raise ImportError(reason)
    text = description()
    kinds = [kind for kind in NATIVE_KINDS if kind in kdcore.DIVERGENCES]
    table = {kind: dense_factory(kind) for kind in kinds}
    table.update({f"sparse:{kind}": sparse_factory(kind) for kind in kinds})
    table["cross_entropy"] = cross_entropy_factory
    table["adam"] = adam_factory
    table["softmax"] = softmax_factory
    table["swiglu"] = swiglu_factory
    table["attention"] = attention_factory
    for factory in table.values():
        factory.description = text
    return table
