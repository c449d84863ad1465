"""On-policy distillation as TRL's GKD defines it (Agarwal et al., 2024, "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes"; ``trl``'s
``GKDTrainer``), for every token loss.

The spec's ``[train.on_policy]`` table (:class:`kdcore.spec.schema.OnPolicySection`) turns
it on. Each batch draws ``u ~ U[0, 1)``; when ``u < lmbda`` (a number or a schedule) the
batch is *on-policy*: the batch's prompts are continued by the current student (no
gradient, eval mode, up to ``max_new_tokens``, at ``temperature`` with ``top_p``, ending at a
stop token) and the batch is rebuilt as prompt + generated tokens, with ``labels`` the next
tokens and ``mask`` 1 on exactly the positions that predict a generated token (up to and
including the stop token). The step then goes on as for any batch: the teachers score the
student's continuations (their signal is computed on the new ``input_ids``) and every token
loss (``gjsd``, ``reverse_kl``, ``hinton``, ``tvd``, ``ce``...) applies to the generated
tokens. GKD's ``beta`` is the ``gjsd`` loss's; its ``seq_kd`` (training on the teacher's
samples) is ``kd sample`` followed by ``ce``.

The draw. ``u`` is a pure function of (run seed, batch number), from its own NumPy
generator: a resumed run draws what the uninterrupted one drew, every data-parallel rank
agrees on which batches are on-policy, and the draw leaves the MLX random stream (dropout,
the sampler, other losses' draws) exactly as a run without on-policy batches has it, so
``lmbda = 0`` is the off-policy run bit for bit. The continuations themselves use the MLX
random state, which the training loop seeds from (seed, step).

Prompts. A dataset that has prompts (``prompts(index, batch_size, split, max_tokens)``, e.g.
the ``chat`` dataset: everything before each record's first assistant turn) gives batch
``index``'s; otherwise each row's prompt is its tokens up to its first loss-carrying
position (that position predicts the first response token, so it is the prompt's last
token), which is exact for the ``jsonl`` prompt/response dataset; a row whose every token
carries loss (the ``text`` dataset) has no prompt and takes its first ``prompt_length``
tokens. A prompt is cut to its last ``L + 1 - max_new_tokens`` tokens, so that a sampled row
is never longer than the data's rows of ``L`` tokens.

Rows of different lengths. The sampler left-pads the prompts (its KV cache masks the
pads); the rebuilt batch is right-padded instead (pad id 0, mask 0), so that the training
forward, which has no padding mask, sees every row exactly as it would alone: causal
attention never looks at the pads after a row's last token.

The sampler, :func:`sample_continuations`, is the one ``minillm`` samples with too (in eval
mode, from the run's MLX random state). Teacher-mixed sampling (``teacher_mix_alpha = a >
0``, MiniLLM's): each token is drawn from ``(1 - a) top_p(q_T) + a top_p(p_T)``, with ``p``
the teachers aggregated and aligned as in a step. That reads the teachers at every token, on
the whole context (one forward of the student and of each teacher per token: no KV cache);
``a = 0`` samples with the core sampler (:func:`kdcore.models.sampling.generate`, KV-cached
for the built-in and mlx-lm models). The generated tokens are not importance-weighted here
(``minillm`` weighs its own): as in GKD, a token loss treats them as the data of the step.

What an on-policy batch holds: ``input_ids``, ``labels`` and ``mask`` only. A loss that needs
other keys of the dataset's rows (pairs, reasoning masks, ``example_index`` for a top-k
cache) does not apply to it; a top-k cache teacher is refused, since it holds the teacher's
log-probabilities of the dataset's own rows only.

With a loss that samples its own batches (``minillm``, which keeps its policy-gradient form
and its own ``lmbda``): the losses' ``prepare_batch`` run first; a batch one of them has
already sampled (it holds ``sample_mask``) is never sampled again. ``minillm``'s off-policy
batches may then be sampled here (its reverse KL on the student's samples, GKD's form); to
keep MiniLLM exactly, leave ``train.on_policy`` off.

Metrics: ``on_policy`` (1 on a sampled batch, else 0; with gradient accumulation, the share
of the step's micro-batches), ``sample_length`` (generated tokens per row, 0 off-policy) and,
when scheduled, ``on_policy/lmbda``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from kdcore.errors import KdError, SpecError
from kdcore.losses.inputs import StepContext
from kdcore.losses.tokens import IGNORE_INDEX, log_softmax
from kdcore.models.output import ModelOutput
from kdcore.models.sampling import generate, top_p_filter
from kdcore.signal.teacher import TeacherSignal
from kdcore.spec.schedules import Schedule, value_at

# The key a loss that samples its own batches adds (minillm's SAMPLE_MASK).
SAMPLE_MASK = "sample_mask"
# Mixed into the draw's seed: the on/off stream is its own, apart from any other stream
# drawn from (seed, batch).
DRAW_STREAM = 0x6F6E
PAD_ID = 0
PATH = "$.train.on_policy"


def enabled(section: Any) -> bool:
    """Whether any batch of the run may be on-policy (``lmbda`` a schedule or > 0)."""
    return isinstance(section.lmbda, Schedule) or section.lmbda > 0


def draw(seed: int, index: int) -> float:
    """The ``u ~ U[0, 1)`` of batch ``index``: a pure function of the seed and the index."""
    return float(np.random.default_rng([seed, index, DRAW_STREAM]).random())


def _outside(value: float, low: float, high: float, low_open: bool, high_open: bool) -> bool:
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    return below or above or not math.isfinite(value)


@functools.lru_cache(maxsize=64)
def _first_outside(
    schedule: Schedule, total: int, low: float, high: float, low_open: bool, high_open: bool
) -> tuple[int, float] | None:
    """(step, value) of the first step of the run at which ``schedule`` leaves the range:
    read once per schedule and run length (schedules compare by identity), so a run stops
    at its first batch rather than at the step the schedule goes wrong."""
    for step in range(max(1, total)):
        value = value_at(schedule, step, total)
        if _outside(value, low, high, low_open, high_open):
            return step, value
    return None


def _value(
    section: Any,
    name: str,
    step: int,
    total: int,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``section.name`` at ``step``; a schedule that leaves its range anywhere in the run
    is the spec's error."""
    raw = getattr(section, name)
    if isinstance(raw, Schedule):
        bad = _first_outside(raw, total, low, high, low_open, high_open)
        if bad is not None:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise SpecError(
                f"train.on_policy.{name} is {bad[1]:g} at step {bad[0]} (a {raw.name!r} "
                f"schedule): it must stay in {lo}{low:g}, {high:g}{hi} @ {PATH}.{name}"
            )
    return value_at(raw, step, total)


def default_stops(tokenizer: Any, dataset: Any = None) -> list[int]:
    """The end-of-sequence token of the tokenizer (or of the dataset's chat renderer), if
    either knows one."""
    for owner in (tokenizer, getattr(dataset, "renderer", None)):
        for name in ("eos_token_id", "eos_id", "eos"):
            value = getattr(owner, name, None)
            if isinstance(value, int | np.integer) and not isinstance(value, bool):
                return [int(value)]
    return []


def stop_tokens(section: Any, tokenizer: Any, dataset: Any = None) -> list[int]:
    if section.stop_tokens is not None:
        return list(section.stop_tokens)
    return default_stops(tokenizer, dataset)


def prompt_room(length: int, max_new_tokens: int) -> int:
    """The longest prompt whose continuation fits a row of ``length`` input tokens."""
    room = length + 1 - max_new_tokens
    if room < 1:
        raise SpecError(
            f"train.on_policy.max_new_tokens = {max_new_tokens} leaves no room for a prompt in "
            f"rows of {length} tokens: at most {length} @ {PATH}.max_new_tokens"
        )
    return room


def row_prompt(ids: np.ndarray, mask: np.ndarray, fallback: int, room: int) -> np.ndarray:
    """A data row's prompt: its tokens up to its first loss-carrying position (which
    predicts the first response token); a row without one (no loss, or loss from the first
    token on) takes its first ``fallback`` tokens. At most the last ``room`` tokens."""
    carried = np.flatnonzero(np.asarray(mask) > 0)
    end = int(carried[0]) + 1 if len(carried) and carried[0] > 0 else fallback
    prompt = np.asarray(ids[:end], np.int32)
    return prompt[-room:]


def rows_prompts(rows: dict[str, np.ndarray], fallback: int, room: int) -> list[np.ndarray]:
    ids, mask = np.asarray(rows["input_ids"]), np.asarray(rows["mask"])
    return [row_prompt(ids[b], mask[b], fallback, room) for b in range(len(ids))]


def batch_prompts(parts: Any, rows: dict[str, np.ndarray], index: int, fallback: int, room: int):
    """The prompts of batch ``index`` (this rank's share of them)."""
    dataset = parts.dataset
    prompts = getattr(dataset, "prompts", None)
    counts = getattr(dataset, "num_prompts", None)
    # a chat dataset of text records only has the method and no prompts: the rows' then
    if not callable(prompts) or (callable(counts) and counts("train") == 0):
        return rows_prompts(rows, fallback, room)
    every = prompts(index, parts.spec.train.batch_size, "train", max_tokens=room)
    mine = parts.dp.shard({"row": np.arange(len(every))})["row"]  # the rows' shard
    return [np.asarray(every[i], np.int32)[-room:] for i in mine]


# ---------------------------------------------------------------- sampling

# ``StepContext.teacher_signal``: the run's teachers, aggregated and aligned, for a batch.
TeacherSignalFn = Callable[[dict[str, mx.array], ModelOutput | None], TeacherSignal | None]


class Continuations(NamedTuple):
    """What :func:`sample_continuations` returns, laid out as ``kdcore.app.generate`` lays out
    its result (the prompts left-padded to a common width ``P``): ``tokens`` [B, P + N];
    ``mask`` [B, P + N], 1 on the generated tokens up to and including a row's stop token;
    ``weights`` [B, P + N], each generated token's importance weight ``q_T(y) / b(y)`` (1
    elsewhere), or None when not asked for."""

    tokens: mx.array
    mask: mx.array
    weights: mx.array | None


def sample_continuations(
    model: Any,
    prompts: mx.array | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_token: int | Collection[int] | None = None,
    *,
    teacher_signal: TeacherSignalFn | None = None,
    teacher_mix_alpha: float = 0.0,
    weights: bool = True,
    pad_id: int = PAD_ID,
    where: str = "",
) -> Continuations:
    """The on-policy sampler (``train.on_policy`` and ``minillm``): ``model``'s continuations
    of ``prompts`` (an array [B, P], or token-id rows of any lengths) by up to
    ``max_new_tokens`` tokens, ending a row at the first of the ``stop_token`` ids it draws.

    Each token is drawn from ``b = (1 - a) top_p(q_T) + a top_p(p_T)``: ``q_T`` the model at
    ``temperature``, ``a = teacher_mix_alpha``, ``p_T`` the teachers at ``temperature`` as
    ``teacher_signal(batch, model_output)`` (``StepContext.teacher_signal``) gives them for
    the context so far. With ``a = 0`` the tokens come from the core sampler
    (``kdcore.app.generate``: KV-cached for the built-in and mlx-lm models); ``a > 0`` reads the
    teachers at every token, so the model and the teachers run on the whole context per
    token, the prompts right-padded there, each row reading its own last position (causal
    attention keeps it blind to the pads after it). ``where``: the spec path that an error
    about the teachers' vocabulary names.

    ``weights``: ``q_T(y) / b(y)`` with ``q_T`` the whole softmax, read from the sampling
    forward when mixing, else from one more forward of the result when ``top_p < 1`` (all 1
    at ``top_p = 1``). The model samples in eval mode (its mode is restored afterwards),
    with the global MLX random state (the run's).
    """
    if teacher_mix_alpha > 0 and teacher_signal is None:
        raise KdError("teacher-mixed sampling (teacher_mix_alpha > 0) needs a teacher")
    training = bool(getattr(model, "training", False))
    if training:
        model.eval()  # sampling is inference: no dropout (LoRA's, mlx-lm's)
    try:
        rows = _prompt_rows(prompts)
        if teacher_mix_alpha > 0:
            return _sample_mixed(
                model,
                rows,
                max_new_tokens,
                temperature,
                top_p,
                _stops(stop_token),
                teacher_signal,
                teacher_mix_alpha,
                weights,
                pad_id,
                where,
            )
        tokens, mask = generate(
            model, prompts, max_new_tokens, temperature, top_p, stop_token, pad_id=pad_id
        )
        if not weights:
            return Continuations(tokens, mask, None)
        lengths = [len(r) for r in rows]
        w = _policy_weights(model, tokens, mask, lengths, temperature, top_p, pad_id)
        mx.eval(w)
        return Continuations(tokens, mask, w)
    finally:
        if training:
            model.train()


def _prompt_rows(prompts: mx.array | Sequence[Sequence[int]]) -> list[np.ndarray]:
    if isinstance(prompts, mx.array):
        return list(np.array(prompts))
    return [np.asarray(p, dtype=np.int32) for p in prompts]  # as generate pads them


def _stops(stop_token: int | Collection[int] | None) -> list[int]:
    if stop_token is None:
        return []
    if isinstance(stop_token, int | np.integer):
        return [int(stop_token)]
    return [int(t) for t in stop_token]


def _picked(log_probs: mx.array, ids: mx.array) -> mx.array:
    return mx.take_along_axis(log_probs, ids, axis=-1)


def _policy_weights(
    model: Any,
    tokens: mx.array,
    mask: mx.array,
    lengths: list[int],
    temperature: float,
    top_p: float,
    pad_id: int,
) -> mx.array:
    """``q_T(y) / top_p(q_T)(y)`` on the generated tokens of ``tokens`` (left-padded), 1
    elsewhere: the behaviour of the plain sampler is ``top_p(q_T)``."""
    ones = mx.ones(tokens.shape, dtype=mx.float32)
    width = max(lengths)
    if top_p >= 1.0 or tokens.shape[1] == width:
        return ones
    context = tokens[:, :-1]
    if min(lengths) == width:
        logits = model(context).logits[:, width - 1 :, :]
    else:
        # A plain forward has no padding mask: each row is read right-aligned (its own
        # positions from 0, the pads after it), where y_j was predicted at len - 1 + j.
        host = np.array(context)
        shifted = np.full_like(host, pad_id)
        for b, n in enumerate(lengths):
            shifted[b, : host.shape[1] - (width - n)] = host[b, width - n :]
        at = np.array(lengths)[:, None] - 1 + np.arange(tokens.shape[1] - width)[None, :]
        logits = model(mx.array(shifted)).logits
        logits = mx.take_along_axis(logits, mx.array(at)[..., None], axis=1)
    logits = logits.astype(mx.float32) / temperature
    y = tokens[:, width:, None]
    w = mx.exp(
        _picked(log_softmax(logits), y) - _picked(log_softmax(top_p_filter(logits, top_p)), y)
    )[..., 0]
    return mx.concatenate([ones[:, :width], mx.where(mask[:, width:] > 0, w, 1.0)], axis=1)


def _sample_mixed(
    model: Any,
    rows: list[np.ndarray],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stops: list[int],
    teacher_signal: TeacherSignalFn,
    alpha: float,
    weights: bool,
    pad_id: int,
    where: str,
) -> Continuations:
    """Teacher-mixed continuations (:func:`sample_continuations` with ``a > 0``)."""
    B = len(rows)
    lengths = np.array([len(r) for r in rows])
    width = int(lengths.max())
    dtype = rows[0].dtype
    buffer = np.full((B, width + max(max_new_tokens, 0)), pad_id, dtype)
    for b, r in enumerate(rows):
        buffer[b, : len(r)] = r
    tokens = mx.array(buffer)
    stop_ids = mx.array(stops, dtype=mx.int32) if stops else None
    alive = mx.ones((B,), dtype=mx.bool_)
    made: list[mx.array] = []
    drawn: list[mx.array] = []
    mix = (math.log1p(-alpha), math.log(alpha))
    for n in range(max_new_tokens):
        ids = tokens[:, : width + n]
        last = mx.array(lengths - 1 + n)[:, None, None]
        out = model(ids)
        logits = mx.take_along_axis(out.logits, last, axis=1)[:, 0, :].astype(mx.float32)
        logits = logits / temperature
        log_q = log_softmax(top_p_filter(logits, top_p))
        batch = {
            "input_ids": ids,
            "labels": mx.full(ids.shape, IGNORE_INDEX, dtype=mx.int32),
            "mask": mx.ones(ids.shape, dtype=mx.float32),
        }
        signal = teacher_signal(batch, out)
        if signal is None:
            raise KdError("teacher-mixed sampling (teacher_mix_alpha > 0) needs a teacher")
        teacher = mx.take_along_axis(signal.log_probs(temperature), last, axis=1)[:, 0, :]
        if teacher.shape[-1] != log_q.shape[-1]:
            raise SpecError(
                f"teacher-mixed sampling: the teachers' vocabulary ({teacher.shape[-1]}) is "
                f"not the student's ({log_q.shape[-1]}); use an aligner that maps them"
                + (f" @ {where}" if where else "")
            )
        log_p = log_softmax(top_p_filter(teacher.astype(mx.float32), top_p))
        log_b = mx.logaddexp(log_q + mix[0], log_p + mix[1])
        nxt = mx.random.categorical(log_b, axis=-1)
        at = mx.array(lengths + n)[:, None]
        tokens = mx.put_along_axis(tokens, at, nxt[:, None].astype(tokens.dtype), axis=1)
        made.append(alive)
        if weights:
            y = nxt[:, None]
            w = mx.exp(_picked(log_softmax(logits), y) - _picked(log_b, y))[:, 0]
            drawn.append(mx.where(alive, w, 1.0))
        if stop_ids is not None:
            stopped = (nxt[:, None].astype(mx.int32) == stop_ids[None, :]).any(axis=1)
            alive = mx.logical_and(alive, mx.logical_not(stopped))
        mx.eval(tokens, alive, *drawn[-1:])
        if stop_ids is not None and not alive.any().item():
            break
    # back to the plain sampler's layout: prompts left-padded, step j in column width + j
    steps, host = len(made), np.array(tokens)
    out_tokens = np.full((B, width + steps), pad_id, dtype)
    for b, n in enumerate(lengths):
        out_tokens[b, width - n :] = host[b, : n + steps]
    gen = mx.zeros((B, width + steps), dtype=mx.float32)
    w_all = mx.ones((B, width + steps), dtype=mx.float32) if weights else None
    if steps:
        gen[:, width:] = mx.stack(made, axis=1).astype(mx.float32)
        if w_all is not None:
            w_all[:, width:] = mx.stack(drawn, axis=1)
    return Continuations(mx.array(out_tokens), gen, w_all)


def continue_prompts(
    model: Any,
    prompts: Sequence[np.ndarray],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stops: Sequence[int] = (),
    *,
    teacher_signal: TeacherSignalFn | None = None,
    teacher_mix_alpha: float = 0.0,
) -> list[np.ndarray]:
    """Each prompt's continuation by ``model`` (:func:`sample_continuations`, no importance
    weights): the generated tokens up to and including the first stop token."""
    width = max(len(p) for p in prompts)
    tokens, made, _ = sample_continuations(
        model,
        [p.tolist() for p in prompts],
        max_new_tokens,
        temperature,
        top_p,
        list(stops) or None,
        teacher_signal=teacher_signal,
        teacher_mix_alpha=teacher_mix_alpha,
        weights=False,
        where=f"{PATH}.teacher_mix_alpha",
    )
    tokens, made = np.array(tokens)[:, width:], np.array(made)[:, width:]
    return [tokens[b][made[b] > 0].astype(np.int32) for b in range(len(prompts))]


def assemble(prompts: Sequence[np.ndarray], generated: Sequence[np.ndarray]) -> dict:
    """The rebuilt batch: prompt + generated tokens per row, right-padded; ``labels`` the
    next tokens and ``mask`` 1 where a generated token is predicted (``IGNORE_INDEX`` and 0
    elsewhere)."""
    B = len(prompts)
    width = max(len(p) + len(g) for p, g in zip(prompts, generated))
    ids = np.full((B, width), PAD_ID, np.int32)
    carries = np.zeros((B, width), bool)
    for b, (p, g) in enumerate(zip(prompts, generated)):
        ids[b, : len(p)] = p
        ids[b, len(p) : len(p) + len(g)] = g
        carries[b, len(p) : len(p) + len(g)] = True
    labels = np.where(carries[:, 1:], ids[:, 1:], IGNORE_INDEX).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "labels": labels,
        "mask": carries[:, 1:].astype(np.float32),
    }


# ---------------------------------------------------------------- the engine's call


def _check(parts: Any, section: Any) -> None:
    """What the spec alone cannot say is wrong: checked at every batch (it is cheap), so
    the first batch of a run stops it before anything is trained."""
    for i, ref in enumerate(parts.spec.teachers):
        if ref.source_name == "cache":
            raise SpecError(
                "on-policy batches (train.on_policy.lmbda > 0) are the student's own tokens, "
                "which a top-k cache does not hold (it is read by dataset row): use the "
                f"teacher's model (path = ...) @ $.teachers[{i}].cache"
            )
    mixing = section.teacher_mix_alpha
    if (isinstance(mixing, Schedule) or mixing > 0) and not parts.teachers:
        raise SpecError(
            "teacher-mixed sampling needs a teacher and the spec has none "
            f"@ {PATH}.teacher_mix_alpha"
        )


def sample_batch(
    parts: Any,
    rows: dict[str, np.ndarray],
    batch: dict[str, mx.array],
    context: StepContext,
    index: int,
    info: dict | None = None,
) -> dict[str, mx.array]:
    """``batch`` (batch number ``index``, made from the dataset's ``rows``), or, when its
    draw says so, the student's continuations of its prompts (module docstring). ``info``
    (a dict) receives the step metrics ``on_policy``, ``sample_length`` and, when
    scheduled, ``on_policy/lmbda``."""
    section = parts.spec.train.on_policy
    if not enabled(section):
        return batch
    _check(parts, section)
    step, total = context.step, context.total_steps
    lmbda = _value(section, "lmbda", step, total, 0.0, 1.0)
    # every schedule is read here, sampled batch or not: one that goes wrong stops the run
    # at its first batch
    settings = (
        _value(section, "temperature", step, total, 0.0, math.inf, low_open=True),
        _value(section, "top_p", step, total, 0.0, 1.0, low_open=True),
        _value(section, "teacher_mix_alpha", step, total, 0.0, 1.0, high_open=True),
    )
    room = prompt_room(np.asarray(rows["input_ids"]).shape[1], section.max_new_tokens)
    metrics = {"on_policy": mx.array(0.0), "sample_length": mx.array(0.0)}
    if isinstance(section.lmbda, Schedule):
        metrics["on_policy/lmbda"] = mx.array(lmbda)
    sampled = SAMPLE_MASK not in batch and draw(parts.spec.run.seed, index) < lmbda
    if sampled:
        batch = _sampled(parts, section, rows, context, index, room, *settings)
        generated = batch["mask"].sum() / batch["mask"].shape[0]
        metrics.update(on_policy=mx.array(1.0), sample_length=generated)
    if info is not None:
        info.update(metrics)
    return batch


def _sampled(
    parts: Any,
    section: Any,
    rows: dict[str, np.ndarray],
    context: StepContext,
    index: int,
    room: int,
    temperature: float,
    top_p: float,
    alpha: float,
) -> dict[str, mx.array]:
    max_new = section.max_new_tokens
    prompts = batch_prompts(parts, rows, index, min(section.prompt_length, room), room)
    stops = stop_tokens(section, parts.tokenizer, parts.dataset)
    generated = continue_prompts(
        parts.student,
        prompts,
        max_new,
        temperature,
        top_p,
        stops,
        teacher_signal=context.teacher_signal if alpha > 0 else None,
        teacher_mix_alpha=alpha,
    )
    dtype = mx.array(np.asarray(rows["input_ids"])[:1, :1]).dtype
    built = assemble(prompts, generated)
    return {
        "input_ids": mx.array(built["input_ids"]).astype(dtype),
        "labels": mx.array(built["labels"]),
        "mask": mx.array(built["mask"]),
    }
