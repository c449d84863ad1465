"""The training loop, mlx-lm style: every part is passed in, files are a callback's job.

Stages run in order, each with its own parameter groups and a fresh optimizer. Randomness
(sampling, dropout) is a function of (seed, step), so a resumed run draws exactly what the
uninterrupted one drew.

The first SIGINT (Ctrl-C) or SIGTERM asks the loop to stop: the step in progress ends, a
checkpoint is saved and :class:`kdcore.errors.RunInterrupted` is raised (``kd distill``
prints the command that resumes). A second one ends the process at once, even inside a
step, saving nothing more; so does the first once a stated time has passed
(:class:`StopRequest`). A served teacher that stays down
(:class:`kdcore.errors.ServerError`) stops the run the same way: the state of the last
finished step is saved and the error says how to resume.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from kdcore.engine.build import Parts
from kdcore.engine.evaluate import eval_teacher, evaluate
from kdcore.engine.optim import build_optimizer, freeze_paths, plan_groups, set_learning_rate
from kdcore.engine.prefetch import Lookahead
from kdcore.engine.progress import Progress
from kdcore.engine.step import first_non_finite, gradients
from kdcore.errors import NonFiniteLossError, NonFiniteStateError, RunInterrupted, ServerError
from kdcore.kernels.native import native_kernel
from kdcore.models import lora, quantize
from kdcore.models.io import count_parameters
from kdcore.protocols import AfterStep, Learnable
from kdcore.spec.schedules import scheduled_fields, value_at
from kdcore.spec.schema import Stage


@attrs.frozen
class RunInfo:
    """What a run callback's ``on_start`` is told: the run folder, the spec, the steps."""

    output: Any
    spec: Any
    total_steps: int


@attrs.frozen
class Resume:
    """Where a resumed run starts: its step, and the stage and optimizer state saved then."""

    step: int = 0
    stage: int = 0
    optimizer: Any = None


SaveCheckpoint = Callable[..., Any]


def stages(spec) -> list[Stage]:
    if spec.train.stages:
        return [
            attrs.evolve(s, param_groups=s.param_groups or spec.train.param_groups)
            for s in spec.train.stages
        ]
    return [Stage(steps=spec.train.steps, name="main", param_groups=spec.train.param_groups)]


def stage_optimizer(parts: Parts, stage: Stage):
    """A fresh optimizer over what trains in ``stage`` (groups planned, the rest frozen)."""
    trainable, spec = parts.trainable, parts.spec
    trainable.unfreeze()
    lora.refreeze(parts.student)  # a LoRA student trains its adapters only
    quantize.refreeze(parts.student, stage.param_groups)  # a quantized one its scales
    aggregator = getattr(trainable, "aggregator", None)
    if isinstance(aggregator, Learnable) and not aggregator.learnable:
        aggregator.freeze()
    section = spec.train.optimizer
    decay = section.weight_decay if isinstance(section.weight_decay, (int, float)) else 0.0
    plan = plan_groups(trainable, stage.param_groups, spec.train.no_decay, decay)
    freeze_paths(trainable, plan.frozen)
    # Re-plan over what is trainable now (frozen modules such as fixed weights drop out).
    plan = plan_groups(_TrainableView(trainable), stage.param_groups, spec.train.no_decay, decay)
    adam = native_kernel("adam")  # the run's (build_parts installed it); None if pure
    optimizer = build_optimizer(section, plan, value_at(section.lr, 0, parts.total), adam)
    optimizer.init(trainable.trainable_parameters())
    return optimizer, plan


class _TrainableView:
    """Adapter so plan_groups sees only trainable parameters."""

    def __init__(self, module):
        self.module = module

    def parameters(self):
        return self.module.trainable_parameters()


def loss_record(built) -> dict:
    """A loss as summary.json lists it: what it is, its path, and the keys of its scheduled
    weight and parameters in metrics.jsonl (``kd report`` plots those as schedules)."""
    schedules = [] if isinstance(built.weight, (int, float)) else [f"weight/{built.label}"]
    schedules += [f"{built.label}/{name}" for name in scheduled_fields(built.config)]
    return {"label": built.label, "name": built.name, "path": built.path, "schedules": schedules}


def schedule_values(parts: Parts, step: int) -> dict[str, float]:
    values = {}
    for built in parts.losses:
        if not isinstance(built.weight, (int, float)):
            values[f"weight/{built.label}"] = built.weight_at(step, parts.total)
        for name, sched in scheduled_fields(built.config).items():
            values[f"{built.label}/{name}"] = value_at(sched, step, parts.total)
    return values


def run_eval(parts: Parts) -> dict:
    """The one evaluation on the val split, ``eval.batches`` batches of ``batch_size``."""
    spec = parts.spec
    batches = parts.dataset.batches(spec.train.batch_size, "val", spec.eval.batches)
    return evaluate(parts.student, eval_teacher(parts.teachers), batches)


class StopRequest:
    """While active (a ``with`` block in the main thread): SIGINT and SIGTERM set
    ``signum`` instead of killing the process, so the loop saves a checkpoint after the step
    in progress. A signal the process was started ignoring (``nohup``, a background job)
    stays ignored.

    A step is one MLX evaluation, and Python runs a signal handler only once it returns. So
    a watcher thread (MLX releases the GIL while it evaluates) reads the signals from
    ``signal.set_wakeup_fd``: a second signal ends the process at once, and so does the
    first once ``grace_s`` seconds pass without the loop finishing; the exit status is 128
    plus the signal's number. The last checkpoint written stands: checkpoints are renamed
    into place whole. ``grace_s``: ``KD_STOP_GRACE_S``, else three times the longest step
    so far and at least 60 s."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    MIN_GRACE_S = 60.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self.longest_step_s = 0.0
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, int] | None = None
        self._old_wakeup = -1
        self._done = threading.Event()

    @property
    def grace_s(self) -> float:
        stated = os.environ.get("KD_STOP_GRACE_S")
        if stated:
            try:
                return max(1.0, float(stated))
            except ValueError:
                pass
        return max(self.MIN_GRACE_S, 3.0 * self.longest_step_s)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            previous = signal.getsignal(sig)
            if previous is not signal.SIG_IGN:
                # None: a handler not installed from Python; the default is the nearest
                self._previous[sig] = signal.SIG_DFL if previous is None else previous
                signal.signal(sig, self._handle)
        if self._previous:
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._old_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            self._wakeup = (read, write)
            threading.Thread(target=self._watch, args=(read,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            self._done.set()
            read, write = self._wakeup
            os.close(write)  # the watcher sees the end of the pipe and returns
            self._wakeup = None
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _watch(self, read: int) -> None:
        first, deadline = None, None
        try:
            while not self._done.is_set():
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([read], [], [], timeout)
                if self._done.is_set():
                    return
                if not ready:  # the stated time passed after the first signal
                    os.write(2, b"\nthe step did not finish in time: stopping now\n")
                    os._exit(128 + first)
                data = os.read(read, 64)
                if not data:
                    return
                for signum in (b for b in data if b in self.SIGNALS):
                    if first is not None:
                        name = signal.Signals(signum).name
                        os.write(2, f"\n{name} again: stopping now\n".encode())
                        os._exit(128 + signum)
                    first, grace = signum, self.grace_s
                    deadline = time.monotonic() + grace
                    # os.write, not print: the progress bar may be writing to stderr
                    os.write(
                        2,
                        f"\n{signal.Signals(signum).name}: saving a checkpoint after this "
                        f"step (again, or after {grace:.0f} s: stop at once; the last "
                        "checkpoint stands)\n".encode(),
                    )
        finally:
            os.close(read)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and self._wakeup is None:
            raise KeyboardInterrupt
        self.signum = self.signum or signum


def _save(
    save_checkpoint: SaveCheckpoint,
    step: int,
    stage_index: int,
    optimizer,
    reason=None,
    write: bool = True,
):
    """``save_checkpoint``, a refused non-finite state turned into the run's error
    (``write`` False: only the check, for a final checkpoint the run does not keep)."""
    try:
        if not write:
            return save_checkpoint(step, stage_index, optimizer, reason=reason, write=False)
        return save_checkpoint(step, stage_index, optimizer, reason=reason)
    except NonFiniteStateError as exc:
        raise NonFiniteLossError(
            step, "parameters", float("nan"), None, resume_from=exc.last_finite
        ) from None


def _stop_non_finite(save_checkpoint, step: int, stage_index: int, optimizer, bad) -> None:
    """Save the state before step ``step`` (the parameters it started from) and stop."""
    reason = "non-finite gradients" if bad[0] == "gradients" else "non-finite loss"
    try:
        path = save_checkpoint(step, stage_index, optimizer, reason=reason)
    except NonFiniteStateError as exc:
        # The parameters were non-finite before this step: nothing to save; the newest
        # checkpoint on disk is finite (non-finite ones are never written).
        raise NonFiniteLossError(
            step + 1, bad[0], bad[1], None, resume_from=exc.last_finite
        ) from None
    raise NonFiniteLossError(step + 1, bad[0], bad[1], str(path))


def _server_down(
    exc: ServerError, save_checkpoint, step: int, stage_index: int, optimizer, info: RunInfo
) -> ServerError:
    """A served teacher stayed down: save the state of the last finished step (nothing when
    this process ran no step: the newest checkpoint stands) and say how to resume."""
    saved = None
    if optimizer is not None:
        saved = _save(save_checkpoint, step, stage_index, optimizer, reason="teacher server")
    return exc.stopped(step, saved and str(saved), str(info.output))


def train(
    parts: Parts,
    *,
    info: RunInfo,
    callbacks: list[Any],
    save_checkpoint: SaveCheckpoint,
    resume: Resume | None = None,
    progress: bool | None = None,
) -> dict:
    """Train ``parts`` to the end; returns the summary (callbacks' ``on_end`` get it)."""
    spec, total = parts.spec, parts.total

    def emit(event: str, *args) -> None:
        for cb in callbacks:
            method = getattr(cb, event, None)  # every RunCallback method is optional
            if method is not None:
                method(*args)

    start_step = resume.step if resume else 0
    restored = resume
    emit("on_start", info)
    bar = Progress(total, spec.run.name, parts.dp.log_stream(), enabled=progress)
    last_terms: dict[str, float] = {}
    # every position the student read, and those carrying loss (kdcore.engine.step.TokenCounts)
    tokens_seen, loss_tokens_seen, train_seconds = 0, 0, 0.0
    step = start_step
    stage_end = 0
    saved = None  # the newest checkpoint this run wrote
    stage_index, optimizer = 0, None  # the stage running, and its optimizer once made
    keep_final = spec.train.final_checkpoint or learns_beside_student(parts)
    ahead = Lookahead(parts)  # a served teacher's requests for the next batches
    with StopRequest() as stop:
        try:
            for stage_index, stage in enumerate(stages(spec)):
                stage_end += stage.steps
                if step >= stage_end:
                    continue
                optimizer, plan = stage_optimizer(parts, stage)
                if restored is not None and restored.stage == stage_index:
                    optimizer.state = restored.optimizer
                    restored = None
                while step < stage_end:
                    t0 = time.perf_counter()
                    mx.random.seed(parts.dp.seed(spec.run.seed * 1_000_003 + step))
                    lr_value = stage.lr if stage.lr is not None else spec.train.optimizer.lr
                    lr = value_at(lr_value, step, total)
                    set_learning_rate(optimizer, plan, lr)
                    ahead.before_step(step)
                    total_loss, terms, metrics, grads, ntok = parts.dp.reduce_step(
                        *gradients(parts, step)
                    )
                    grad_norm = None
                    if spec.train.grad_clip:
                        grads, grad_norm = optim.clip_grad_norm(grads, spec.train.grad_clip)
                        metrics["grad_norm"] = grad_norm
                    # The norm is non-finite exactly when a gradient is (or they overflow):
                    # checking it is free; without clipping every gradient is checked.
                    bad = first_non_finite(
                        total_loss, terms, grads if grad_norm is None else grad_norm
                    )
                    if bad is not None:
                        _stop_non_finite(save_checkpoint, step, stage_index, optimizer, bad)
                    optimizer.update(parts.trainable, grads)
                    mx.eval(parts.trainable.parameters(), optimizer.state, metrics)
                    for teacher in parts.teachers:
                        if isinstance(teacher, AfterStep):
                            teacher.after_step(parts.student, step, total)
                    step += 1
                    dt = time.perf_counter() - t0
                    stop.longest_step_s = max(stop.longest_step_s, dt)
                    tokens_seen += ntok.tokens
                    loss_tokens_seen += ntok.loss_tokens
                    train_seconds += dt
                    last_terms = {k: v.item() for k, v in terms.items()}
                    if step % spec.train.log_every == 0 or step == total or step == start_step + 1:
                        record = {
                            "step": step,
                            "stage": stage.name or stage_index,
                            "loss": total_loss.item(),
                            **{f"loss/{k}": v for k, v in last_terms.items()},
                            **{k: v.item() for k, v in metrics.items()},
                            "lr": lr,
                            **schedule_values(parts, step - 1),  # the values this step used
                            # both rates, named: all tokens read, and those with a loss
                            "tokens_per_s": ntok.tokens / dt,
                            "loss_tokens_per_s": ntok.loss_tokens / dt,
                            "step_s": dt,
                            **ahead.record(),
                        }
                        emit("on_log", step, record)
                        rates = (
                            f"{ntok.tokens / dt:,.0f} tok/s {ntok.loss_tokens / dt:,.0f} loss_tok/s"
                        )
                        if "server/wait_s" in record:
                            rates += (
                                f" server {record.get('server/tokens_per_s', 0):,.0f} tok/s "
                                f"waited {record['server/wait_s']:.3f} s"
                            )
                        bar.update(step, f"loss {record['loss']:.4f} {rates}", True)
                    else:
                        bar.update(step, f"loss {total_loss.item():.4f}")
                    if spec.eval.every and step % spec.eval.every == 0 and step < total:
                        emit("on_eval", step, run_eval(parts))
                    every = spec.train.checkpoint_every
                    due = (every and step % every == 0) or step == stage_end
                    if due and step == total and not keep_final and stop.signum is None:
                        # student/ is the product; a non-finite one is still refused
                        _save(save_checkpoint, step, stage_index, optimizer, write=False)
                    elif due:
                        saved = _save(save_checkpoint, step, stage_index, optimizer)
                    elif stop.signum is not None:
                        saved = _save(
                            save_checkpoint, step, stage_index, optimizer, reason="interrupted"
                        )
                    if stop.signum is not None:
                        raise RunInterrupted(step, str(saved), str(info.output), stop.signum)
        except ServerError as exc:
            raise _server_down(exc, save_checkpoint, step, stage_index, optimizer, info) from None
        finally:
            ahead.close()  # no request is sent for a batch no step will read
            bar.close()
        try:
            eval_record = run_eval(parts)
        except ServerError as exc:
            raise _server_down(exc, save_checkpoint, step, stage_index, optimizer, info) from None
        if stop.signum is not None:  # during the final evaluation: the last checkpoint holds
            raise RunInterrupted(step, saved and str(saved), str(info.output), stop.signum)
        emit("on_eval", step, eval_record)
        # the run is complete: a signal from here on waits for the student and summary
        summary = {
            "run": spec.run.name,
            "steps": step,
            "final_losses": last_terms,
            "eval": eval_record,
            "wall_seconds": train_seconds,
            "tokens_per_s": tokens_seen / train_seconds if train_seconds else None,
            "loss_tokens_per_s": loss_tokens_seen / train_seconds if train_seconds else None,
            "student_parameters": count_parameters(parts.student),
            "teacher_parameters": [t.num_parameters for t in parts.teachers],
            "trainable_parameters": sum(
                v.size for _, v in tree_flatten(parts.trainable.trainable_parameters())
            ),
            "init": parts.init_report,
            "losses": [loss_record(b) for b in parts.losses],
            # MLX's allocator peak and the process's peak resident memory, whole run
            "peak_memory_bytes": mx.get_peak_memory(),
            "peak_rss_bytes": peak_rss_bytes(),
            **ahead.summary(),
        }
        emit("on_end", summary)
    return summary


def learns_beside_student(parts: Parts) -> bool:
    """Whether the run has parameters outside the student (a learnable aggregator or loss):
    student/ does not hold them, so the final checkpoint is kept whatever
    ``train.final_checkpoint`` says (``kdcore.app.open_run`` reads them from it)."""
    aggregator = getattr(parts.trainable, "aggregator", None)
    fixed = isinstance(aggregator, Learnable) and not aggregator.learnable  # never trains
    return any(
        not k.startswith("student.") and not (fixed and k.startswith("aggregator."))
        for k, _ in tree_flatten(parts.trainable.parameters())
    )


def peak_rss_bytes() -> int:
    """The process's peak resident set size (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
