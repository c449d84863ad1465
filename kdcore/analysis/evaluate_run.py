"""``kd eval RUN``: the run's one evaluation (``kdcore.engine.evaluate``) on its val split
or another file, plus sizes, forward speed, debugging views and plugin metrics."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from kdcore.engine.evaluate import evaluate
from kdcore.engine.rundir import load_run_spec
from kdcore.errors import CheckpointError, SpecError
from kdcore.io import read_json
from kdcore.kernels.native import install_registered_kernels
from kdcore.models.io import count_parameters
from kdcore.registry.manager import get_registry
from kdcore.registry.setup import Setup


def forward_tokens_per_second(model, batch, repeats: int = 3) -> float:
    ids = mx.array(batch["input_ids"])
    mx.eval(model(ids).logits)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(model(ids).logits)
    return ids.size * repeats / (time.perf_counter() - start)


def _chat_template_folder(spec, run_dir: Path) -> str | None:
    """Whose chat template renders chat records given to ``--data``: the run's own (its chat
    dataset's tokenizer, as it trained), else the saved student's when it ships one."""
    if spec.data.name == "chat":
        return spec.data.config.tokenizer  # relative to the spec, or a hub name
    student = run_dir / "student"
    try:
        config = read_json(student / "tokenizer_config.json", "tokenizer config")
    except CheckpointError:
        return None
    template = isinstance(config, dict) and bool(config.get("chat_template"))
    template = template or (student / "chat_template.jinja").exists()
    return str(student.resolve()) if template else None


def evaluate_run(
    run_dir, data=None, batches: int | None = None, options: dict | None = None
) -> dict[str, Any]:
    """Student vs teacher for a finished run; ``batches`` defaults to the run's ``eval.batches``."""
    run_dir = Path(run_dir)
    if not (run_dir / "student").is_dir():
        raise CheckpointError(f"{run_dir} has no student/ folder: not a finished kd distill run")
    from kdcore.analysis.temperature import load_model_dir, run_teacher

    spec = load_run_spec(run_dir)
    # The kernels the run installed when it built (attention's softmax, SwiGLU, the rows):
    # the same figures as the run's own eval records, to the last digit.
    install_registered_kernels()
    student, tokenizer = load_model_dir(run_dir / "student")
    registry = get_registry()
    notes: list[str] = []
    teacher_model, _, teacher_dir = run_teacher(spec, notes)
    setup = Setup(base_dir=Path(spec.base_dir), seed=spec.run.seed, tokenizer=tokenizer)
    if data is not None:
        from kdcore.analysis.temperature import dataset_for_file

        seq_len = getattr(spec.data.config, "seq_len", 128)
        dataset = dataset_for_file(
            data,
            tokenizer,
            seq_len,
            spec.run.seed,
            chat_tokenizer=_chat_template_folder(spec, run_dir),
            base_dir=spec.base_dir,
        )
        split = "train"
    else:
        dataset = registry.get("dataset", spec.data.name).factory(spec.data.config, setup)
        split = "val"
    batch_size = spec.train.batch_size
    if batches is None:  # the run's own setting, so the figures match its eval records
        batches = spec.eval.batches
    examples = list(dataset.batches(batch_size, split, batches))
    if not examples:
        raise SpecError(f"no {split} data to evaluate on")
    report: dict[str, Any] = {"run": str(run_dir), "split": split if data is None else str(data)}
    report.update(evaluate(student, teacher_model, examples))
    if any(ref.source_name == "cache" for ref in spec.teachers):
        # a cached run's teacher is a folder found again, or none: say which
        report["teacher"] = f"{teacher_dir}" if teacher_model is not None else "; ".join(notes)
    report["student_parameters"] = count_parameters(student)
    report["student_tokens_per_s"] = forward_tokens_per_second(student, examples[0])
    if teacher_model is not None:
        report["teacher_parameters"] = count_parameters(teacher_model)
        report["compression_ratio"] = report["teacher_parameters"] / report["student_parameters"]
        report["teacher_tokens_per_s"] = forward_tokens_per_second(teacher_model, examples[0])
        report["speedup"] = report["student_tokens_per_s"] / report["teacher_tokens_per_s"]
    options = options or {}
    if options.get("worst"):
        from kdcore.analysis.debug import worst_positions

        out = options.get("positions_out") or str(run_dir / "worst_positions.jsonl")
        report["positions"] = worst_positions(
            student,
            teacher_model,
            examples,
            tokenizer,
            options["worst"],
            out,
            by=options.get("worst_by") or "kl",
            context=options.get("context") or 48,
        )
    if options.get("grads"):
        from kdcore.analysis.debug import gradient_report

        report["grads"] = gradient_report(run_dir, options.get("grad_batches") or 2)
    context = {"run_dir": run_dir, "spec": spec, "tokenizer": tokenizer, **options}
    for reg in registry.entries("metric"):
        metric = reg.component.factory(reg.component.config(), setup)
        extra = metric(student, teacher_model, context)
        if extra:
            report[reg.component.name] = extra
    return report
