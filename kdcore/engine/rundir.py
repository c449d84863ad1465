"""The run folder of ``kd distill``: the resolved spec, metrics, checkpoints, the student
and the summary. ``RunDir`` is the engine's built-in run callback; the loop knows nothing
of files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx

from kdcore.engine import checkpoint as ckpt
from kdcore.engine.build import Parts, build_parts
from kdcore.errors import CheckpointError
from kdcore.io import read_json, write_json
from kdcore.models.io import save_model
from kdcore.models.save import save_student as save_special_student
from kdcore.protocols import HasState
from kdcore.spec.load import load_spec, spec_to_dict
from kdcore.spec.schema import RunSpec
from kdcore.spec.tomlwrite import dumps as toml_dumps
from kdcore.tokenizers.simple import save_tokenizer


def spec_hash(data: dict) -> str:
    """Hash of what determines the training trajectory (not steps or output place)."""
    data = json.loads(json.dumps(data, default=str))
    data.pop("run", None)
    data.get("train", {}).pop("checkpoint_every", None)
    data.pop("eval", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


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


class RunDir:
    """Writes one run folder; resumes from its newest checkpoint when asked."""

    def __init__(self, parts: Parts, out: Path, resume: bool):
        self.parts = parts
        self.out = out = parts.dp.output_dir(out, resume)
        spec = parts.spec
        resolved = spec_to_dict(spec)
        self.spec_hash = spec_hash(resolved)
        root = out / "checkpoints"
        latest = ckpt.latest_checkpoint(root) if resume else None
        if resume and latest is None:
            raise CheckpointError(f"--resume: no checkpoint in {root}")
        if not resume and (root / "latest").exists():
            raise CheckpointError(
                f"{out} already holds a run; pass --resume to continue it, or another --output"
            )
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.toml").write_text(toml_dumps(resolved))
        write_json(
            out / "run.json",
            {"spec_dir": str(Path(spec.base_dir).resolve()), "spec_hash": self.spec_hash},
        )
        save_tokenizer(parts.tokenizer, out)
        self.restored = None
        if latest is not None:
            self.restored = self._restore(latest)
            _truncate_metrics(out / "metrics.jsonl", self.restored["step"])
        self._metrics = None

    @property
    def start_step(self) -> int:
        return self.restored["step"] if self.restored else 0

    # ------------------------------------------------------------ run callback

    def on_start(self, info) -> None:
        self._metrics = open(self.out / "metrics.jsonl", "a", encoding="utf-8")

    def on_log(self, step: int, record: dict) -> None:
        self._write(record)

    def on_eval(self, step: int, record: dict) -> None:
        self._write({"step": step, "eval": record})

    def on_end(self, summary: dict) -> None:
        self.close()
        self.save_student(self.out / "student")
        summary["output"] = str(self.out)
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

    def save_checkpoint(self, step: int, stage_index: int, optimizer, reason: str | None = None):
        parts = self.parts
        if not parts.dp.is_main:
            return self.out / "checkpoints"
        state = {
            "stage": stage_index,
            "data_position": step * parts.spec.train.grad_accum,
            "spec_hash": self.spec_hash,
            "student_arch": parts.student_arch,
        }
        if reason:
            state["reason"] = reason
        return ckpt.save_checkpoint(
            self.out / "checkpoints",
            step,
            parts.trainable.parameters(),
            optimizer.state,
            self._extra_state(),
            state,
            keep=parts.spec.train.keep_checkpoints,
        )

    def _restore(self, path: Path) -> dict:
        state, trainable, optimizer, extra = ckpt.load_checkpoint(path)
        if state.get("spec_hash") != self.spec_hash:
            raise CheckpointError(
                f"checkpoint {path} was made by a different spec (hash {state.get('spec_hash')} "
                f"!= {self.spec_hash}); resume needs the same spec"
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
            "stage": state["stage"],
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


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
    path.write_text("".join(k + "\n" for k in kept))
