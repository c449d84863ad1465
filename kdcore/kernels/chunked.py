"""The chunked custom-VJP machinery: a masked token mean whose forward and gradient hold
one chunk of ``[rows, V]`` temporaries at a time.

How memory stays bounded: :func:`chunked_token_mean` runs over the flattened tokens whose
mask is non-zero, ``chunk_rows`` at a time. Each chunk computes its per-row values *and*
their gradient with respect to the student's logits (a row function's closed form), is
evaluated, and its gradient rows are written into one preallocated float32 buffer, so
forward and backward together hold the inputs, that gradient buffer and one chunk of
``[chunk_rows, V]`` temporaries. The work is wrapped in ``mx.custom_function`` whose VJP
hands back ``cotangent * buffer``.

Two MLX details make this work. Inside a gradient transformation an evaluated array keeps
its graph when its inputs are traced, and every array keeps its graph while a VJP runs, so
evaluating chunks there would keep all of them alive. The forward therefore reads the rows of
each chunk through a NumPy view of the (evaluated) input and copies them into fresh arrays
outside the trace, and the gradient is computed in the forward, not in the VJP. The price:
a forward-only call also computes the gradient, and the kernels cannot run under
``mx.compile``. The teacher is treated as a function too: its cotangent (for learnable
aggregators) is built lazily from the plain formulation and only evaluated when needed,
without the memory bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from kdcore.kernels.native import RowFn, _on_cpu, is_native

# One chunk holds about this many float32 elements per [rows, V] temporary (16 MiB).
CHUNK_ELEMENTS = 1 << 22


def _masked_mean(values: mx.array, mask: mx.array) -> mx.array:
    mask = mask.astype(mx.float32)
    return (values.astype(mx.float32) * mask).sum() / mx.maximum(mask.sum(), 1.0)


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


def scale_own_buffer(buffer: mx.array, cotangent: mx.array) -> mx.array:
    """``cotangent * buffer`` for a scalar cotangent and an evaluated float32 ``buffer``
    that nothing else holds (a kernel's own gradient buffer), in place on a CPU device.

    NumPy's vectorised multiply runs at memory speed where MLX's Linux CPU kernel is
    scalar; the product is the same float32 rounding. A cotangent of exactly 1 (an
    unweighted loss) costs nothing.
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
