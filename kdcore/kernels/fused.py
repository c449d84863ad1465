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
traced inputs would all stay alive (memory would grow with the tokens, not with one
chunk). Two readers break that link, chosen by ``reader``:

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
from collections.abc import Callable, Iterator, Mapping, Sequence

import attrs
import mlx.core as mx
import numpy as np

from kdcore.kernels.chunked import _device, _host, _Rows, scale_own_buffer
from kdcore.kernels.divergence import dense_rows
from kdcore.kernels.kinds import _temperature, canonical
from kdcore.kernels.native import RowFn, with_row_kernel
from kdcore.signal.teacher import stable_log_softmax

# kdcore.losses.tokens.IGNORE_INDEX; kernels and losses are sibling layers, so not imported.
IGNORE_INDEX = -100
READERS = ("host", "device")
FUSED_CHUNK_ELEMENTS = 1 << 25
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
    teacher's logits, a name of ``teachers`` another teacher's (a mixture's members), any
    other name a row array of ``extras`` (e.g. ``"labels"``). ``mask`` ([...], the
    pass's leading shape) weighs this term's rows in its own mean; None: the pass's mask.
    """

    rows: RowFn
    weight: float = 1.0
    inputs: tuple[str, ...] = (TEACHER,)
    mask: mx.array | None = None


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


def cross_entropy_rows(label_smoothing: float = 0.0) -> RowFn:
    """Row function of the cross-entropy with labels: ``(scale, s [C, V], labels [C])``.

    0 at ``IGNORE_INDEX``, as ``kdcore.losses.token_cross_entropy``; with ``label_smoothing``
    ``e`` the value is ``(1 - e) nll + e mean_v(-log q_v)`` (the ``ce`` loss), whose gradient
    is ``q - (1 - e) onehot - e / V``.
    """
    smoothing = float(label_smoothing)

    def rows(scale: mx.array, s: mx.array, labels: mx.array):
        labels = labels.astype(mx.int32)
        keep = labels != IGNORE_INDEX
        safe = mx.where(keep, labels, 0)[:, None]
        lq = stable_log_softmax(s.astype(mx.float32))
        picked = mx.take_along_axis(lq, safe, axis=-1)[:, 0]
        value = mx.where(keep, -picked, 0.0)
        q = mx.exp(lq)
        onehot = mx.put_along_axis(mx.zeros_like(q), safe, mx.ones(safe.shape, q.dtype), -1)
        if not smoothing:
            return value, (q - onehot) * (scale * keep[:, None])
        vocab = s.shape[-1]
        value = (1.0 - smoothing) * value - smoothing * lq.mean(-1)
        hard = (q - onehot) * keep[:, None]
        grad = (1.0 - smoothing) * hard + smoothing * (q - 1.0 / vocab)
        return value, grad * scale

    # a native kernel registered for "cross_entropy" runs instead on the CPU
    return with_row_kernel("cross_entropy", rows, smoothing)


def fused_chunk_rows(vocab: int) -> int:
    """Rows per chunk of the fused kernel: about ``FUSED_CHUNK_ELEMENTS`` logits (128 MiB of
    float32 per ``[C, V]`` temporary), so that the head's matrix products have enough rows
    to run at BLAS speed: 220 rows at V = 151,936. The head gradient ``dW += g.T @ h`` is a
    rank-C update of the whole ``[V, D]``, slow with few rows; the size was chosen with
    ``benchmarks/real_vocab.py`` (docs/performance.md)."""
    return max(1, FUSED_CHUNK_ELEMENTS // max(vocab, 1))


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
    """Which rows each chunk holds, each term's weights in its mean, and how to read rows."""

    count: int
    denominators: list[float]

    def chunks(self) -> Iterator[tuple[object, list[mx.array], list[mx.array]]]:
        """``(rows handle, [scale [C, 1]] per term, [row weights [C]] per term)``."""
        raise NotImplementedError

    def reader(self, x: mx.array):
        """A callable ``rows handle -> rows of x`` (fresh arrays)."""
        raise NotImplementedError

    def whole(self, x: mx.array) -> mx.array:
        """``x`` itself, without graph (a head)."""
        raise NotImplementedError

    def scatter(self, buffer: mx.array, handle, rows: mx.array) -> mx.array:
        raise NotImplementedError


def _host_weights(mask: mx.array) -> np.ndarray:
    return np.asarray(mx.stop_gradient(mask).astype(mx.float32)).reshape(-1).astype(np.float64)


class _HostPlan(_Plan):
    def __init__(self, masks: list[mx.array], lead: tuple[int, ...], size: int):
        self.lead, self.size = lead, size
        self.weights = [_host_weights(m) for m in masks]
        visited = np.zeros_like(self.weights[0], dtype=bool)
        for w in self.weights:
            visited |= w != 0
        self.rows = np.flatnonzero(visited)
        self.count = len(self.rows)
        self.denominators = [max(float(w.sum()), 1.0) for w in self.weights]

    def chunks(self):
        for start in range(0, self.count, self.size):
            sub = self.rows[start : start + self.size]
            scales, row_weights = [], []
            for w_all, denominator in zip(self.weights, self.denominators):
                w = w_all[sub]
                scales.append(mx.array((w / denominator).astype(np.float32))[:, None])
                row_weights.append(mx.array(w.astype(np.float32)))
            yield sub, scales, row_weights

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
    def __init__(self, masks: list[mx.array], lead: tuple[int, ...], size: int):
        self.lead, self.n, self.size = lead, int(np.prod(lead)), size
        self.masks = [_detach(m.reshape(-1).astype(mx.float32)) for m in masks]
        keep = self.masks[0] != 0
        for m in self.masks[1:]:
            keep = keep | (m != 0)
        index = mx.arange(self.n, dtype=mx.int32)
        # Visited rows first, in order (distinct keys, so the sort order is fixed).
        self.rows = mx.argsort(mx.where(keep, index, index + self.n))
        count = keep.sum()
        totals = mx.stack([m.sum() for m in self.masks])
        mx.eval(self.rows, count, totals)
        self.count = int(count.item())
        self.denominators = [max(float(x), 1.0) for x in totals.tolist()]

    def chunks(self):
        for start in range(0, self.count, self.size):
            sub = self.rows[start : min(start + self.size, self.count)]
            row_weights = [mx.take(m, sub) for m in self.masks]
            scales = [(w / d)[:, None] for w, d in zip(row_weights, self.denominators)]
            yield sub, scales, row_weights

    def reader(self, x):
        flat = _detach(x.reshape(self.n, *x.shape[len(self.lead) :]))
        return lambda sub: mx.take(flat, sub, axis=0)

    def whole(self, x):
        return _detach(x)

    def scatter(self, buffer, sub, rows):
        buffer[sub] = rows
        return buffer


# ---------------------------------------------------------------- the fused kernel

TeacherHead = Head | Callable[[mx.array], mx.array]


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


def _check_head(who: str, head: Head, dim: int) -> int:
    w = head.weight
    if w.ndim != 2 or w.shape[1] != dim:
        raise ValueError(f"{who} head weight {w.shape} is not [V, D] with D = {dim}")
    if head.bias is not None and tuple(head.bias.shape) != (w.shape[0],):
        raise ValueError(f"{who} head bias {head.bias.shape} is not [{w.shape[0]}]")
    return w.shape[0]


def _check(
    terms: list[Term],
    student_hidden: mx.array,
    student_head: Head,
    teachers: Mapping[str, tuple[mx.array, TeacherHead | None]],
    mask: mx.array,
    extras: Mapping[str, mx.array],
) -> None:
    lead = tuple(mask.shape)
    if tuple(student_hidden.shape[:-1]) != lead:
        raise ValueError(
            f"student hidden states {student_hidden.shape} do not match the mask {mask.shape}"
        )
    vocab = _check_head("student", student_head, student_hidden.shape[-1])
    wanted = {name for term in terms for name in term.inputs}
    for name in sorted(wanted & set(teachers) | (wanted & {TEACHER})):
        who = "teacher" if name == TEACHER else f"teacher {name!r}"
        if name not in teachers:
            raise ValueError("a term reads the teacher, but no teacher hidden states were given")
        hidden, head = teachers[name]
        if tuple(hidden.shape[:-1]) != lead:
            raise ValueError(
                f"{who} hidden states {hidden.shape} do not match the mask {mask.shape}"
            )
        if head is None:
            t_vocab = hidden.shape[-1]  # the teacher's logits themselves
        elif isinstance(head, Head):
            t_vocab = _check_head(who, head, hidden.shape[-1])
        else:
            continue  # a callable head (a quantized layer): its width is checked per chunk
        if t_vocab != vocab:
            raise ValueError(
                f"student vocabulary {vocab} and {who} vocabulary {t_vocab} differ; "
                "align the vocabularies first"
            )
    for name in sorted(wanted - {TEACHER} - set(teachers)):
        if name not in extras:
            raise ValueError(f"a term reads {name!r}, which is not among the extras given")
        if tuple(extras[name].shape[: len(lead)]) != lead:
            raise ValueError(
                f"extra {name!r} {extras[name].shape} does not match the mask {mask.shape}"
            )
    for term in terms:
        if term.mask is not None and tuple(term.mask.shape) != lead:
            raise ValueError(f"a term's mask {term.mask.shape} does not match {mask.shape}")


class _TeacherRows:
    """Per chunk: a teacher's logits rows, float32, from its hidden rows and head."""

    def __init__(self, plan: _Plan, hidden: mx.array, head: TeacherHead | None, vocab: int):
        self.read = plan.reader(hidden)
        self.vocab = vocab
        self.weight = self.bias = None
        self.call = None
        if isinstance(head, Head):
            self.weight = plan.whole(head.weight).astype(mx.float32)
            if head.bias is not None:
                self.bias = plan.whole(head.bias).astype(mx.float32)
        elif head is not None:
            self.call = head

    def __call__(self, handle) -> mx.array:
        rows = self.read(handle)
        if self.call is not None:  # e.g. a quantized head: its own kernel, its own dtype
            t = mx.stop_gradient(self.call(rows)).astype(mx.float32)
            if t.shape[-1] != self.vocab:
                raise ValueError(
                    f"student vocabulary {self.vocab} and teacher vocabulary {t.shape[-1]} "
                    "differ; align the vocabularies first"
                )
            return t
        t = rows.astype(mx.float32)
        if self.weight is not None:
            t = t @ self.weight.T
            if self.bias is not None:
                t = t + self.bias
        return t


def fused_token_terms(
    terms: Sequence[Term | tuple[RowFn, float]],
    student_hidden: mx.array,
    student_head: Head,
    teacher_hidden: mx.array | None,
    teacher_head: TeacherHead | None,
    mask: mx.array,
    *,
    teachers: Mapping[str, tuple[mx.array, TeacherHead | None]] | None = None,
    extras: Mapping[str, mx.array] | None = None,
    chunk_rows: int | None = None,
    grad: bool = True,
    head_grad: bool = True,
    reader: str | None = None,
) -> tuple[mx.array, tuple[mx.array, ...]]:
    """``(total, values)``: each term's masked token mean and their weighted sum.

    ``student_hidden`` is ``[..., D]`` with leading shape ``mask.shape``; so is
    ``teacher_hidden`` (its own ``D``), or it is the teacher's logits ``[..., V]`` when
    ``teacher_head`` is None; ``teacher_head`` may also be any callable ``[C, D] -> [C, V]``
    (a quantized layer), run per chunk without gradient. ``teachers`` names further
    teachers the same way (``{name: (hidden or logits, head or None)}``), each computed
    once per chunk for every term that reads it. ``extras`` are further per-row arrays
    (leading shape ``mask.shape``) that terms name in their ``inputs``. ``mask`` weighs the
    rows of every term without a ``mask`` of its own; the pass visits the rows where any
    mask is non-zero. ``total`` is differentiable with respect to the student's hidden
    states, head weight and bias; ``values`` are float32 constants for logging (see the
    module doc). ``grad=False`` skips the gradient work (an evaluation pass;
    differentiating the result then raises); ``head_grad=False`` skips only the head's (a
    frozen head: zeros are returned for it). ``reader`` is ``"host"`` or ``"device"``
    (default: :func:`default_reader`).
    """
    terms = _terms(terms)
    extras = dict(extras or {})
    sources = dict(teachers or {})
    if teacher_hidden is not None:
        sources[TEACHER] = (teacher_hidden, teacher_head)
    _check(terms, student_hidden, student_head, sources, mask, extras)
    reader = reader or default_reader()
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; use one of {', '.join(READERS)}")
    lead = tuple(mask.shape)
    n = int(np.prod(lead))
    dim, vocab = student_hidden.shape[-1], student_head.weight.shape[0]
    size = chunk_rows or fused_chunk_rows(vocab)
    if size < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {size}")
    wanted = {name for term in terms for name in term.inputs}
    teacher_names = sorted(wanted & set(sources))
    extra_names = sorted(wanted - set(sources))
    has_bias = student_head.bias is not None
    term_masks = [mask if term.mask is None else term.mask for term in terms]

    # The primals, in order: student hidden, weight, [bias], then the constants.
    primals = [student_hidden, student_head.weight]
    if has_bias:
        primals.append(student_head.bias)
    constants: list[mx.array] = []
    layout: list[tuple[str, int]] = []  # (teacher name, how many arrays) in constants
    for name in teacher_names:
        hidden, head = sources[name]
        arrays = [hidden]
        if isinstance(head, Head):
            arrays.append(head.weight)
            if head.bias is not None:
                arrays.append(head.bias)
        constants.extend(arrays)
        layout.append((name, len(arrays)))
    constants.extend(extras[name] for name in extra_names)
    student_count = len(primals)
    held: dict[str, object] = {}

    def forward(args: list[mx.array]) -> mx.array:
        plan = (_HostPlan if reader == "host" else _DevicePlan)(term_masks, lead, size)
        h, w, *rest = args[:student_count]
        b = rest[0] if has_bias else None
        it = iter(args[student_count:])
        read_h = plan.reader(h)
        weight = plan.whole(w).astype(mx.float32)
        bias = plan.whole(b).astype(mx.float32) if has_bias else None
        read_t = {}
        for name, count in layout:
            arrays = [next(it) for _ in range(count)]
            head = sources[name][1]
            if isinstance(head, Head):
                head = Head(arrays[1], arrays[2] if count == 3 else None)
            read_t[name] = _TeacherRows(plan, arrays[0], head, vocab)
        read_x = {name: plan.reader(next(it)) for name in extra_names}

        d_hidden = mx.zeros((n, dim), mx.float32) if grad else None
        # the head's gradient starts as the first chunk's product: a zero [V, D] buffer is
        # a fill at MLX's scalar CPU speed (~0.2 s at V = 152k, D = 512)
        d_weight = None
        d_bias = mx.zeros((vocab,), mx.float32) if grad and head_grad and has_bias else None
        totals = [0.0] * len(terms)
        for handle, scales, row_weights in plan.chunks():
            hc = read_h(handle).astype(mx.float32)
            s = hc @ weight.T
            if bias is not None:
                s = s + bias
            inputs: dict[str, mx.array] = {name: r(handle) for name, r in read_x.items()}
            for name, rows in read_t.items():
                inputs[name] = rows(handle)
            values, g = [], None
            for term, scale, row_w in zip(terms, scales, row_weights):
                if grad and term.weight not in (0.0, 1.0):
                    # the term's weight rides on the [C, 1] scale: no [C, V] multiply
                    scale = scale * term.weight
                v, gi = term.rows(scale, s, *(inputs[name] for name in term.inputs))
                values.append((v * row_w).sum())
                if grad and term.weight != 0.0:
                    g = gi if g is None else g + gi
            work = list(values)
            if grad and g is not None:
                d_hidden = plan.scatter(d_hidden, handle, g @ weight)
                work.append(d_hidden)
                if head_grad and d_weight is None:
                    d_weight = g.T @ hc
                    work.append(d_weight)
                elif head_grad:
                    d_weight = mx.addmm(d_weight, g.T, hc)  # one GEMM pass (beta = 1)
                    work.append(d_weight)
                if d_bias is not None:
                    d_bias = d_bias + g.sum(0)
                    work.append(d_bias)
            mx.eval(work)
            for i, v in enumerate(values):
                totals[i] += float(v.item())
        means = [x / d for x, d in zip(totals, plan.denominators)]
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
        if d_weight is None:  # no head gradient asked for, or no row kept
            out.append(mx.zeros_like(w))
        else:  # the loop's own [V, D] buffer
            out.append(scale_own_buffer(d_weight, cotangent).astype(w.dtype))
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
