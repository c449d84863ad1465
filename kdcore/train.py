"""The training engine behind ``kd distill``.

One step: batch -> teachers (frozen) -> aggregator -> aligner -> weighted losses ->
gradients of the student and any learnable component -> clip -> optimizer. Stages run in
order, each with its own parameter groups and a fresh optimizer.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from kdcore import checkpoint as ckpt
from kdcore import lora
from kdcore.components import Component
from kdcore.distributed import DataParallel
from kdcore.errors import CheckpointError, NonFiniteLossError, SpecError
from kdcore.io import write_json
from kdcore.losses import LossInputs, token_cross_entropy
from kdcore.mlxlm import save_student as save_special_student
from kdcore.models import count_parameters, save_model
from kdcore.optim import build_optimizer, freeze_paths, plan_groups, set_learning_rate
from kdcore.plugins import get_registry
from kdcore.progress import Progress
from kdcore.schedules import scheduled_fields, value_at
from kdcore.setup import Setup
from kdcore.spec import RunSpec, Stage, load_spec, loss_labels, spec_to_dict
from kdcore.tokenizer import save_tokenizer
from kdcore.tomlwrite import dumps as toml_dumps
from kdcore.vocab import position_mask

CAPTURABLE = ("hidden_states", "attentions")


def check_composition(spec: RunSpec) -> list[str]:
    """Problems visible without loading anything: a loss that needs a teacher and none is
    given, a loss that needs dense logits fed from a top-k cache, and the like."""
    registry = get_registry()
    problems = []
    sources = [ref.source_name for ref in spec.teachers]
    # A top-k cache holds log-probabilities only, for the dataset's own token rows.
    not_from_cache = {"hidden_states", "attentions", "student_samples"}
    if "cache" in sources:
        try:
            aggregator = registry.get("teacher_aggregator", spec.aggregator.name)
            if aggregator.requires & not_from_cache:
                problems.append(
                    f"aggregator {spec.aggregator.name!r} needs "
                    f"{', '.join(sorted(aggregator.requires & not_from_cache))}, which a top-k "
                    "cache does not hold @ $.aggregator.name"
                )
        except KeyError:
            pass
    for i, ref in enumerate(spec.losses):
        try:
            component = registry.get("loss", ref.name)
        except KeyError:
            continue
        if ({"teacher", "dense_teacher"} & component.requires) and not spec.teachers:
            problems.append(f"loss {ref.name!r} needs a teacher and the spec has none @ $.teachers")
        if "cache" in sources and component.requires & not_from_cache:
            problems.append(
                f"loss {ref.name!r} needs {', '.join(sorted(component.requires & not_from_cache))}"
                f", which a top-k cache does not hold @ $.losses[{i}].name"
            )
            continue
        needs_dense = "dense_teacher" in component.requires
        sparse_ok = "sparse_ok" in component.properties
        if (
            "cache" in sources
            and (needs_dense or not sparse_ok)
            and ({"teacher", "dense_teacher"} & component.requires)
        ):
            problems.append(
                f"loss {ref.name!r} cannot work from a top-k cache (it needs full teacher "
                f"logits); use a live teacher or a sparse-aware loss @ $.losses[{i}].name"
            )
    return problems


def total_steps(spec: RunSpec) -> int:
    return sum(s.steps for s in spec.train.stages) if spec.train.stages else spec.train.steps


def _stages(spec: RunSpec) -> list[Stage]:
    if spec.train.stages:
        return [
            attrs.evolve(s, param_groups=s.param_groups or spec.train.param_groups)
            for s in spec.train.stages
        ]
    return [Stage(steps=spec.train.steps, name="main", param_groups=spec.train.param_groups)]


def spec_hash(data: dict) -> str:
    """Hash of what determines the training trajectory (not steps or output place)."""
    data = json.loads(json.dumps(data, default=str))
    data.pop("run", None)
    data.get("train", {}).pop("checkpoint_every", None)
    data.pop("eval", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class Trainable(nn.Module):
    """Everything that learns: the student and any learnable aggregator or loss."""

    def __init__(self, student: nn.Module, aggregator: Any, losses: list[Any]):
        super().__init__()
        self.student = student
        if isinstance(aggregator, nn.Module):
            self.aggregator = aggregator
        # Keys must not be numbers: MLX rebuilds numeric paths as lists.
        self.losses = {
            f"loss{i}": loss for i, loss in enumerate(losses) if isinstance(loss, nn.Module)
        }


def _resolved_params(config: Any, step: int, total: int) -> Any:
    """The config at ``step``: every scheduled float replaced by its value (a 0-d array)."""
    fields = scheduled_fields(config)
    if not fields:
        return config
    return attrs.evolve(
        config,
        **{k: mx.array(value_at(v, step, total), dtype=mx.float32) for k, v in fields.items()},
    )


class Run:
    """A built run: components constructed, ready to train or evaluate."""

    def __init__(self, spec: RunSpec, output: str | Path | None = None):
        problems = check_composition(spec)
        if problems:
            raise SpecError(problems)
        self.spec = spec
        self.registry = get_registry()
        self.out = Path(output or spec.run.output or Path("runs") / spec.run.name)
        if not Path(self.out).is_absolute() and output is None and spec.run.output:
            self.out = spec.path(spec.run.output)
        self.total = total_steps(spec)
        self.dp = DataParallel()
        mx.random.seed(spec.run.seed)
        base = Setup(base_dir=Path(spec.base_dir), seed=spec.run.seed, spec=spec)

        data_ref = spec.data
        self.dataset = self._component("dataset", data_ref).factory(
            data_ref.config, attrs.evolve(base)
        )
        self.tokenizer = self.dataset.tokenizer
        # Teacher sources see the dataset (a cache checks its fingerprint against it).
        teacher_setup = attrs.evolve(base, extras={"dataset": self.dataset})
        self.teachers = [self._build_teacher(ref, teacher_setup) for ref in spec.teachers]
        teacher_tok = next((t.tokenizer for t in self.teachers if t.tokenizer is not None), None)

        model_ref = spec.student.model
        model_config = model_ref.config
        if "vocab_size" not in model_ref.params and hasattr(model_config, "vocab_size"):
            model_config = attrs.evolve(model_config, vocab_size=self.tokenizer.vocab_size)
        if getattr(model_config, "vocab_size", 1 << 30) < self.tokenizer.vocab_size:
            raise SpecError(
                f"student vocab_size {model_config.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} @ $.student.model.params.vocab_size"
            )
        self.student_arch, self.student_config = model_ref.name, model_config
        mx.random.seed(spec.run.seed)
        self.student = self._component("model", model_ref).factory(model_config, base)
        mx.eval(self.student.parameters())
        setup = attrs.evolve(
            base,
            tokenizer=self.tokenizer,
            student_config=model_config,
            teacher_configs=[getattr(t, "config", None) for t in self.teachers],
            num_teachers=max(1, len(self.teachers)),
        )
        self.setup = setup
        init = self._component("student_initializer", spec.student.init).factory(
            spec.student.init.config, setup
        )
        self.init_report = init(self.student, [getattr(t, "model", None) for t in self.teachers])

        self.aggregator = self._component("teacher_aggregator", spec.aggregator).factory(
            spec.aggregator.config, setup
        )
        self.aligner = self._component("vocab_aligner", spec.aligner).factory(
            spec.aligner.config, setup
        )
        if self.teachers:
            self._check_vocabularies(teacher_tok)

        self.loss_components: list[Component] = [
            self._component("loss", ref) for ref in spec.losses
        ]
        self.losses = [
            c.factory(ref.config, setup) for c, ref in zip(self.loss_components, spec.losses)
        ]
        self.labels = loss_labels(spec)
        requires = set().union(*(c.requires for c in self.loss_components))
        requires |= getattr(self.aggregator, "requires", set())
        self.capture = frozenset(r for r in CAPTURABLE if r in requires)
        self.needs_teacher = bool({"teacher", "dense_teacher"} & requires) or any(
            "weights" in getattr(self.aggregator, "requires", set()) for _ in [0]
        )
        self.callbacks = [
            self._component("run_callback", ref).factory(ref.config, setup)
            for ref in spec.callbacks
        ]
        self.trainable = Trainable(self.student, self.aggregator, self.losses)

    # ------------------------------------------------------------ building

    def _component(self, kind: str, ref) -> Component:
        return self.registry.get(kind, ref.name)

    def _build_teacher(self, ref, base: Setup):
        component = self.registry.get("teacher_source", ref.source_name)
        config = ref.config if ref.config is not None else component.config()
        return component.factory(config, attrs.evolve(base, teacher=ref))

    def _check_vocabularies(self, teacher_tok) -> None:
        from kdcore.tokenizer import fingerprint

        toks = [t.tokenizer for t in self.teachers if t.tokenizer is not None]
        if len({fingerprint(t) for t in toks}) > 1:
            raise SpecError(
                "teachers have different vocabularies; aggregation needs one vocabulary "
                "@ $.teachers"
            )
        prepare = getattr(self.aligner, "prepare", None)
        if prepare is not None:
            prepare(teacher_tok, self.tokenizer)

    # ------------------------------------------------------------ one step

    def teacher_signals(self, batch: dict[str, mx.array]) -> list:
        if not self.teachers:
            return []
        return [t.signal(batch, self.capture, self.student) for t in self.teachers]

    def loss_terms(self, trainable: Trainable, batch, signals, step: int):
        """(total, {label: term}, {metric: value}) for one micro-batch."""
        out = trainable.student(batch["input_ids"], capture=self.capture)
        inputs = LossInputs(
            student=out, teacher=None, batch=batch, step=step, total_steps=self.total
        )
        teacher = None
        teacher_batch = batch
        if signals:
            aggregator = getattr(trainable, "aggregator", self.aggregator)
            teacher = self.aligner(aggregator(signals, inputs))
            # A teacher with another tokenizer covers only the positions it could align.
            aligned = position_mask(teacher)
            if aligned is not None:
                teacher_batch = {**batch, "mask": batch["mask"] * aligned}
        total = mx.array(0.0)
        terms, metrics = {}, {}
        for i, (ref, loss, label) in enumerate(zip(self.spec.losses, self.losses, self.labels)):
            loss = trainable.losses.get(f"loss{i}", loss) if isinstance(loss, nn.Module) else loss
            params = _resolved_params(ref.config, step, self.total)
            uses_teacher = {"teacher", "dense_teacher"} & self.loss_components[i].requires
            value, extra = loss(
                attrs.evolve(
                    inputs,
                    teacher=teacher,
                    params=params,
                    batch=teacher_batch if uses_teacher else batch,
                )
            )
            weight = value_at(ref.weight, step, self.total)
            terms[label] = value
            for key, metric in (extra or {}).items():
                metrics[f"{label}/{key}"] = metric
            if weight != 0.0:
                total = total + weight * value
        if teacher is not None and teacher.weights is not None:
            mean_w = teacher.weights.reshape(-1, teacher.weights.shape[-1]).mean(0)
            for k in range(mean_w.shape[0]):
                metrics[f"teacher_weight/{k}"] = mean_w[k]
        return total, terms, metrics

    def _prepare_batch(self, batch_np: dict[str, np.ndarray], step: int) -> dict[str, mx.array]:
        batch = {k: mx.array(v) for k, v in batch_np.items()}
        for loss in self.losses:
            prepare = getattr(loss, "prepare_batch", None)
            if prepare is not None:
                batch = prepare(batch, self, step)
        return batch

    # ------------------------------------------------------------ training

    def train(self, resume: bool = False, progress: bool | None = None) -> dict:
        spec = self.spec
        out = self.out = self.dp.output_dir(self.out, resume)
        resolved = spec_to_dict(spec)
        self.spec_hash = spec_hash(resolved)
        start_step, stage_index = 0, 0
        ckpt_root = out / "checkpoints"
        latest = ckpt.latest_checkpoint(ckpt_root) if resume else None
        if resume and latest is None:
            raise CheckpointError(f"--resume: no checkpoint in {ckpt_root}")
        if not resume and (out / "checkpoints" / "latest").exists():
            raise CheckpointError(
                f"{out} already holds a run; pass --resume to continue it, or another --output"
            )
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.toml").write_text(toml_dumps(resolved))
        write_json(
            out / "run.json",
            {"spec_dir": str(Path(spec.base_dir).resolve()), "spec_hash": self.spec_hash},
        )
        save_tokenizer(self.tokenizer, out)
        restored = None
        if latest is not None:
            restored = self._restore(latest)
            start_step = restored["step"]
            _truncate_metrics(out / "metrics.jsonl", start_step)
        metrics_file = open(out / "metrics.jsonl", "a", encoding="utf-8")
        for cb in self.callbacks:
            getattr(cb, "on_start", lambda run: None)(self)
        bar = Progress(self.total, spec.run.name, self.dp.log_stream(), enabled=progress)
        last_terms: dict[str, float] = {}
        tokens_seen, train_seconds = 0, 0.0
        eval_record = {}
        step = start_step
        stage_end = 0
        try:
            for stage_index, stage in enumerate(_stages(spec)):
                _stage_start, stage_end = stage_end, stage_end + stage.steps
                if step >= stage_end:
                    continue
                optimizer, plan = self._stage_optimizer(stage)
                if restored is not None and restored["stage"] == stage_index:
                    optimizer.state = restored["optimizer"]
                    restored = None
                while step < stage_end:
                    t0 = time.perf_counter()
                    # Randomness (sampling, dropout) is a function of (seed, step), so a
                    # resumed run draws exactly what the uninterrupted one drew.
                    mx.random.seed(self.dp.seed(spec.run.seed * 1_000_003 + step))
                    lr = value_at(
                        stage.lr if stage.lr is not None else spec.train.optimizer.lr,
                        step,
                        self.total,
                    )
                    set_learning_rate(optimizer, plan, lr)
                    total, terms, metrics, grads, ntok = self.dp.reduce_step(*self._gradients(step))
                    self._check_finite(step, total, terms, stage_index, optimizer)
                    if spec.train.grad_clip:
                        grads, grad_norm = optim.clip_grad_norm(grads, spec.train.grad_clip)
                        metrics["grad_norm"] = grad_norm
                    optimizer.update(self.trainable, grads)
                    mx.eval(self.trainable.parameters(), optimizer.state, metrics)
                    for teacher in self.teachers:
                        after = getattr(teacher, "after_step", None)
                        if after is not None:
                            after(self.student, step, self.total)
                    step += 1
                    dt = time.perf_counter() - t0
                    tokens_seen += ntok
                    train_seconds += dt
                    last_terms = {k: v.item() for k, v in terms.items()}
                    if (
                        step % spec.train.log_every == 0
                        or step == self.total
                        or step == start_step + 1
                    ):
                        record = {
                            "step": step,
                            "stage": stage.name or stage_index,
                            "loss": total.item(),
                            **{f"loss/{k}": v for k, v in last_terms.items()},
                            **{k: v.item() for k, v in metrics.items()},
                            "lr": lr,
                            **self._schedule_values(step - 1),  # the values this step used
                            "tokens_per_s": ntok / dt,
                        }
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        for cb in self.callbacks:
                            getattr(cb, "on_log", lambda s, r: None)(step, record)
                        bar.update(step, f"loss {record['loss']:.4f} {ntok / dt:,.0f} tok/s", True)
                    else:
                        bar.update(step, f"loss {total.item():.4f}")
                    if spec.eval.every and step % spec.eval.every == 0 and step < self.total:
                        eval_record = self.evaluate(spec.eval.batches)
                        metrics_file.write(json.dumps({"step": step, "eval": eval_record}) + "\n")
                        metrics_file.flush()
                        for cb in self.callbacks:
                            getattr(cb, "on_eval", lambda s, r: None)(step, eval_record)
                    every = spec.train.checkpoint_every
                    if (every and step % every == 0) or step == stage_end:
                        self._save_checkpoint(step, stage_index, optimizer)
        finally:
            bar.close()
            metrics_file.close()
        eval_record = self.evaluate(spec.eval.batches)
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "eval": eval_record}) + "\n")
        self.save_student(out / "student")
        summary = {
            "run": spec.run.name,
            "steps": step,
            "final_losses": last_terms,
            "eval": eval_record,
            "wall_seconds": train_seconds,
            "tokens_per_s": tokens_seen / train_seconds if train_seconds else None,
            "student_parameters": count_parameters(self.student),
            "teacher_parameters": [t.num_parameters for t in self.teachers],
            "trainable_parameters": sum(
                v.size for _, v in tree_flatten(self.trainable.trainable_parameters())
            ),
            "init": self.init_report,
            "output": str(out),
        }
        write_json(out / "summary.json", summary)
        for cb in self.callbacks:
            getattr(cb, "on_end", lambda s: None)(summary)
        return summary

    def _schedule_values(self, step: int) -> dict[str, float]:
        values = {}
        for ref, label in zip(self.spec.losses, self.labels):
            if not isinstance(ref.weight, (int, float)):
                values[f"weight/{label}"] = value_at(ref.weight, step, self.total)
            for name, sched in scheduled_fields(ref.config).items():
                values[f"{label}/{name}"] = value_at(sched, step, self.total)
        return values

    def _stage_optimizer(self, stage: Stage):
        self.trainable.unfreeze()
        lora.refreeze(self.student)  # a LoRA student trains its adapters only
        for teacher_module in [getattr(self.trainable, "aggregator", None)]:
            if teacher_module is not None and not getattr(teacher_module, "learnable", True):
                teacher_module.freeze()
        section = self.spec.train.optimizer
        decay = section.weight_decay if isinstance(section.weight_decay, (int, float)) else 0.0
        plan = plan_groups(self.trainable, stage.param_groups, self.spec.train.no_decay, decay)
        freeze_paths(self.trainable, plan.frozen)
        # Re-plan over what is trainable now (frozen modules such as fixed weights drop out).
        plan = plan_groups(
            _TrainableView(self.trainable), stage.param_groups, self.spec.train.no_decay, decay
        )
        lr = value_at(section.lr, 0, self.total)
        optimizer = build_optimizer(section, plan, lr)
        optimizer.init(self.trainable.trainable_parameters())
        self.plan = plan
        return optimizer, plan

    def _gradients(self, step: int):
        accum = self.spec.train.grad_accum
        loss_and_grad = nn.value_and_grad(self.trainable, self._objective)
        grads_sum, total_sum, terms_sum, metrics_sum, ntok = None, 0.0, {}, {}, 0
        for micro in range(accum):
            index = step * accum + micro
            rows = self.dp.shard(self.dataset.batch(index, self.spec.train.batch_size))
            batch = self._prepare_batch(rows, step)
            signals = self.teacher_signals(batch)
            (total, (terms, metrics)), grads = loss_and_grad(self.trainable, batch, signals, step)
            ntok += int(batch["mask"].sum().item())
            if accum == 1:
                return total, terms, metrics, grads, ntok
            mx.eval(total, terms, grads)
            grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
            total_sum = total_sum + total
            terms_sum = {k: terms_sum.get(k, 0.0) + v for k, v in terms.items()}
            metrics_sum = {k: metrics_sum.get(k, 0.0) + v for k, v in metrics.items()}
        scale = 1.0 / accum
        return (
            total_sum * scale,
            {k: v * scale for k, v in terms_sum.items()},
            {k: v * scale for k, v in metrics_sum.items()},
            tree_map(lambda g: g * scale, grads_sum),
            ntok,
        )

    def _objective(self, trainable, batch, signals, step):
        total, terms, metrics = self.loss_terms(trainable, batch, signals, step)
        return total, (terms, metrics)

    def _check_finite(self, step, total, terms, stage_index, optimizer) -> None:
        mx.eval(total, terms)
        if math.isfinite(total.item()):
            return
        bad = next((k for k, v in terms.items() if not math.isfinite(v.item())), "total")
        value = terms[bad].item() if bad in terms else total.item()
        path = self._save_checkpoint(step, stage_index, optimizer, reason="non-finite loss")
        raise NonFiniteLossError(step + 1, bad, value, str(path))

    # ------------------------------------------------------------ checkpoints

    def _extra_state(self) -> dict[str, mx.array]:
        extra = {"step_seed": mx.array(self.spec.run.seed)}
        for i, teacher in enumerate(self.teachers):
            state = getattr(teacher, "state_arrays", None)
            if state is not None:
                for key, value in state().items():
                    extra[f"teacher.{i}.{key}"] = value
        return extra

    def _save_checkpoint(self, step, stage_index, optimizer, reason: str | None = None):
        if not self.dp.is_main:
            return self.out / "checkpoints"
        state = {
            "stage": stage_index,
            "data_position": step * self.spec.train.grad_accum,
            "spec_hash": self.spec_hash,
            "student_arch": self.student_arch,
        }
        if reason:
            state["reason"] = reason
        return ckpt.save_checkpoint(
            self.out / "checkpoints",
            step,
            self.trainable.parameters(),
            optimizer.state,
            self._extra_state(),
            state,
            keep=self.spec.train.keep_checkpoints,
        )

    def _restore(self, path: Path) -> dict:
        state, trainable, optimizer, extra = ckpt.load_checkpoint(path)
        if state.get("spec_hash") != self.spec_hash:
            raise CheckpointError(
                f"checkpoint {path} was made by a different spec (hash {state.get('spec_hash')} "
                f"!= {self.spec_hash}); resume needs the same spec"
            )
        try:
            self.trainable.load_weights(list(trainable.items()), strict=True)
        except ValueError as exc:
            raise CheckpointError(
                f"checkpoint {path} does not fit this run's model: {exc}"
            ) from exc
        extra.pop("step_seed", None)
        for i, teacher in enumerate(self.teachers):
            load = getattr(teacher, "load_state_arrays", None)
            prefix = f"teacher.{i}."
            if load is not None:
                load({k[len(prefix) :]: v for k, v in extra.items() if k.startswith(prefix)})
        return {
            "step": state["step"],
            "stage": state["stage"],
            "optimizer": ckpt.unflatten(optimizer),
        }

    # ------------------------------------------------------------ outputs

    def save_student(self, directory: Path) -> None:
        if not self.dp.is_main:
            return
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        # mlx-lm students are saved as mlx-lm directories, LoRA students as adapters
        args = (self.student, tmp, self.student_arch, self.student_config, self.tokenizer)
        if not save_special_student(*args):
            save_model(self.student, tmp, self.student_arch, self.student_config)
            save_tokenizer(self.tokenizer, tmp)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)

    def evaluate(self, batches: int = 8) -> dict:
        """Student (and teacher) validation loss on the val split, and agreement."""
        return evaluate_models(
            self.student,
            [t for t in self.teachers],
            self.dataset,
            self.spec.train.batch_size,
            batches,
        )


class _TrainableView:
    """Adapter so plan_groups sees only trainable parameters."""

    def __init__(self, module: nn.Module):
        self.module = module

    def parameters(self):
        return self.module.trainable_parameters()


def evaluate_models(student, teachers, dataset, batch_size: int, batches: int | None) -> dict:
    """Val cross-entropy of student and first teacher, KL(teacher || student), top-1 agreement."""
    totals = {"student_nll": 0.0, "teacher_nll": 0.0, "kl": 0.0, "agree": 0.0}
    tokens = 0.0
    teacher = teachers[0] if teachers and getattr(teachers[0], "model", None) is not None else None
    for batch_np in dataset.batches(batch_size, "val", batches):
        batch = {k: mx.array(v) for k, v in batch_np.items()}
        mask = batch["mask"]
        s_logits = student(batch["input_ids"]).logits.astype(mx.float32)
        totals["student_nll"] += (
            (token_cross_entropy(s_logits, batch["labels"]) * mask).sum().item()
        )
        if teacher is not None:
            t_logits = teacher.model(batch["input_ids"]).logits.astype(mx.float32)
            V = min(t_logits.shape[-1], s_logits.shape[-1])
            totals["teacher_nll"] += (
                (token_cross_entropy(t_logits, batch["labels"]) * mask).sum().item()
            )
            t_lp = nn.log_softmax(t_logits[..., :V], -1)
            s_lp = nn.log_softmax(s_logits[..., :V], -1)
            kl = (mx.exp(t_lp) * (t_lp - s_lp)).sum(-1)
            totals["kl"] += (kl * mask).sum().item()
            agree = (t_lp.argmax(-1) == s_lp.argmax(-1)).astype(mx.float32)
            totals["agree"] += (agree * mask).sum().item()
        tokens += mask.sum().item()
    tokens = max(tokens, 1.0)
    result = {"val_loss": totals["student_nll"] / tokens, "val_tokens": int(tokens)}
    result["val_ppl"] = math.exp(min(result["val_loss"], 50))
    if teacher is not None:
        result["teacher_val_loss"] = totals["teacher_nll"] / tokens
        result["kl_teacher_student"] = totals["kl"] / tokens
        result["top1_agreement"] = totals["agree"] / tokens
    return result


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


def distill(spec, overrides=None, output=None, resume=False, progress=None) -> dict:
    if not isinstance(spec, RunSpec):
        spec = load_spec(spec, overrides or [])
    run = Run(spec, output)
    return run.train(resume=resume, progress=progress)


def print_error(exc: Exception) -> None:
    print(f"error: {exc}", file=sys.stderr)
