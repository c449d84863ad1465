"""``kd eval`` and ``kd data inspect``: measuring a finished run, looking at data."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn

from kdcore.errors import CheckpointError, SpecError
from kdcore.io import read_json
from kdcore.losses import token_cross_entropy
from kdcore.models import count_parameters
from kdcore.plugins import get_registry
from kdcore.setup import Setup
from kdcore.spec import load_spec


def load_run_spec(run_dir: str | Path):
    """The resolved spec a run was made with, its paths relative to the original spec."""
    run_dir = Path(run_dir)
    meta = read_json(run_dir / "run.json", "run metadata")
    spec = load_spec(run_dir / "spec.toml")
    spec.base_dir = meta.get("spec_dir", str(run_dir))
    return spec


def distribution_stats(student, teacher, batches) -> dict[str, float]:
    """Token-averaged NLL of both, KL(t||s), JS, top-1 agreement and top-5 overlap."""
    sums = dict.fromkeys(["s_nll", "t_nll", "kl", "js", "top1", "top5"], 0.0)
    tokens = 0.0
    for batch in batches:
        ids, labels, mask = (mx.array(batch[k]) for k in ("input_ids", "labels", "mask"))
        s = student(ids).logits.astype(mx.float32)
        sums["s_nll"] += (token_cross_entropy(s, labels) * mask).sum().item()
        tokens += mask.sum().item()
        if teacher is None:
            continue
        t = teacher(ids).logits.astype(mx.float32)
        V = min(s.shape[-1], t.shape[-1])
        s, t = s[..., :V], t[..., :V]
        sums["t_nll"] += (token_cross_entropy(t, labels) * mask).sum().item()
        ls, lt = nn.log_softmax(s, -1), nn.log_softmax(t, -1)
        ps, pt = mx.exp(ls), mx.exp(lt)
        sums["kl"] += ((pt * (lt - ls)).sum(-1) * mask).sum().item()
        lm = mx.log(0.5 * (ps + pt) + 1e-30)
        js = 0.5 * (pt * (lt - lm)).sum(-1) + 0.5 * (ps * (ls - lm)).sum(-1)
        sums["js"] += (js * mask).sum().item()
        sums["top1"] += ((s.argmax(-1) == t.argmax(-1)) * mask).sum().item()
        k = min(5, V)
        top_s = mx.argpartition(-s, k - 1, axis=-1)[..., :k]
        top_t = mx.argpartition(-t, k - 1, axis=-1)[..., :k]
        overlap = (top_s[..., :, None] == top_t[..., None, :]).sum((-1, -2)) / k
        sums["top5"] += (overlap * mask).sum().item()
    tokens = max(tokens, 1.0)
    out = {"student_loss": sums["s_nll"] / tokens, "tokens": int(tokens)}
    out["student_ppl"] = math.exp(min(out["student_loss"], 50))
    if teacher is not None:
        out["teacher_loss"] = sums["t_nll"] / tokens
        out["teacher_ppl"] = math.exp(min(out["teacher_loss"], 50))
        out["kl_teacher_student"] = sums["kl"] / tokens
        out["js"] = sums["js"] / tokens
        out["top1_agreement"] = sums["top1"] / tokens
        out["top5_overlap"] = sums["top5"] / tokens
        out["quality_retention"] = out["teacher_ppl"] / out["student_ppl"]
    return out


def forward_tokens_per_second(model, batch, repeats: int = 3) -> float:
    ids = mx.array(batch["input_ids"])
    mx.eval(model(ids).logits)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(model(ids).logits)
    return ids.size * repeats / (time.perf_counter() - start)


def evaluate_run(run_dir, data=None, batches: int | None = 16, options: dict | None = None):
    from kdcore.train import Run  # noqa: F401  (registers nothing; keeps import order simple)

    run_dir = Path(run_dir)
    if not (run_dir / "student").is_dir():
        raise CheckpointError(f"{run_dir} has no student/ folder: not a finished kd distill run")
    from kdcore.analysis.temperature import load_model_dir, run_teacher

    spec = load_run_spec(run_dir)
    student, tokenizer = load_model_dir(run_dir / "student")
    registry = get_registry()
    teacher_model, _, _ = run_teacher(spec)
    setup = Setup(base_dir=Path(spec.base_dir), seed=spec.run.seed, tokenizer=tokenizer)
    if data is not None:
        from kdcore.analysis.temperature import dataset_for_file

        seq_len = getattr(spec.data.config, "seq_len", 128)
        dataset = dataset_for_file(data, tokenizer, seq_len, spec.run.seed)
        split = "train"
    else:
        dataset = registry.get("dataset", spec.data.name).factory(spec.data.config, setup)
        split = "val"
    batch_size = spec.train.batch_size
    examples = list(dataset.batches(batch_size, split, batches))
    if not examples:
        raise SpecError(f"no {split} data to evaluate on")
    report: dict[str, Any] = {"run": str(run_dir), "split": split if data is None else str(data)}
    report.update(distribution_stats(student, teacher_model, examples))
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


_FORMAT_BY_SUFFIX = {".txt": "text", ".jsonl": "jsonl", ".gz": "jsonl"}


def inspect_data(source: str, fmt: str | None, limit: int = 3, overrides=None) -> dict:
    path = Path(source)
    registry = get_registry()
    if path.suffix in (".toml", ".json") and fmt is None:
        spec = load_spec(path, overrides or [])
        setup = Setup(base_dir=path.parent, seed=spec.run.seed)
        dataset = registry.get("dataset", spec.data.name).factory(spec.data.config, setup)
        name = spec.data.name
    else:
        name = fmt or _FORMAT_BY_SUFFIX.get(path.suffix)
        if name is None:
            raise SpecError(f"cannot tell the format of {path}: pass --format")
        try:
            component = registry.get("dataset", name)
        except KeyError as exc:
            raise SpecError(exc.args[0]) from None
        from kdcore.setup import make_config

        config = make_config("dataset", name, path=str(path.resolve()))
        dataset = component.factory(config, Setup(base_dir=Path.cwd()))
    report = {"source": str(source), "format": name}
    report.update(dataset.inspect(limit))
    return report


__all__ = ["distribution_stats", "evaluate_run", "inspect_data", "load_run_spec", "attrs"]
