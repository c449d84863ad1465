"""The run folder of ``kd distill``: the resolved spec, metrics, checkpoints, the student
and the summary. ``RunDir`` is the engine's built-in run callback; the loop knows nothing
of files."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx

from kdcore.engine import checkpoint as ckpt
from kdcore.engine.build import Parts, build_parts
from kdcore.engine.loop import stages
from kdcore.errors import CheckpointError
from kdcore.io import TEMPORARY, atomic_path, read_json, remove_temporaries, write_json
from kdcore.models.io import load_model, save_model
from kdcore.models.quantize import summary as quantize_summary
from kdcore.models.save import save_student as save_special_student
from kdcore.protocols import HasState
from kdcore.spec.load import load_spec, spec_to_dict
from kdcore.spec.schema import RunSpec
from kdcore.spec.tomlwrite import dumps as toml_dumps
from kdcore.tokenizers.simple import save_tokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# Settings that change how a run is logged, checkpointed, evaluated or named, or how long it
# runs, but not the path it takes: a resume may change them.
# How a step is computed, not what: the fused loss path and layer checkpointing give the
# same trajectory (to float32 rounding), so a run may resume with either.
_UNHASHED_TRAIN = (
    "steps",
    "checkpoint_every",
    "keep_checkpoints",
    "final_checkpoint",
    "log_every",
    "fused_loss",
    "checkpoint_layers",
)


def trajectory(data: dict) -> dict:
    """The part of a resolved spec (as plain data) that determines the training trajectory:
    all but ``train.steps`` (so a resume can train longer), the logging, checkpoint and
    evaluation settings, ``train.fused_loss`` and ``train.checkpoint_layers``, the metric
    sinks, and the run's name and output."""
    data = json.loads(json.dumps(data, default=str))
    run = data.pop("run", None) or {}
    data["run"] = {"seed": run.get("seed", 0)}
    train = data.get("train") or {}
    for key in _UNHASHED_TRAIN:
        train.pop(key, None)
    # Fields added after runs existed, at the value that keeps the old trajectory, are left
    # out, so those runs stay resumable: sampling off, float32 weights, no per-layer widths.
    on_policy = train.get("on_policy")
    if isinstance(on_policy, dict) and on_policy.get("lmbda") in (0, 0.0):
        train.pop("on_policy")
    params = ((data.get("student") or {}).get("model") or {}).get("params") or {}
    if params.get("dtype") == "float32" and data["student"]["model"].get("name") == "transformer":
        params.pop("dtype")
    init = (data.get("student") or {}).get("init") or {}
    if init.get("name") == "quantize" and (init.get("params") or {}).get("layers") == []:
        init["params"].pop("layers")
    data.pop("eval", None)
    data.pop("callbacks", None)
    return data


def spec_hash(data: dict) -> str:
    """Hash of :func:`trajectory`: what a resumed run must share with the one it resumes."""
    return hashlib.sha256(json.dumps(trajectory(data), sort_keys=True).encode()).hexdigest()[:16]


def _legacy_hash(data: dict) -> str:
    """The hash runs made before ``spec_hash`` left out train.steps carry (still resumable)."""
    data = json.loads(json.dumps(data, default=str))
    data.pop("run", None)
    data.get("train", {}).pop("checkpoint_every", None)
    data.pop("eval", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1]}}`` -> ``{"a.b[0]": 1}``; empty tables and lists and None drop out
    (TOML cannot write None, and the spec writer leaves empty ones out)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, item in enumerate(value):
            out.update(_leaves(item, f"{prefix}[{i}]"))
        return out
    return {} if value is None or value == [] else {prefix: value}


def spec_differences(old: dict, new: dict) -> list[str]:
    """``field: old -> new`` for each trajectory field where two resolved specs differ."""
    a, b = _leaves(trajectory(old)), _leaves(trajectory(new))

    def show(key: str, values: dict) -> str:
        return json.dumps(values[key]) if key in values else "(unset)"

    return [
        f"{key}: {show(key, a)} -> {show(key, b)}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


def output_dir(spec: RunSpec, output: str | Path | None) -> Path:
    """``--output``, else the spec's ``run.output`` (relative to the spec), else runs/NAME."""
    if output is not None:
        return Path(output)
    if spec.run.output:
        out = Path(spec.run.output)
        return out if out.is_absolute() else spec.path(spec.run.output)
    return Path("runs") / spec.run.name


def load_run_spec(run_dir: str | Path) -> RunSpec:
    """The resolved spec a run was made with, its paths relative to the original spec."""
    run_dir = Path(run_dir)
    meta = read_json(run_dir / "run.json", "run metadata")
    spec = load_spec(run_dir / "spec.toml")
    spec.base_dir = meta.get("spec_dir", str(run_dir))
    return spec


LOCK = ".kd.lock"


def run_meta(folder: Path) -> dict | None:
    """The ``run.json`` of a kd run folder, or None when ``folder`` is not one."""
    meta = folder / "run.json"
    if not meta.is_file():
        return None
    try:
        data = read_json(meta, "run metadata")
    except CheckpointError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("spec_hash"), str) else None


def _is_fresh(folder: Path) -> bool:
    """Nothing in ``folder`` but what a run killed before writing ``run.json`` leaves."""
    for path in folder.iterdir():
        ours = path.name == LOCK or (
            TEMPORARY.match(path.name) and path.name.startswith((".run.json.", ".spec.toml."))
        )
        if not ours:
            return False
    return True


def _remove_orphans(out: Path) -> None:
    """What a killed run left half-written: checkpoint folders and their shards, atomic
    writes' temporaries, ``student.tmp``. Only under the lock: then no writer is running."""
    ckpt.remove_orphans(out / "checkpoints")
    remove_temporaries(out)
    if (out / "student.tmp").is_dir() and not (out / "student.tmp").is_symlink():
        shutil.rmtree(out / "student.tmp", ignore_errors=True)


class RunLock:
    """An exclusive ``flock`` on ``FOLDER/.kd.lock`` for a run's life: a second ``kd
    distill`` into the folder is refused. The OS drops it when the process dies, so a kill
    leaves no stale lock (the file stays; holding it is what counts)."""

    def __init__(self, folder: Path, what: str = "kd distill"):
        self.path = folder / LOCK
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheckpointError(f"cannot lock {folder} ({self.path}): {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CheckpointError(
                f"{folder} is in use by another {what} (it holds {self.path}); wait for "
                "it to end, or stop it, before starting another there"
            ) from None
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunDir:
    """Writes one run folder; resumes from its newest checkpoint when asked.

    The folder must be new, empty or a kd run (``run.json``): anything else (a project, a
    model folder, ``/``) is refused before a file is written. A run folder is locked while
    a run uses it. Without ``resume`` a folder holding a run, finished or not, is refused;
    with it the run continues from its newest checkpoint (from step 0 when it stopped
    before the first), after every check passed: a refused resume changes nothing.
    """

    def __init__(self, parts: Parts, out: Path, resume: bool):
        self.parts = parts
        self._lock: RunLock | None = None
        self._metrics = None
        spec = parts.spec
        self.resolved = resolved = spec_to_dict(spec)
        self.spec_hash = spec_hash(resolved)
        out = Path(out)
        dp = parts.dp
        error: Exception | None = None
        if dp.is_main:
            try:
                self._examine(out, resume)  # before the lock: a foreign folder gets no file
                try:
                    out.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise CheckpointError(f"cannot create --output {out}: {exc}") from None
                self._lock = RunLock(out)
                self._examine(out, resume)  # again, now that no other run can change it
                _remove_orphans(out)  # before the other processes copy its checkpoints
            except Exception as exc:
                self.release()
                error = exc
        if dp.size > 1:
            # Every process learns whether rank 0 accepted the folder (rank 0 alone
            # failing would leave the others waiting in the first all_sum).
            accepted = dp.all_sum(mx.array(1.0 if dp.is_main and error is None else 0.0))
            if error is None and accepted.item() < 1:
                raise CheckpointError(f"{out} was refused by the main process (see its error)")
        if error is not None:
            raise error
        try:
            self.out = out = dp.output_dir(out, resume)
            self.restored = self._resume(out) if resume else None
            self._write_start(out, resume)
        except BaseException:
            self.release()
            raise

    def _examine(self, out: Path, resume: bool) -> None:
        """Refuse what the folder cannot take; reads only."""
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"--output {out} is a file, not a folder")
        try:
            fresh = not out.exists() or _is_fresh(out)
        except OSError as exc:
            raise CheckpointError(f"cannot read --output {out}: {exc}") from None
        if fresh:
            if resume:
                raise CheckpointError(f"--resume: {out} holds no run to resume")
            return
        meta = run_meta(out)
        if meta is None:
            raise CheckpointError(
                f"--output {out} is not a kd run (no run.json) and is not empty; kd distill "
                "writes only into a new or empty folder or a run's own: choose another --output"
            )
        if not resume:
            state = "finished" if (out / "summary.json").exists() else "unfinished"
            raise CheckpointError(
                f"{out} already holds a run ({state}); pass --resume to continue it, or "
                "another --output"
            )
        if meta["spec_hash"] not in (self.spec_hash, _legacy_hash(self.resolved)):
            raise CheckpointError(self._different_spec(out, meta["spec_hash"]))

    def _different_spec(self, out: Path, recorded: str) -> str:
        head = f"--resume: {out} was made by a different spec"
        try:
            old = tomllib.loads((out / "spec.toml").read_text(encoding="utf-8"))
            fields = spec_differences(old, self.resolved)
        except (OSError, ValueError):
            fields = []
        if not fields:
            return f"{head} (hash {recorded} != {self.spec_hash}); resume needs the same spec"
        return (
            f"{head}; resume needs the same spec, and these fields differ "
            "(run's -> this spec's):\n  " + "\n  ".join(fields)
        )

    def _resume(self, out: Path) -> dict | None:
        """The restored state from the newest checkpoint, or None to start at step 0 (an
        unfinished run stopped before its first checkpoint)."""
        root = out / "checkpoints"
        latest = ckpt.latest_checkpoint(root)
        finished = self.parts.dp.is_main and (out / "summary.json").exists()
        if latest is not None:
            restored = self._restore(latest)
            if finished and restored["step"] < _finished_at(out):
                # It finished past this checkpoint without a final one: the steps between
                # are trained again (the same trajectory), so say why it takes longer.
                print(
                    f"note: {out} finished without a final checkpoint "
                    f"(train.final_checkpoint = false); resuming from step {restored['step']}",
                    file=sys.stderr,
                )
            return restored
        if finished:
            raise CheckpointError(
                f"--resume: {out} holds a finished run but no checkpoint to continue from "
                "(train.final_checkpoint = false keeps none at the end): start a new run, or "
                "set train.final_checkpoint = true in runs you mean to extend"
            )
        return None

    def _write_start(self, out: Path, resume: bool) -> None:
        """The folder's files for this start, written only once every check has passed."""
        write_json(
            out / "run.json",
            {
                "spec_dir": str(Path(self.parts.spec.base_dir).resolve()),
                "spec_hash": self.spec_hash,
            },
        )
        with atomic_path(out / "spec.toml") as tmp:
            tmp.write_text(toml_dumps(self.resolved))
        save_tokenizer(self.parts.tokenizer, out)
        if resume:
            _truncate_metrics(out / "metrics.jsonl", self.start_step)
            if self.start_step < self.parts.total and self.parts.dp.is_main:
                # a finished run trained further is unfinished again until its new end
                (out / "summary.json").unlink(missing_ok=True)

    def release(self) -> None:
        """Unlock the folder (at the end of the run, or when it was refused)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def start_step(self) -> int:
        return self.restored["step"] if self.restored else 0

    # ------------------------------------------------------------ run callback

    def on_start(self, info) -> None:
        self._metrics = open(self.out / "metrics.jsonl", "a", encoding="utf-8")

    def on_log(self, step: int, record: dict) -> None:
        self._write(record)

    def on_eval(self, step: int, record: dict) -> None:
        line = {"step": step, "eval": record}
        if step >= self.parts.total:
            # Periodic evaluations run before the last step; this is the final one. A resume
            # drops it (its run goes on, or ends with another).
            line["final"] = True
        self._write(line)

    def on_end(self, summary: dict) -> None:
        self.close()
        self.save_student(self.out / "student")
        summary["output"] = str(self.out)
        quantization = quantize_summary(self.parts.student)  # settings, bits per weight
        if quantization is not None:
            summary["quantization"] = quantization
        write_json(self.out / "summary.json", summary)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def _write(self, record: dict) -> None:
        if self._metrics is None:
            self._metrics = open(self.out / "metrics.jsonl", "a", encoding="utf-8")
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    # ------------------------------------------------------------ checkpoints

    def _extra_state(self) -> dict[str, mx.array]:
        extra = {"step_seed": mx.array(self.parts.spec.run.seed)}
        for i, teacher in enumerate(self.parts.teachers):
            if isinstance(teacher, HasState):
                for key, value in teacher.state_arrays().items():
                    extra[f"teacher.{i}.{key}"] = value
        return extra

    def save_checkpoint(
        self,
        step: int,
        stage_index: int,
        optimizer,
        reason: str | None = None,
        write: bool = True,
    ):
        """Write the checkpoint of ``step``; ``write`` False only checks that it could be
        written (every array finite), for the end of a run that keeps no final checkpoint."""
        parts = self.parts
        root = self.out / "checkpoints"
        if not write:
            ckpt.check_finite(root, parts.trainable.parameters(), {}, {})
            return None
        if not parts.dp.is_main:
            # the same refusal on every process, though only rank 0 writes
            ckpt.check_finite(root, parts.trainable.parameters(), optimizer.state, {})
            return root
        state = {
            "stage": stage_index,
            "data_position": step * parts.spec.train.grad_accum,
            "spec_hash": self.spec_hash,
            "student_arch": parts.student_arch,
        }
        if reason:
            state["reason"] = reason
        try:
            return ckpt.save_checkpoint(
                root,
                step,
                parts.trainable.parameters(),
                optimizer.state,
                self._extra_state(),
                state,
                keep=parts.spec.train.keep_checkpoints,
            )
        except (CheckpointError, OSError) as exc:
            if isinstance(exc, ckpt.NonFiniteStateError):
                raise
            before = ckpt.latest_checkpoint(root)
            stands = f"{before} stands" if before else "no earlier checkpoint exists"
            raise CheckpointError(
                f"the checkpoint of step {step} could not be written: {exc}. {stands}; once "
                f"there is space, resume with --resume --output {self.out}"
            ) from None

    def _restore(self, path: Path) -> dict:
        state, trainable, optimizer, extra = ckpt.load_checkpoint(path)
        if state.get("spec_hash") not in (self.spec_hash, _legacy_hash(self.resolved)):
            raise CheckpointError(
                f"checkpoint {path} was made by a different spec (hash {state.get('spec_hash')} "
                f"!= {self.spec_hash}); resume needs the same spec"
            )
        total, n_stages = self.parts.total, len(stages(self.parts.spec))
        if state["step"] > total:
            raise CheckpointError(
                f"--resume: checkpoint {path.name} is at step {state['step']} but train.steps "
                f"is {total}: resume with at least {state['step']} steps @ $.train.steps"
            )
        if state.get("stage", 0) >= n_stages:
            raise CheckpointError(
                f"{path}/state.json: stage {state['stage']} but the spec has {n_stages}"
            )
        try:
            self.parts.trainable.load_weights(list(trainable.items()), strict=True)
        except ValueError as exc:
            raise CheckpointError(
                f"checkpoint {path} does not fit this run's model: {exc}"
            ) from exc
        extra.pop("step_seed", None)
        for i, teacher in enumerate(self.parts.teachers):
            prefix = f"teacher.{i}."
            if isinstance(teacher, HasState):
                teacher.load_state_arrays(
                    {k[len(prefix) :]: v for k, v in extra.items() if k.startswith(prefix)}
                )
        return {
            "step": state["step"],
            "stage": state.get("stage", 0),
            "optimizer": ckpt.unflatten(optimizer),
        }

    # ------------------------------------------------------------ the student

    def save_student(self, directory: Path) -> None:
        parts = self.parts
        if not parts.dp.is_main:
            return
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        # mlx-lm students are saved as mlx-lm directories, LoRA students as adapters
        args = (parts.student, tmp, parts.student_arch, parts.student_config, parts.tokenizer)
        if not save_special_student(*args):
            save_model(parts.student, tmp, parts.student_arch, parts.student_config)
            save_tokenizer(parts.tokenizer, tmp)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)


def open_run(run_dir: str | Path) -> Parts:
    """A finished or interrupted run rebuilt from ``run_dir/spec.toml``, with the student and
    any learnable aggregator loaded from its newest checkpoint."""
    run_dir = Path(run_dir)
    parts = build_parts(load_run_spec(run_dir))
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    end = _finished_at(run_dir) if (run_dir / "summary.json").exists() else None
    if end is not None and (latest is None or _step_number(latest) < end):
        # finished without a final checkpoint (train.final_checkpoint = false, and nothing
        # learnt beside the student): the trained weights are student/'s
        _load_saved_student(parts, run_dir / "student")
        return parts
    if latest is None:
        raise CheckpointError(f"{run_dir}/checkpoints has no checkpoint to read weights from")
    _state, trainable, _opt, _extra = ckpt.load_checkpoint(latest)
    # Student and aggregator only: loss modules' parameters do not matter for scoring.
    for name in ("student", "aggregator"):
        module = getattr(parts.trainable, name, None)
        prefix = name + "."
        items = [(k[len(prefix) :], v) for k, v in trainable.items() if k.startswith(prefix)]
        if module is not None:
            module.load_weights(items, strict=True)
    mx.eval(parts.trainable.parameters())
    return parts


def _load_saved_student(parts: Parts, folder: Path) -> None:
    """The run's student given the weights saved in ``folder`` (its ``student/``)."""
    from mlx.utils import tree_flatten

    try:
        saved = load_model(folder)[0]
        parts.student.load_weights(list(tree_flatten(saved.parameters())), strict=True)
    except (CheckpointError, ValueError) as exc:
        raise CheckpointError(
            f"{folder} does not hold the student as the run builds it ({exc}), and the run "
            "kept no final checkpoint: rerun it with train.final_checkpoint = true to open it"
        ) from None
    mx.eval(parts.student.parameters())


def _step_number(checkpoint: Path) -> int:
    match = ckpt.NAME.match(checkpoint.name)  # latest_checkpoint returns step-N folders only
    return int(match.group(1)) if match else 0


def _finished_at(out: Path) -> int:
    """The step a finished run's ``summary.json`` says it ended at (0 when unreadable)."""
    try:
        steps = read_json(out / "summary.json", "run summary").get("steps")
    except (CheckpointError, AttributeError):
        return 0
    return steps if isinstance(steps, int) else 0


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a resume starts from)
    and the final evaluation (the resumed run writes its own): the file then reads as if
    the run had never stopped. Rewritten atomically: a crash here loses nothing."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by the crash
        if isinstance(record, dict) and record.get("step", 0) <= step and not record.get("final"):
            kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
