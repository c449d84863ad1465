"""Memory-bounded token divergences between student logits and a teacher signal.

Every public function returns the masked mean over tokens of a per-token divergence summed
over the vocabulary: ``sum_i w_i d_i / max(sum_i w_i, 1)`` with ``w`` the mask, float32,
0 for an empty mask. With ``q = softmax(s / T)`` (student) and ``p = softmax(t / T)``
(teacher) at one temperature ``T``:

=================  ==========================================================================
``forward_kl``     ``KL(p || q) = sum_v p_v (log p_v - log q_v)``
``reverse_kl``     ``KL(q || p)``
``gjsd``           ``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``
                   (Agarwal et al. 2024, GKD eq. 1; TRL ``GKDTrainer.generalized_jsd_loss``).
                   As in TRL the endpoints are special-cased: ``beta = 0`` is ``forward_kl`` and
                   ``beta = 1`` is ``reverse_kl`` (the mixture formula itself vanishes there).
``skew_kl``        ``KL(p || alpha p + (1 - alpha) q)`` (DistiLLM SKL, Ko et al. 2024;
                   ``distillm/losses.py::skewed_forward_kl`` with ``lam = alpha``, which drops
                   the constant ``sum p log p``; we keep it so the value is a divergence).
``skew_reverse_kl`` ``KL(q || alpha q + (1 - alpha) p)`` (DistiLLM SRKL,
                   ``skewed_reverse_kl`` with ``lam = alpha``). ``alpha = 0`` gives the plain KL.
``tvd``            total variation ``1/2 sum_v |p_v - q_v|`` (DistiLLM's and Liger-Kernel's
                   TVD; bounded by 1, a metric, not a KL).
=================  ==========================================================================

No temperature-squared factor is applied here; losses multiply by ``T**2`` explicitly.

How memory stays bounded: the kernels run over the flattened tokens whose mask is non-zero,
``chunk_rows`` at a time. Each chunk computes its divergences *and* their gradient with
respect to the student's logits (closed forms below), is evaluated, and its gradient rows are
written into one preallocated float32 buffer, so forward and backward together hold the
inputs, that gradient buffer and one chunk of ``[chunk_rows, V]`` temporaries. The work is
wrapped in ``mx.custom_function`` whose VJP hands back ``cotangent * buffer``.

Two MLX details make this work. Inside a gradient transformation an evaluated array keeps
its graph when its inputs are traced, and every array keeps its graph while a VJP runs, so
evaluating chunks there would keep all of them alive. The forward therefore reads the rows of
each chunk through a NumPy view of the (evaluated) input and copies them into fresh arrays
outside the trace, and the gradient is computed in the forward, not in the VJP. The price:
a forward-only call also computes the gradient, and the kernels cannot run under
``mx.compile``. The teacher is treated as a function too: its cotangent (for learnable
aggregators) is built lazily from the plain formulation and only evaluated when needed,
without the memory bound.

Gradients, with ``lq = log q`` and ``g = d d / d lq`` (``q`` taken as ``exp(lq)``):
``forward_kl``: ``g = -p``; ``reverse_kl``: ``g = q (lq - lp) + q``;
``gjsd``: ``g = (1 - beta) q (lq - lm)``; ``skew_kl``: ``g = -(1 - alpha) p q / m``;
``skew_reverse_kl``: ``g = q (lq - lm) + (1 - alpha) q p / m``; ``tvd``: ``g = sign(q - p) q / 2``
(the subgradient 0 where ``q = p``); then through the log-softmax
``d d / d s = (g - q sum(g)) / T``.

Sparse (top-k) teachers: the teacher is known on its top-k ids ``S`` (plus the log of the
mass outside them). Both distributions are reduced to the same support and the divergence is
taken there:

- ``renormalize``: ``p`` and ``q`` renormalised over ``S`` (``k`` classes);
- ``tail-bucket``: ``k + 1`` classes, the ``k`` top tokens and one class for everything else;
  the student's own tail mass is ``1 - sum_{v in S} q_v`` (computed as the sum over the
  complement, so small tails keep their precision).

For ``forward_kl`` with ``k = V`` both are exact. For every divergence here ``tail-bucket``
is a coarse-graining of the full distributions, so by the data-processing inequality it is a
lower bound of the full-vocabulary value, equal to it when the student's and teacher's tails
are proportional; that is the documented approximation for ``reverse_kl`` and ``gjsd`` from a
top-k cache. ``renormalize`` is exact when both put all their mass on ``S``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from kdcore.errors import KdError
from kdcore.signal.teacher import TeacherSignal, stable_log_softmax

KINDS = ("forward_kl", "reverse_kl", "gjsd", "skew_kl", "skew_reverse_kl", "tvd")
TAILS = ("renormalize", "tail-bucket")

# One chunk holds about this many float32 elements per [rows, V] temporary (16 MiB).
CHUNK_ELEMENTS = 1 << 22
# Smallest tail mass we take a log of; keeps k = V and underflowing tails finite.
TINY = 1e-30
LOG_TINY = math.log(TINY)

RowFn = Callable[..., tuple[mx.array, mx.array]]


# ---------------------------------------------------------------- parameters


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


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


# ---------------------------------------------------------------- per-row mathematics


def _xlogy(a: mx.array, b: mx.array) -> mx.array:
    """``a * b`` with 0 where ``a`` is 0 (so ``0 log 0 = 0`` and ``0 * inf = 0``)."""
    return mx.where(a > 0, a * b, 0.0)


def row_terms(
    kind: str, coef: float, lq: mx.array, lp: mx.array, grad: bool = True
) -> tuple[mx.array, mx.array | None]:
    """Per-row divergence and its gradient with respect to ``lq``.

    ``lq`` (student) and ``lp`` (teacher) are normalised log-probabilities over the last
    axis; ``kind``/``coef`` come from :func:`canonical`. The gradient treats ``q = exp(lq)``
    elementwise; callers apply the chain rule of their own normalisation.
    """
    if kind == "forward_kl":
        p = mx.exp(lp)
        value = _xlogy(p, lp - lq).sum(-1)
        return value, (-p if grad else None)
    if kind == "reverse_kl":
        q = mx.exp(lq)
        term = _xlogy(q, lq - lp)
        return term.sum(-1), (term + q if grad else None)
    if kind == "gjsd":
        b = coef
        lm = mx.logaddexp(lp + math.log(b), lq + math.log1p(-b))
        p, q = mx.exp(lp), mx.exp(lq)
        tq = _xlogy(q, lq - lm)
        value = b * _xlogy(p, lp - lm).sum(-1) + (1.0 - b) * tq.sum(-1)
        return value, ((1.0 - b) * tq if grad else None)
    if kind == "skew_kl":
        a = coef
        lm = mx.logaddexp(lp + _log(a), lq + _log(1.0 - a))
        p = mx.exp(lp)
        value = _xlogy(p, lp - lm).sum(-1)
        return value, (-(1.0 - a) * _xlogy(p, mx.exp(lq - lm)) if grad else None)
    if kind == "skew_reverse_kl":
        a = coef
        lm = mx.logaddexp(lq + _log(a), lp + _log(1.0 - a))
        q = mx.exp(lq)
        term = _xlogy(q, lq - lm)
        if not grad:
            return term.sum(-1), None
        return term.sum(-1), term + (1.0 - a) * _xlogy(q, mx.exp(lp - lm))
    if kind == "tvd":
        q = mx.exp(lq)
        diff = q - mx.exp(lp)
        value = 0.5 * mx.abs(diff).sum(-1)
        return value, (0.5 * mx.sign(diff) * q if grad else None)
    raise ValueError(f"unknown divergence {kind!r}")


def _log_softmax(z: mx.array) -> mx.array:
    # One implementation for every log-softmax here: the row maximum subtracted first.
    return stable_log_softmax(z)


# ---------------------------------------------------------------- native row kernels

# What a plugin may replace (hook ``kd_row_kernels``): the dense and top-k ("sparse:KIND")
# divergences here, the fused path's cross-entropy and the Adam(W) step of
# kdcore.engine.optim ("adam"); KD_KERNELS=pure keeps kdcore's own MLX code everywhere.
ROW_KERNELS = (*KINDS, *(f"sparse:{kind}" for kind in KINDS), "cross_entropy", "adam")
_installed: dict[str, tuple[Callable[..., Any], str]] | None = None


def use_row_kernels(table: Mapping[str, Callable[..., Any]] | None, source: str = "") -> None:
    """Use ``table`` (``name -> factory``, what ``kd_row_kernels`` returns) as this process's
    native row kernels instead of the plugin registry's; None: the registry's again."""
    global _installed
    source = source or "use_row_kernels"
    _installed = None if table is None else {k: (f, source) for k, f in table.items()}


def _registered() -> dict[str, tuple[Callable[..., Any], str]]:
    if _installed is not None:
        return _installed
    # kernels sit above the registry in the layers (pyproject's import-linter contract);
    # asked at the first dispatch, so that importing the kernels loads no plugin.
    from kdcore.registry.manager import get_registry

    return {
        name: (kernel.factory, f"{kernel.distribution} {kernel.version}")
        for name, kernel in get_registry().row_kernels().items()
    }


def kernels_mode() -> str:
    """``"native"`` (the default: registered kernels) or ``"pure"`` (KD_KERNELS=pure)."""
    # Crashes seen while kd-kernels was developed came from processes whose extension was
    # rebuilt in place under them; 40 stress runs and an AddressSanitizer build are clean
    # (plugins/kernels/tests/test_stress.py runs in the suite).
    raw = os.environ.get("KD_KERNELS", "")
    mode = raw.strip().lower() or "native"
    if mode not in ("native", "pure"):
        raise KdError(
            f"KD_KERNELS={raw!r}: use 'native' (the registered native kernels, the default) "
            "or 'pure' (kdcore's MLX row functions)"
        )
    return mode


def _on_cpu() -> bool:
    return mx.default_device().type == mx.cpu


def native_kernel(name: str, *args: Any) -> Callable[..., Any] | None:
    """The native kernel registered for ``name`` built with ``args``, or None (none
    registered, ``KD_KERNELS=pure``, a default device other than the CPU, or the factory
    leaves these parameters to kdcore)."""
    if kernels_mode() == "pure" or not _on_cpu():
        return None
    entry = _registered().get(name)
    return entry[0](*args) if entry is not None else None


def with_row_kernel(name: str, pure: RowFn, *args: Any) -> RowFn:
    """``pure``, or the native kernel registered for ``name`` built with ``args`` (its
    factory's arguments, see ``kd_row_kernels``), run when the default device is the CPU
    (the native kernels are CPU primitives; elsewhere ``pure`` runs)."""
    if kernels_mode() == "pure":
        return pure
    entry = _registered().get(name)
    native = entry[0](*args) if entry is not None else None
    if native is None:  # none registered, or the factory leaves these parameters to us
        return pure

    def rows(*inputs: mx.array) -> tuple[mx.array, mx.array]:
        return native(*inputs) if _on_cpu() else pure(*inputs)

    rows.pure = pure  # the differentiable twin (kdcore.losses.rows.rows_on_logits)
    return rows


def row_kernel_status() -> dict[str, dict[str, str]]:
    """Per name of :data:`ROW_KERNELS`: ``path`` (``"native"`` or ``"pure"``), ``source``
    (the distribution that registered the kernel) and ``detail`` (its description, or why
    the pure rows run), as ``kd doctor`` reports them."""
    if kernels_mode() == "pure":
        why = "KD_KERNELS=pure"
    elif not _on_cpu():
        why = f"the default device is {mx.default_device()}; the native kernels are CPU only"
    else:
        why = ""
    registered = _registered()
    status = {}
    for name in ROW_KERNELS:
        factory, source = registered.get(name, (None, ""))
        if why or factory is None:
            detail = why or "no plugin registers one (kd-kernels builds them)"
            status[name] = {"path": "pure", "source": source, "detail": detail}
        else:
            detail = str(getattr(factory, "description", ""))
            status[name] = {"path": "native", "source": source, "detail": detail}
    return status


def dense_rows(kind: str, coef: float, temperature: float, teacher_temperature: float) -> RowFn:
    """Row function of the dense kernel: ``(scale [C, 1], s [C, V], t [C, V])`` to
    ``(d [C], scale * dd/ds [C, V])``; a native kernel registered for ``kind`` replaces it
    on the CPU (:func:`with_row_kernel`)."""
    inv_t, inv_tt = 1.0 / temperature, 1.0 / teacher_temperature

    def scaled(z: mx.array, inv: float) -> mx.array:
        z = z.astype(mx.float32)
        return z if inv == 1.0 else z * inv

    def rows(scale: mx.array, s: mx.array, t: mx.array):
        lq = _log_softmax(scaled(s, inv_t))
        lp = _log_softmax(scaled(t, inv_tt))
        q = mx.exp(lq)
        factor = scale * inv_t
        # The two plain KLs have short closed forms; the rest go through row_terms.
        if kind == "forward_kl":
            p = mx.exp(lp)
            value = _xlogy(p, lp - lq).sum(-1)
            return value, (q - p) * factor
        if kind == "reverse_kl":
            term = _xlogy(q, lq - lp)
            value = term.sum(-1)
            return value, (term - q * value[:, None]) * factor
        value, g = row_terms(kind, coef, lq, lp)
        return value, (g - q * g.sum(-1, keepdims=True)) * factor

    return with_row_kernel(kind, rows, coef, temperature, teacher_temperature)


def _complement(ids: mx.array, shape: tuple[int, int]) -> mx.array:
    """1.0 outside ``ids`` (per row), 0.0 on them."""
    ones = mx.ones(shape, mx.float32)
    return mx.put_along_axis(ones, ids, mx.zeros(ids.shape, mx.float32), axis=-1)


def _student_tail(q: mx.array, outside: mx.array) -> tuple[mx.array, mx.array]:
    """(clamped tail mass [C, 1], q restricted to the complement [C, V])."""
    rest = q * outside
    return mx.maximum(rest.sum(-1, keepdims=True), TINY), rest


def sparse_rows(kind: str, coef: float, temperature: float, tail: str) -> RowFn:
    """Row function of the sparse kernel: ``(scale [C, 1], s [C, V], ids [C, K], lp [C, K or
    K+1])`` to ``(d [C], scale * dd/ds [C, V])``.

    ``lp`` are the teacher's log-probabilities on the support (``ids`` and, for
    ``tail-bucket``, a last tail class), already at ``temperature``. A native kernel
    registered for ``"sparse:KIND"`` replaces it on the CPU (:func:`with_row_kernel`).
    """
    if tail not in TAILS:
        raise ValueError(f"unknown tail policy {tail!r}; use one of {', '.join(TAILS)}")
    inv_t = 1.0 / temperature

    def rows(scale: mx.array, s: mx.array, ids: mx.array, lp: mx.array):
        z = s.astype(mx.float32) * inv_t
        factor = scale * inv_t
        z_top = mx.take_along_axis(z, ids, axis=-1)
        lp = lp.astype(mx.float32)
        if tail == "renormalize":
            lq = _log_softmax(z_top)
            value, g = row_terms(kind, coef, lq, lp)
            g_top = g - mx.exp(lq) * g.sum(-1, keepdims=True)
            grad = mx.put_along_axis(mx.zeros(z.shape, mx.float32), ids, g_top * factor, -1)
            return value, grad
        k = ids.shape[-1]
        # Relative to the row maximum, so z - lse is not a difference of two numbers near 1e4
        # (no autodiff here: the gradient is the closed form below, unchanged by a shift).
        z = z - z.max(-1, keepdims=True)
        z_top = mx.take_along_axis(z, ids, axis=-1)
        lse = mx.logsumexp(z, axis=-1, keepdims=True)
        q = mx.exp(z - lse)
        mass, rest = _student_tail(q, _complement(ids, z.shape))
        lq_top = z_top - lse
        lq = mx.concatenate([lq_top, mx.log(mass)], axis=-1)
        lp = mx.concatenate([lp[..., :k], mx.maximum(lp[..., k:], LOG_TINY)], axis=-1)
        value, g = row_terms(kind, coef, lq, lp)
        total = g.sum(-1, keepdims=True)
        # d lq_top / dz = onehot - q ; d log(tail) / dz = [outside] q / tail - q
        grad = rest * (g[..., k:] / mass) - q * total
        top = g[..., :k] - mx.exp(lq_top) * total
        return value, mx.put_along_axis(grad * factor, ids, top * factor, -1)

    return with_row_kernel(f"sparse:{kind}", rows, coef, temperature, tail)


# ---------------------------------------------------------------- plain formulations


def _masked_mean(values: mx.array, mask: mx.array) -> mx.array:
    mask = mask.astype(mx.float32)
    return (values.astype(mx.float32) * mask).sum() / mx.maximum(mask.sum(), 1.0)


def plain_dense_rows(
    kind: str,
    coef: float,
    student: mx.array,
    teacher: mx.array,
    temperature: float,
    teacher_temperature: float | None = None,
) -> mx.array:
    """Straightforward per-token divergence over whole ``[..., V]`` arrays (autodiff-able)."""
    tt = temperature if teacher_temperature is None else teacher_temperature
    lq = _log_softmax(student.astype(mx.float32) / temperature)
    lp = _log_softmax(teacher.astype(mx.float32) / tt)
    return row_terms(kind, coef, lq, lp, grad=False)[0]


def plain_sparse_rows(
    kind: str,
    coef: float,
    student: mx.array,
    ids: mx.array,
    lp: mx.array,
    temperature: float,
    tail: str,
) -> mx.array:
    """Straightforward per-token divergence against a top-k teacher support."""
    lq_full = _log_softmax(student.astype(mx.float32) / temperature)
    lq_top = mx.take_along_axis(lq_full, ids, axis=-1)
    lp = lp.astype(mx.float32)
    if tail == "renormalize":
        return row_terms(kind, coef, _log_softmax(lq_top), lp, grad=False)[0]
    k = ids.shape[-1]
    outside = _complement(ids.reshape(-1, k), (ids.size // k, student.shape[-1]))
    rest = (mx.exp(lq_full).reshape(outside.shape) * outside).sum(-1)
    mass = mx.maximum(rest.reshape(ids.shape[:-1]), TINY)
    lq = mx.concatenate([lq_top, mx.log(mass)[..., None]], axis=-1)
    lp = mx.concatenate([lp[..., :k], mx.maximum(lp[..., k:], LOG_TINY)], axis=-1)
    return row_terms(kind, coef, lq, lp, grad=False)[0]


def plain_divergence(
    student_logits: mx.array,
    teacher_logits: mx.array,
    mask: mx.array,
    kind: str = "forward_kl",
    *,
    temperature: float | mx.array = 1.0,
    beta: float | mx.array = 0.5,
    alpha: float | mx.array = 0.1,
) -> mx.array:
    """The straightforward MLX formulation of :func:`dense_divergence` (whole-array ops)."""
    kind, coef = canonical(kind, beta, alpha)
    rows = plain_dense_rows(kind, coef, student_logits, teacher_logits, _temperature(temperature))
    return _masked_mean(rows, mask)


# ---------------------------------------------------------------- host views and chunks


def _host(x: mx.array) -> np.ndarray:
    """A NumPy view of an (evaluated) array's buffer, no copy; bfloat16 as raw uint16."""
    if x.dtype == mx.bfloat16:
        return np.asarray(x.view(mx.uint16))
    return np.asarray(x)


def _device(rows: np.ndarray, dtype: mx.Dtype) -> mx.array:
    """Fresh (untraced) array from host rows."""
    out = mx.array(rows)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


class _Rows:
    """Reads rows (flattened leading positions) of one array without copying the whole."""

    def __init__(self, x: mx.array, lead: tuple[int, ...]):
        self.dtype = x.dtype
        self.lead = lead
        host = _host(x)
        n = int(np.prod(lead))
        self.flat = host.reshape(n, *host.shape[len(lead) :]) if host.flags.c_contiguous else None
        self.host = host

    def take(self, sub: np.ndarray) -> mx.array:
        if self.flat is not None:
            if sub[-1] - sub[0] + 1 == len(sub):
                return _device(self.flat[sub[0] : sub[-1] + 1], self.dtype)
            return _device(self.flat[sub], self.dtype)
        return _device(self.host[np.unravel_index(sub, self.lead)], self.dtype)


def _flat(x: mx.array, lead: tuple[int, ...]) -> mx.array:
    """``x`` with its leading ``lead`` positions flattened into rows, no gradient."""
    return mx.stop_gradient(x).reshape(int(np.prod(lead)), *x.shape[len(lead) :])


def is_native(rows_fn: RowFn) -> bool:
    """Whether ``rows_fn`` runs a registered native kernel here (see
    :func:`with_row_kernel`): one primitive per call, no temporaries to bound."""
    return getattr(rows_fn, "pure", None) is not None and _on_cpu()


def scale_own_buffer(buffer: mx.array, cotangent: mx.array) -> mx.array:
    """``cotangent * buffer`` for a scalar cotangent and an evaluated float32 ``buffer``
    that nothing else holds (a kernel's own gradient buffer), in place on a CPU device.

    NumPy's vectorised multiply runs at memory speed where MLX's Linux CPU kernel is
    scalar (measured 25 ms against 177 ms for 512 x 128,000 floats); the product is the
    same float32 rounding. A cotangent of exactly 1 (an unweighted loss) costs nothing.
    """
    if cotangent.size != 1 or buffer.dtype != mx.float32 or not _on_cpu():
        return buffer * cotangent
    c = float(mx.stop_gradient(cotangent).astype(mx.float32).item())
    if c != 1.0:
        host = np.asarray(buffer)
        if not host.flags.writeable or not host.flags.c_contiguous:
            return buffer * cotangent
        np.multiply(host, np.float32(c), out=host)
    return buffer


def _chunks(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def default_chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def map_rows(
    fn: Callable[..., mx.array | Sequence[mx.array]],
    arrays: Sequence[mx.array],
    lead: tuple[int, ...],
    chunk_rows: int | None = None,
) -> list[np.ndarray]:
    """Apply ``fn`` to row chunks of ``arrays`` (leading shape ``lead``), no gradient.

    Returns NumPy arrays with leading shape ``lead``; each chunk is evaluated before the
    next, so at most one chunk of ``fn``'s temporaries is alive.
    """
    n = int(np.prod(lead))
    width = max(int(a.shape[-1]) if a.ndim > len(lead) else 1 for a in arrays)
    size = chunk_rows or default_chunk_rows(width)
    readers = [_Rows(mx.stop_gradient(a), lead) for a in arrays]
    outs: list[list[np.ndarray]] = []
    for sub in _chunks(np.arange(n), size):
        result = fn(*(r.take(sub) for r in readers))
        result = [result] if isinstance(result, mx.array) else list(result)
        mx.eval(result)
        for i, r in enumerate(result):
            if len(outs) <= i:
                outs.append([])
            outs[i].append(np.array(r))
    return [np.concatenate(o).reshape(*lead, *o[0].shape[1:]) for o in outs]


# ---------------------------------------------------------------- the chunked kernel


def chunked_token_mean(
    rows_fn: RowFn,
    plain_fn: Callable[..., mx.array],
    student: mx.array,
    teacher: Sequence[mx.array],
    mask: mx.array,
    chunk_rows: int | None = None,
) -> mx.array:
    """Masked mean over tokens of ``rows_fn`` with a chunked forward and gradient.

    ``student`` is ``[..., V]`` logits with leading shape ``mask.shape``; every array in
    ``teacher`` has that leading shape too. ``rows_fn(scale, s_rows, *teacher_rows)``
    returns the per-row values ``[C]`` and their gradient with respect to ``s_rows``
    multiplied by ``scale`` ``[C, 1]`` (the rows' weights in the mean), ``[C, V]``
    float32. ``plain_fn(student, *teacher)`` returns the same per-token values from whole
    arrays; it is used only for the teacher's cotangent (built lazily, evaluated only if a
    learnable component upstream of the teacher needs it) and if the VJP is taken twice.
    """
    lead = tuple(mask.shape)
    if tuple(student.shape[:-1]) != lead:
        raise ValueError(f"student logits {student.shape} do not match the mask {mask.shape}")
    weights = np.asarray(mx.stop_gradient(mask).astype(mx.float32)).reshape(-1).astype(np.float64)
    rows = np.flatnonzero(weights != 0)
    denominator = max(float(weights.sum()), 1.0)
    size = chunk_rows or default_chunk_rows(student.shape[-1])
    n, vocab = int(np.prod(lead)), student.shape[-1]
    held: dict[str, mx.array] = {}

    def plain_mean(s, *t):
        return _masked_mean(plain_fn(s, *t), mask)

    @mx.custom_function
    def kernel(s, *t):
        total = 0.0
        if len(rows) == n and is_native(rows_fn):
            # Every row kept and native rows (no temporaries): one call, whose gradient is
            # the buffer itself (MLX's CPU fill of a zero buffer costs more than the rows).
            scale = mx.array((weights / denominator).astype(np.float32))[:, None]
            values, grad = rows_fn(scale, _flat(s, lead), *(_flat(x, lead) for x in t))
            mx.eval(values, grad)
            total = float(np.dot(np.asarray(values, dtype=np.float64), weights))
            held["grad"] = grad
            return mx.array(total / denominator, dtype=mx.float32)
        grad = mx.zeros((n, vocab), mx.float32)
        if len(rows):
            reader = _Rows(s, lead)
            t_readers = [_Rows(x, lead) for x in t]
            for sub in _chunks(rows, size):
                scale = mx.array((weights[sub] / denominator).astype(np.float32))[:, None]
                values, g = rows_fn(scale, reader.take(sub), *(r.take(sub) for r in t_readers))
                if sub[-1] - sub[0] + 1 == len(sub):
                    grad[int(sub[0]) : int(sub[-1]) + 1] = g
                else:
                    grad[mx.array(sub.astype(np.int32))] = g
                mx.eval(grad, values)
                total += float(np.dot(np.asarray(values, dtype=np.float64), weights[sub]))
        held["grad"] = grad
        return mx.array(total / denominator, dtype=mx.float32)

    @kernel.vjp
    def kernel_vjp(primals, cotangent, output):
        s, *t = primals
        grad = held.pop("grad", None)
        if grad is None:  # a second VJP of the same call: fall back to the plain form
            grad = mx.vjp(lambda x: plain_mean(x, *t), [s], [cotangent])[1][0]
        elif len(rows):
            grad = scale_own_buffer(grad, cotangent).astype(s.dtype).reshape(s.shape)
        else:
            grad = (grad * cotangent).astype(s.dtype).reshape(s.shape)
        floats = [i for i, x in enumerate(t) if mx.issubdtype(x.dtype, mx.floating)]
        t_cot = [mx.zeros_like(x) for x in t]
        if floats:

            def of_teacher(*xs):
                full = list(t)
                for i, x in zip(floats, xs):
                    full[i] = x
                return plain_mean(s, *full)

            lazy = mx.vjp(of_teacher, [t[i] for i in floats], [cotangent])[1]
            for i, c in zip(floats, lazy):
                t_cot[i] = c
        return (grad, *t_cot)

    return kernel(student, *teacher)


# ---------------------------------------------------------------- public entry points


def dense_divergence(
    student_logits: mx.array,
    teacher_logits: mx.array,
    mask: mx.array,
    kind: str = "forward_kl",
    *,
    temperature: float | mx.array = 1.0,
    teacher_temperature: float | mx.array | None = None,
    beta: float | mx.array = 0.5,
    alpha: float | mx.array = 0.1,
    chunk_rows: int | None = None,
) -> mx.array:
    """Chunked divergence between ``softmax(s / T)`` and ``softmax(t / T_t)``.

    ``teacher_temperature`` defaults to ``temperature``; pass 1.0 when ``teacher_logits``
    are already log-probabilities at ``T`` (a mixture's ``log_probs(T)``).
    """
    kind, coef = canonical(kind, beta, alpha)
    t = _temperature(temperature)
    tt = t if teacher_temperature is None else _temperature(teacher_temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} "
            "differ; align the vocabularies first"
        )
    return chunked_token_mean(
        dense_rows(kind, coef, t, tt),
        lambda s, x: plain_dense_rows(kind, coef, s, x, t, tt),
        student_logits,
        [teacher_logits],
        mask,
        chunk_rows,
    )


def sparse_divergence(
    student_logits: mx.array,
    ids: mx.array,
    teacher_logprobs: mx.array,
    mask: mx.array,
    kind: str = "forward_kl",
    *,
    tail: str = "renormalize",
    temperature: float | mx.array = 1.0,
    beta: float | mx.array = 0.5,
    alpha: float | mx.array = 0.1,
    chunk_rows: int | None = None,
) -> mx.array:
    """Chunked divergence against a top-k teacher (see the module doc for the tail policies).

    ``ids`` [..., K] are the teacher's top-k token ids; ``teacher_logprobs`` are its
    log-probabilities at ``temperature`` on that support: [..., K] normalised over the
    top-k for ``renormalize``, [..., K + 1] with the tail class last for ``tail-bucket``
    (:func:`teacher_support` builds both).
    """
    kind, coef = canonical(kind, beta, alpha)
    t = _temperature(temperature)
    if tail not in TAILS:
        raise ValueError(f"unknown tail policy {tail!r}; use one of {', '.join(TAILS)}")
    want = ids.shape[-1] + (1 if tail == "tail-bucket" else 0)
    if teacher_logprobs.shape[-1] != want:
        raise ValueError(
            f"tail {tail!r} needs {want} teacher log-probs per token, got "
            f"{teacher_logprobs.shape[-1]}"
        )
    ids = ids.astype(mx.int32)
    return chunked_token_mean(
        sparse_rows(kind, coef, t, tail),
        lambda s, i, lp: plain_sparse_rows(kind, coef, s, i, lp, t, tail),
        student_logits,
        [ids, teacher_logprobs],
        mask,
        chunk_rows,
    )


def plain_sparse_divergence(
    student_logits: mx.array,
    ids: mx.array,
    teacher_logprobs: mx.array,
    mask: mx.array,
    kind: str = "forward_kl",
    *,
    tail: str = "renormalize",
    temperature: float | mx.array = 1.0,
    beta: float | mx.array = 0.5,
    alpha: float | mx.array = 0.1,
) -> mx.array:
    """The straightforward formulation of :func:`sparse_divergence`."""
    kind, coef = canonical(kind, beta, alpha)
    rows = plain_sparse_rows(
        kind, coef, student_logits, ids, teacher_logprobs, _temperature(temperature), tail
    )
    return _masked_mean(rows, mask)


def topk_sorted(z: mx.array, k: int) -> mx.array:
    """Ids of the ``k`` largest entries per row, largest first (no gradient)."""
    z = mx.stop_gradient(z)
    ids = mx.argpartition(-z, kth=k - 1, axis=-1)[..., :k]
    order = mx.argsort(-mx.take_along_axis(z, ids, axis=-1), axis=-1)
    return mx.take_along_axis(ids, order, axis=-1)


def teacher_support(
    teacher: TeacherSignal,
    temperature: float | mx.array,
    tail: str = "renormalize",
    top_k: int = 0,
    chunk_rows: int | None = None,
) -> tuple[mx.array, mx.array]:
    """``(ids [..., K], log-probs [..., K or K+1])`` of a teacher at ``temperature``.

    From a sparse signal: its stored top-k re-tempered from the capture temperature ``Tc``
    (``z = log p * Tc / T``, renormalised; the tail class is re-tempered as one token, exact
    at ``T = Tc``), keeping the ``top_k`` largest when ``0 < top_k < K`` (the dropped ones
    join the tail). From a dense or mixture signal: its ``top_k`` ids (``top_k > 0``
    required) with exact log-probabilities and tail at ``temperature``; computed in chunks and
    treated as constant (no gradient reaches a learnable teacher through the top-k path).
    From a mixture with a top-k member: :func:`mixture_support`.
    """
    t = _temperature(temperature)
    if tail not in TAILS:
        raise ValueError(f"unknown tail policy {tail!r}; use one of {', '.join(TAILS)}")
    if teacher.topk_ids is not None:
        ids = teacher.topk_ids.astype(mx.int32)
        lp = teacher.topk_logprobs.astype(mx.float32)
        tl = teacher.tail_logmass.astype(mx.float32)
        if 0 < top_k < ids.shape[-1]:
            order = mx.argsort(-lp, axis=-1)
            keep, drop = order[..., :top_k], order[..., top_k:]
            dropped = mx.logsumexp(mx.take_along_axis(lp, drop, axis=-1), axis=-1)
            tl = mx.logaddexp(tl, dropped)
            ids = mx.take_along_axis(ids, keep, axis=-1)
            lp = mx.take_along_axis(lp, keep, axis=-1)
        if tail == "tail-bucket":
            lp = mx.concatenate([lp, tl[..., None]], axis=-1)
        z = lp * (teacher.capture_temperature / t)
        return ids, mx.stop_gradient(_log_softmax(z))
    if teacher.members is not None and teacher.is_sparse:
        return mixture_support(teacher, t, tail, top_k, chunk_rows)
    if top_k <= 0:
        raise ValueError("teacher_support from a dense teacher needs top_k > 0")
    logits, tt = (teacher.logits, t) if teacher.logits is not None else (teacher.log_probs(t), 1.0)
    support = support_rows(min(top_k, logits.shape[-1]), tail, tt)
    ids, lp = map_rows(support, [logits], tuple(logits.shape[:-1]), chunk_rows)
    return mx.array(ids.astype(np.int32)), mx.array(lp)


def support_rows(k: int, tail: str, temperature: float) -> Callable[[mx.array], tuple]:
    """``rows [C, V] -> (ids [C, k], log-probs [C, k or k+1])``: the top-k support of dense
    teacher rows at ``temperature``, as :func:`teacher_support` reads it (no gradient)."""
    inv = 1.0 / temperature

    def support(x: mx.array):
        lp_full = _log_softmax(mx.stop_gradient(x).astype(mx.float32) * inv)
        ids = topk_sorted(lp_full, k)
        lp = mx.take_along_axis(lp_full, ids, axis=-1)
        if tail == "renormalize":
            return ids, _log_softmax(lp)
        rest = (mx.exp(lp_full) * _complement(ids, lp_full.shape)).sum(-1, keepdims=True)
        return ids, mx.concatenate([lp, mx.log(mx.maximum(rest, TINY))], axis=-1)

    return support


def _distinct_support(ids: np.ndarray, vocab: int) -> np.ndarray:
    """``ids`` [rows, S] with every repeat of an id in its row replaced by the smallest ids
    that the row does not hold (so a row's S ids are distinct; needs S < vocab)."""
    rows, size = ids.shape
    order = np.argsort(ids, axis=1, kind="stable")
    ranked = np.take_along_axis(ids, order, axis=1)
    repeat_ranked = np.zeros(ids.shape, bool)
    repeat_ranked[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    repeat = np.empty_like(repeat_ranked)
    np.put_along_axis(repeat, order, repeat_ranked, axis=1)
    if not repeat.any():
        return ids
    # 2S candidates always hold at least S free ids (and V - S >= repeats when 2S > V)
    candidates = min(vocab, 2 * size)
    present = np.zeros((rows, candidates), bool)
    r, c = np.nonzero(ids < candidates)
    present[r, ids[r, c]] = True
    free = np.argsort(present, axis=1, kind="stable")  # free ids first, ascending
    nth = np.cumsum(repeat, axis=1) - 1
    out = ids.copy()
    r, c = np.nonzero(repeat)
    out[r, c] = free[r, nth[r, c]]
    return out


def mixture_support(
    teacher: TeacherSignal,
    temperature: float | mx.array,
    tail: str = "renormalize",
    top_k: int = 0,
    chunk_rows: int | None = None,
) -> tuple[mx.array, mx.array]:
    """``(ids [..., S], log-probs [..., S or S+1])`` of a mixture with top-k members.

    Each member ``m`` is read at ``temperature`` as its top-k ids plus a tail class
    (:func:`teacher_support` with ``tail-bucket``; a dense member contributes its ``top_k``,
    or the largest cached k). A member says nothing about single tokens outside its top-k, so
    its tail mass is spread evenly over them: ``p_m(v) = tail_m / (V - k_m)``. The support is
    the union of the members' ids, padded to ``S = sum k_m`` distinct ids with the smallest
    ids outside it (which get exactly that spread probability, so padding only refines the
    tail), or all ``V`` ids when ``S >= V``. Then ``p(v) = sum_m w_m p_m(v)`` on the support
    and ``sum_m w_m (1 - sum_support p_m)`` for the tail. When every member holds the whole
    vocabulary this is the exact dense mixture. Gradients reach the weights (a learnable
    aggregator), not the members.
    """
    vocab = teacher.vocab_size
    cached = [m.topk_ids.shape[-1] for m in teacher.members if m.topk_ids is not None]
    member_k = top_k if top_k > 0 else max(cached, default=0)
    parts = [
        teacher_support(m, temperature, "tail-bucket", member_k, chunk_rows)
        for m in teacher.members
    ]
    lead = tuple(parts[0][0].shape[:-1])
    member_ids = [np.asarray(i, dtype=np.int64).reshape(-1, i.shape[-1]) for i, _ in parts]
    member_p = [
        np.exp(np.asarray(lp, dtype=np.float64)).reshape(-1, lp.shape[-1]) for _, lp in parts
    ]
    rows = member_ids[0].shape[0]
    size = sum(i.shape[-1] for i in member_ids)
    if size >= vocab:
        ids = np.broadcast_to(np.arange(vocab), (rows, vocab))
    else:
        ids = _distinct_support(np.concatenate(member_ids, axis=-1), vocab)
    step = max(1, (1 << 22) // max(ids.shape[1] * max(i.shape[1] for i in member_ids), 1))
    columns = []
    for m_ids, p in zip(member_ids, member_p):
        k = m_ids.shape[-1]
        spread = p[:, k] / max(vocab - k, 1)
        at = np.repeat(spread[:, None], ids.shape[1], axis=1)
        for start in range(0, rows, step):  # bounded [step, S, k] comparisons
            part = slice(start, start + step)
            hit = ids[part, :, None] == m_ids[part, None, :]
            found = hit.any(-1)
            at[part] = np.where(found, (hit * p[part, None, :k]).sum(-1), at[part])
        columns.append(at)
    member_at = np.stack(columns, axis=-1)  # [rows, S, M]
    outside = np.clip(1.0 - member_at.sum(axis=1), 0.0, 1.0)  # [rows, M]
    count = len(columns)
    weights = teacher.weights.astype(mx.float32)
    if weights.ndim == 2:  # per instance -> per token
        weights = mx.broadcast_to(weights[:, None, :], lead + (count,))
    at_mx = mx.array(member_at.reshape(lead + member_at.shape[1:]).astype(np.float32))
    mixed = (at_mx * weights[..., None, :]).sum(-1)
    log_mixed = mx.log(mx.maximum(mixed, TINY))
    ids_mx = mx.array(ids.reshape(lead + (ids.shape[1],)).astype(np.int32))
    if tail == "renormalize":
        return ids_mx, _log_softmax(log_mixed)
    rest = (mx.array(outside.reshape(lead + (count,)).astype(np.float32)) * weights).sum(-1)
    return ids_mx, mx.concatenate([log_mixed, mx.log(mx.maximum(rest, TINY))[..., None]], -1)


def token_divergence(
    student_logits: mx.array,
    teacher: TeacherSignal | mx.array,
    mask: mx.array,
    kind: str = "forward_kl",
    *,
    temperature: float | mx.array = 1.0,
    beta: float | mx.array = 0.5,
    alpha: float | mx.array = 0.1,
    tail: str = "renormalize",
    top_k: int = 0,
    chunk_rows: int | None = None,
) -> mx.array:
    """The divergence of ``kind`` between student logits and any teacher signal.

    Dense logits use the dense kernel; a mixture of dense teachers uses its ``log_probs(T)``;
    a top-k signal, a mixture with a top-k member (:func:`mixture_support`), or
    ``0 < top_k < V``, uses the sparse kernel with the ``tail`` policy.
    """
    if isinstance(teacher, mx.array):
        teacher = TeacherSignal(vocab_size=teacher.shape[-1], logits=teacher)
    vocab = student_logits.shape[-1]
    if teacher.is_sparse or (0 < top_k < vocab):
        ids, lp = teacher_support(teacher, temperature, tail, top_k, chunk_rows)
        return sparse_divergence(
            student_logits,
            ids,
            lp,
            mask,
            kind,
            tail=tail,
            temperature=temperature,
            beta=beta,
            alpha=alpha,
            chunk_rows=chunk_rows,
        )
    if teacher.logits is not None:
        t_logits, tt = teacher.logits, None
    else:
        t_logits, tt = teacher.log_probs(temperature), 1.0
    return dense_divergence(
        student_logits,
        t_logits,
        mask,
        kind,
        temperature=temperature,
        teacher_temperature=tt,
        beta=beta,
        alpha=alpha,
        chunk_rows=chunk_rows,
    )
