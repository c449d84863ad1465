"""Output head and token losses fused: logits exist one chunk of rows at a time.

:func:`fused_token_mean` (one row function) and :func:`fused_token_terms` (several) take
the final hidden states ``[..., D]`` of the student (and of the teacher) and each model's
output head as its weight ``[V, D]`` and optional bias ``[V]`` (:class:`Head`; a tied head
is the embedding matrix, an untied one ``lm_head``'s weight: both are just a weight). Per
chunk of ``chunk_rows`` masked rows:

- student logits ``s = h @ W.T (+ b)`` and teacher logits ``t = ht @ Wt.T (+ bt)`` (the
  teacher without gradient), float32 (bf16/fp16 hidden rows are cast per chunk, a head
  that is not float32 once per call);
- each term's row function (``kdcore.kernels.divergence.dense_rows`` and friends, same
  contract: ``rows_fn(scale [C, 1], s [C, V], *inputs) -> (values [C], scale * dd/ds)``)
  gives per-row values and the scaled gradient with respect to ``s``;
- the weighted sum ``g`` of the terms' gradients goes back through the head:
  ``dh = g @ W`` (written to the chunk's rows of one ``[N, D]`` float32 buffer),
  ``dW += g.T @ h`` and ``db += g.sum(0)`` (float32 accumulators).

So neither model's ``[N, V]`` logits nor an ``[N, V]`` gradient ever exist; a pass holds
the inputs, ``[N, D]`` + ``[V, D]`` (+ ``[V]``) of gradient, a float32 copy of a head that
is not float32, and one chunk of ``[C, V]`` temporaries. One matmul per chunk per model
serves every term.

As in ``chunked_token_mean`` (read its module's doc), the gradient is computed in the
forward and the work is wrapped in ``mx.custom_function``, whose VJP returns
``cotangent * grad`` for the student's hidden states, head weight and bias and zeros for
the teacher (and for the extra row inputs such as labels): the teacher is a constant here.
A forward-only call therefore also computes the gradient unless ``grad=False``; the kernel
cannot run under ``mx.compile``.

Reading rows without keeping the graph: inside a gradient transformation every array
derived from a traced input keeps its graph after evaluation, so chunks computed from the
traced inputs would all stay alive (measured: 530 MiB instead of 81 MiB at N = 1024,
V = 32768, D = 64). Two readers break that link, chosen by ``reader``:

- ``"host"`` (the default on a CPU device): rows are read through NumPy views of the
  evaluated inputs and copied into fresh arrays, as in ``chunked_token_mean``;
- ``"device"`` (the default on a GPU device, where the kernels must not copy arrays to the
  host): each input is evaluated once and re-imported through DLPack
  (``mx.from_dlpack``, which shares the buffer when it can), giving an array without
  graph; the masked rows are ordered on the device (an ``argsort``) and each chunk is a
  contiguous range of them gathered with ``mx.take``; only two scalars (the row count and
  the mask total) and each chunk's per-term value sums reach the host.

Several terms, one pass: :func:`fused_token_terms` takes ``(rows_fn, weight)`` pairs (or
:class:`Term`). The weights must be known in the forward: the kernel returns the weighted
total, whose gradient is exact, and each term's value *for logging only* (constants: no
gradient flows through them). Giving each term its own gradient would need one ``[V, D]``
head gradient per term; knowing the weights up front keeps one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence

import attrs
import mlx.core as mx
import numpy as np

from kdcore.kernels.divergence import (
    RowFn,
    _device,
    _host,
    _Rows,
    _temperature,
    canonical,
    default_chunk_rows,
    dense_rows,
)
from kdcore.signal.teacher import stable_log_softmax

# kdcore.losses.tokens.IGNORE_INDEX; kernels and losses are sibling layers, so not imported.
IGNORE_INDEX = -100
READERS = ("host", "device")
TEACHER = "teacher"


@attrs.frozen
class Head:
    """An output projection ``[..., D] -> [..., V]``: ``x @ weight.T (+ bias)``."""

    weight: mx.array  # [V, D]
    bias: mx.array | None = None  # [V]

    @classmethod
    def of(cls, layer) -> Head:
        """The head of an ``nn.Linear`` (untied ``lm_head``) or ``nn.Embedding`` (tied)."""
        if "scales" in layer:
            raise ValueError(
                f"{type(layer).__name__}: a quantized head has no plain weight to fuse; "
                "dequantize it first"
            )
        return cls(layer["weight"], layer.get("bias"))

    def __call__(self, hidden: mx.array) -> mx.array:
        """The unfused logits (the reference the kernel must equal)."""
        out = hidden @ self.weight.T
        return out if self.bias is None else out + self.bias


@attrs.frozen
class Term:
    """One row function of a pass, its weight in the total, and what it reads per row.

    ``inputs`` name the arrays passed after the student's logits: ``"teacher"`` is the
    teacher's logits, any other name a row array of ``extras`` (e.g. ``"labels"``).
    """

    rows: RowFn
    weight: float = 1.0
    inputs: tuple[str, ...] = (TEACHER,)


def divergence_rows(
    kind: str = "forward_kl",
    *,
    temperature: float | mx.array = 1.0,
    beta: float | mx.array = 0.5,
    alpha: float | mx.array = 0.1,
) -> RowFn:
    """``dense_rows`` of ``kind`` with both models at ``temperature`` (no ``T**2``)."""
    kind, coef = canonical(kind, beta, alpha)
    t = _temperature(temperature)
    return dense_rows(kind, coef, t, t)


def cross_entropy_rows() -> RowFn:
    """Row function of the cross-entropy with labels: ``(scale, s [C, V], labels [C])``.

    0 (value and gradient) at ``IGNORE_INDEX``, as ``kdcore.losses.token_cross_entropy``.
    """

    def rows(scale: mx.array, s: mx.array, labels: mx.array):
        labels = labels.astype(mx.int32)
        keep = labels != IGNORE_INDEX
        safe = mx.where(keep, labels, 0)[:, None]
        lq = stable_log_softmax(s.astype(mx.float32))
        picked = mx.take_along_axis(lq, safe, axis=-1)[:, 0]
        value = mx.where(keep, -picked, 0.0)
        q = mx.exp(lq)
        onehot = mx.put_along_axis(mx.zeros_like(q), safe, mx.ones(safe.shape, q.dtype), -1)
        return value, (q - onehot) * (scale * keep[:, None])

    return rows


# ---------------------------------------------------------------- row readers


def default_reader() -> str:
    """``"host"`` on a CPU default device, ``"device"`` elsewhere."""
    return "host" if mx.default_device().type == mx.cpu else "device"


_DLPACK_WARNED: list[bool] = []


def _detach(x: mx.array) -> mx.array:
    """The evaluated ``x`` as an array without graph, on the device (no host copy)."""
    x = mx.stop_gradient(x)
    mx.eval(x)
    try:
        return mx.from_dlpack(x)
    except Exception as error:  # a backend without DLPack import: correct, not bounded
        if not _DLPACK_WARNED:
            _DLPACK_WARNED.append(True)
            warnings.warn(
                f"fused kernel: mx.from_dlpack failed ({error}); under a gradient "
                "transformation every chunk's temporaries will stay alive",
                RuntimeWarning,
                stacklevel=3,
            )
        return x


class _Plan:
    """Which rows each chunk holds, their weights in the mean, and how to read rows."""

    count: int
    denominator: float

    def chunks(self) -> Iterator[tuple[object, mx.array, mx.array]]:
        """``(rows handle, scale [C, 1], row weights [C])`` per chunk."""
        raise NotImplementedError

    def reader(self, x: mx.array):
        """A callable ``rows handle -> rows of x`` (fresh arrays)."""
        raise NotImplementedError

    def whole(self, x: mx.array) -> mx.array:
        """``x`` itself, without graph (a head)."""
        raise NotImplementedError

    def scatter(self, buffer: mx.array, handle, rows: mx.array) -> mx.array:
        raise NotImplementedError


class _HostPlan(_Plan):
    def __init__(self, mask: mx.array, lead: tuple[int, ...], size: int):
        self.lead, self.size = lead, size
        weights = np.asarray(mx.stop_gradient(mask).astype(mx.float32)).reshape(-1)
        self.weights = weights.astype(np.float64)
        self.rows = np.flatnonzero(self.weights != 0)
        self.count = len(self.rows)
        self.denominator = max(float(self.weights.sum()), 1.0)

    def chunks(self):
        for start in range(0, self.count, self.size):
            sub = self.rows[start : start + self.size]
            w = self.weights[sub]
            scale = mx.array((w / self.denominator).astype(np.float32))[:, None]
            yield sub, scale, mx.array(w.astype(np.float32))

    def reader(self, x):
        rows = _Rows(mx.stop_gradient(x), self.lead)
        return rows.take

    def whole(self, x):
        x = mx.stop_gradient(x)
        mx.eval(x)
        return _device(np.ascontiguousarray(_host(x)), x.dtype)

    def scatter(self, buffer, sub, rows):
        if sub[-1] - sub[0] + 1 == len(sub):
            buffer[int(sub[0]) : int(sub[-1]) + 1] = rows
        else:
            buffer[mx.array(sub.astype(np.int32))] = rows
        return buffer


class _DevicePlan(_Plan):
    def __init__(self, mask: mx.array, lead: tuple[int, ...], size: int):
        self.lead, self.n, self.size = lead, int(np.prod(lead)), size
        self.mask = _detach(mask.reshape(-1).astype(mx.float32))
        keep = self.mask != 0
        index = mx.arange(self.n, dtype=mx.int32)
        # Masked rows first, in order (distinct keys, so the sort order is fixed).
        self.rows = mx.argsort(mx.where(keep, index, index + self.n))
        count, total = keep.sum(), self.mask.sum()
        mx.eval(self.rows, count, total)
        self.count = int(count.item())
        self.denominator = max(float(total.item()), 1.0)

    def chunks(self):
        for start in range(0, self.count, self.size):
            sub = self.rows[start : min(start + self.size, self.count)]
            w = mx.take(self.mask, sub)
            yield sub, (w / self.denominator)[:, None], w

    def reader(self, x):
        flat = _detach(x.reshape(self.n, *x.shape[len(self.lead) :]))
        return lambda sub: mx.take(flat, sub, axis=0)

    def whole(self, x):
        return _detach(x)

    def scatter(self, buffer, sub, rows):
        buffer[sub] = rows
        return buffer


# ---------------------------------------------------------------- the fused kernel


def _terms(terms) -> list[Term]:
    out = []
    for term in terms:
        if isinstance(term, Term):
            out.append(term)
        else:
            rows_fn, weight = term
            out.append(Term(rows_fn, float(weight)))
    if not out:
        raise ValueError("fused kernel: no terms given")
    return out


def _check(
    terms: list[Term],
    student_hidden: mx.array,
    student_head: Head,
    teacher_hidden: mx.array | None,
    teacher_head: Head | None,
    mask: mx.array,
    extras: Mapping[str, mx.array],
) -> None:
    lead = tuple(mask.shape)
    if tuple(student_hidden.shape[:-1]) != lead:
        raise ValueError(
            f"student hidden states {student_hidden.shape} do not match the mask {mask.shape}"
        )
    w = student_head.weight
    if w.ndim != 2 or w.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"student head weight {w.shape} is not [V, D] with D = {student_hidden.shape[-1]}"
        )
    vocab = w.shape[0]
    if student_head.bias is not None and tuple(student_head.bias.shape) != (vocab,):
        raise ValueError(f"student head bias {student_head.bias.shape} is not [{vocab}]")
    wanted = {name for term in terms for name in term.inputs}
    if TEACHER in wanted:
        if teacher_hidden is None:
            raise ValueError("a term reads the teacher, but no teacher hidden states were given")
        if tuple(teacher_hidden.shape[:-1]) != lead:
            raise ValueError(
                f"teacher hidden states {teacher_hidden.shape} do not match the mask {mask.shape}"
            )
        if teacher_head is None:
            t_vocab = teacher_hidden.shape[-1]  # the teacher's logits themselves
        else:
            tw = teacher_head.weight
            if tw.ndim != 2 or tw.shape[1] != teacher_hidden.shape[-1]:
                raise ValueError(
                    f"teacher head weight {tw.shape} is not [V, D] with "
                    f"D = {teacher_hidden.shape[-1]}"
                )
            if teacher_head.bias is not None and tuple(teacher_head.bias.shape) != (tw.shape[0],):
                raise ValueError(
                    f"teacher head bias {teacher_head.bias.shape} is not [{tw.shape[0]}]"
                )
            t_vocab = tw.shape[0]
        if t_vocab != vocab:
            raise ValueError(
                f"student vocabulary {vocab} and teacher vocabulary {t_vocab} differ; "
                "align the vocabularies first"
            )
    for name in sorted(wanted - {TEACHER}):
        if name not in extras:
            raise ValueError(f"a term reads {name!r}, which is not among the extras given")
        if tuple(extras[name].shape[: len(lead)]) != lead:
            raise ValueError(
                f"extra {name!r} {extras[name].shape} does not match the mask {mask.shape}"
            )


def fused_token_terms(
    terms: Sequence[Term | tuple[RowFn, float]],
    student_hidden: mx.array,
    student_head: Head,
    teacher_hidden: mx.array | None,
    teacher_head: Head | None,
    mask: mx.array,
    *,
    extras: Mapping[str, mx.array] | None = None,
    chunk_rows: int | None = None,
    grad: bool = True,
    head_grad: bool = True,
    reader: str | None = None,
) -> tuple[mx.array, tuple[mx.array, ...]]:
    """``(total, values)``: each term's masked token mean and their weighted sum.

    ``student_hidden`` is ``[..., D]`` with leading shape ``mask.shape``; so is
    ``teacher_hidden`` (its own ``D``), or it is the teacher's logits ``[..., V]`` when
    ``teacher_head`` is None. ``extras`` are further per-row arrays (leading shape
    ``mask.shape``) that terms name in their ``inputs``. ``total`` is differentiable with
    respect to the student's hidden states, head weight and bias; ``values`` are float32
    constants for logging (see the module doc). ``grad=False`` skips the gradient work (an
    evaluation pass; differentiating the result then raises); ``head_grad=False`` skips
    only the head's (a frozen head: zeros are returned for it). ``reader`` is ``"host"``
    or ``"device"`` (default: :func:`default_reader`).
    """
    terms = _terms(terms)
    extras = dict(extras or {})
    _check(terms, student_hidden, student_head, teacher_hidden, teacher_head, mask, extras)
    reader = reader or default_reader()
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; use one of {', '.join(READERS)}")
    lead = tuple(mask.shape)
    n = int(np.prod(lead))
    dim, vocab = student_hidden.shape[-1], student_head.weight.shape[0]
    size = chunk_rows or default_chunk_rows(vocab)
    if size < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {size}")
    wanted = {name for term in terms for name in term.inputs}
    uses_teacher = TEACHER in wanted
    extra_names = sorted(wanted - {TEACHER})
    has_bias = student_head.bias is not None
    t_bias = teacher_head is not None and teacher_head.bias is not None

    # The primals, in order: student hidden, weight, [bias], then the constants.
    primals = [student_hidden, student_head.weight]
    if has_bias:
        primals.append(student_head.bias)
    constants: list[mx.array] = []
    if uses_teacher:
        constants.append(teacher_hidden)
        if teacher_head is not None:
            constants.append(teacher_head.weight)
            if t_bias:
                constants.append(teacher_head.bias)
    constants.extend(extras[name] for name in extra_names)
    student_count = len(primals)
    held: dict[str, object] = {}

    def forward(args: list[mx.array]) -> mx.array:
        plan = (_HostPlan if reader == "host" else _DevicePlan)(mask, lead, size)
        h, w, *rest = args[:student_count]
        b = rest[0] if has_bias else None
        it = iter(args[student_count:])
        read_h = plan.reader(h)
        weight = plan.whole(w).astype(mx.float32)
        bias = plan.whole(b).astype(mx.float32) if has_bias else None
        read_t = t_weight = t_bias_v = None
        if uses_teacher:
            read_t = plan.reader(next(it))
            if teacher_head is not None:
                t_weight = plan.whole(next(it)).astype(mx.float32)
                if t_bias:
                    t_bias_v = plan.whole(next(it)).astype(mx.float32)
        read_x = {name: plan.reader(next(it)) for name in extra_names}

        d_hidden = mx.zeros((n, dim), mx.float32) if grad else None
        d_weight = mx.zeros((vocab, dim), mx.float32) if grad and head_grad else None
        d_bias = mx.zeros((vocab,), mx.float32) if grad and head_grad and has_bias else None
        totals = [0.0] * len(terms)
        for handle, scale, row_weights in plan.chunks():
            hc = read_h(handle).astype(mx.float32)
            s = hc @ weight.T
            if bias is not None:
                s = s + bias
            inputs: dict[str, mx.array] = {name: r(handle) for name, r in read_x.items()}
            if uses_teacher:
                t = read_t(handle).astype(mx.float32)
                if t_weight is not None:
                    t = t @ t_weight.T
                    if t_bias_v is not None:
                        t = t + t_bias_v
                inputs[TEACHER] = t
            values, g = [], None
            for term in terms:
                v, gi = term.rows(scale, s, *(inputs[name] for name in term.inputs))
                values.append((v * row_weights).sum())
                if grad and term.weight != 0.0:
                    gi = gi * term.weight if term.weight != 1.0 else gi
                    g = gi if g is None else g + gi
            work = list(values)
            if grad and g is not None:
                d_hidden = plan.scatter(d_hidden, handle, g @ weight)
                work.append(d_hidden)
                if d_weight is not None:
                    d_weight = d_weight + g.T @ hc
                    work.append(d_weight)
                if d_bias is not None:
                    d_bias = d_bias + g.sum(0)
                    work.append(d_bias)
            mx.eval(work)
            for i, v in enumerate(values):
                totals[i] += float(v.item())
        means = [x / plan.denominator for x in totals]
        held["values"] = means
        if grad:
            held["grads"] = (d_hidden, d_weight, d_bias)
        total = sum(term.weight * m for term, m in zip(terms, means))
        return mx.array(total, dtype=mx.float32)

    @mx.custom_function
    def kernel(*args):
        return forward(list(args))

    @kernel.vjp
    def kernel_vjp(args, cotangent, output):
        grads = held.pop("grads", None)
        if grads is None:
            raise RuntimeError(
                "fused kernel: no gradient here (called with grad=False, or its gradient "
                "was already taken once; the gradient is computed in the forward)"
            )
        d_hidden, d_weight, d_bias = grads
        h, w = args[0], args[1]
        out = [(d_hidden * cotangent).astype(h.dtype).reshape(h.shape)]
        if d_weight is None:
            out.append(mx.zeros_like(w))
        else:
            out.append((d_weight * cotangent).astype(w.dtype))
        if has_bias:
            b = args[2]
            out.append(mx.zeros_like(b) if d_bias is None else (d_bias * cotangent).astype(b.dtype))
        out.extend(mx.zeros_like(x) for x in args[student_count:])
        return tuple(out)

    total = kernel(*primals, *constants)
    values = tuple(mx.array(v, dtype=mx.float32) for v in held.pop("values"))
    return total, values


def fused_token_mean(
    rows_fn: RowFn,
    student_hidden: mx.array,
    student_head: Head,
    teacher_hidden: mx.array | None,
    teacher_head: Head | None,
    mask: mx.array,
    chunk_rows: int | None = None,
    **options,
) -> mx.array:
    """Masked token mean of one row function reading the teacher's logits (a
    :func:`fused_token_terms` with one term; ``options`` are its keywords)."""
    total, _ = fused_token_terms(
        [Term(rows_fn)],
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        mask,
        chunk_rows=chunk_rows,
        **options,
    )
    return total
