"""Debugging a finished run: ``kd eval --grads`` and ``kd eval --worst N``.

``--grads`` rebuilds the run from its saved spec through the engine (teachers, data,
aggregator, aligner, the spec's losses with their schedules), loads the saved student
(and any learnable aggregator/loss parameters from the last checkpoint), and computes the
gradients the engine's training step would compute on the run's last ``n`` training
batches. Parameters are grouped by module: the dotted path up to the module after the
first layer index (``student.blocks.0.attention``), or without an index the path minus
the parameter's own name (``student.embed``). Per group: ``||g||_2`` over the group,
``||w||_2``, their ratio, and the number of NaN and infinite gradient entries.

``--worst N`` compares student and teacher position by position on evaluation batches
(``p`` teacher, ``q`` student, full vocabulary, T = 1):

- ``KL(p||q) = sum_i p_i (ln p_i - ln q_i)``;
- ``JS = 1/2 KL(p||m) + 1/2 KL(q||m)``, ``m = (p + q) / 2`` (in [0, ln 2]);
- top-10 agreement ``|top10(p) & top10(q)| / 10``,

and writes the ``N`` worst positions (by the chosen measure) as JSONL, each with its
decoded context, target token and both models' top-5 tokens.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from kdcore.engine.step import gradients
from kdcore.errors import SpecError
from kdcore.losses.tokens import token_cross_entropy

_INDEX = re.compile(r"^\d+$")
MEASURES = ("kl", "js", "top10")


def group_of(path: str) -> str:
    """``student.blocks.0.attention.q_proj.weight`` -> ``student.blocks.0.attention``."""
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if _INDEX.match(part):
            return ".".join(parts[: min(i + 2, len(parts) - 1)])
    return ".".join(parts[:-1]) or path


def build_run(run_dir: str | Path):
    """The built parts of a finished run, holding its saved trainable state."""
    from kdcore.engine import checkpoint as ckpt
    from kdcore.engine.build import build_parts
    from kdcore.engine.loop import stage_optimizer, stages
    from kdcore.engine.rundir import load_run_spec
    from kdcore.io import load_arrays

    run_dir = Path(run_dir)
    spec = load_run_spec(run_dir)
    spec.callbacks = []  # sinks have nothing to do here, and may need missing extras
    run = build_parts(spec)
    weights = load_arrays(run_dir / "student" / "model.safetensors", "student weights")
    run.student.load_weights(list(weights.items()), strict=True)
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if latest is not None:
        _, trainable, _, _ = ckpt.load_checkpoint(latest)
        others = [(k, v) for k, v in trainable.items() if not k.startswith("student.")]
        if others:
            run.trainable.load_weights(others, strict=False)
    # Freeze what the last stage froze (lr_mult = 0), as the engine does before its steps.
    stage_optimizer(run, stages(spec)[-1])
    mx.eval(run.trainable.parameters())
    return run


def gradient_report(run_dir: str | Path, batches: int = 2) -> dict[str, Any]:
    """Per-group gradient norms and non-finite counts on the run's last ``batches`` steps."""
    if batches < 1:
        raise SpecError(f"--grad-batches must be >= 1, got {batches}")
    run = build_run(run_dir)
    params = dict(tree_flatten(run.trainable.parameters()))
    params.update(tree_flatten(run.trainable.trainable_parameters()))
    steps = list(range(max(0, run.total - batches), run.total)) or [0]
    groups: dict[str, dict[str, Any]] = {}
    for path, value in params.items():
        g = groups.setdefault(group_of(path), {"parameters": 0, "w2": 0.0})
        g["parameters"] += value.size
        g["w2"] += (value.astype(mx.float32) ** 2).sum().item()
    per_batch = []
    for step in steps:
        mx.random.seed(run.spec.run.seed * 1_000_003 + step)  # as the engine seeds the step
        total, terms, _metrics, grads, ntok = gradients(run, step)
        mx.eval(total, terms, grads)
        sums: dict[str, list[float]] = {}
        for path, grad in tree_flatten(grads):
            g = grad.astype(mx.float32)
            finite = mx.isfinite(g)
            s = sums.setdefault(group_of(path), [0.0, 0, 0])
            s[0] += (mx.where(finite, g, 0.0) ** 2).sum().item()
            s[1] += mx.isnan(g).sum().item()
            s[2] += mx.isinf(g).sum().item()
        per_batch.append(
            {
                "step": step,
                "tokens": ntok.tokens,  # every position read, padding included
                "loss_tokens": ntok.loss_tokens,
                "loss": total.item(),
                "terms": {k: v.item() for k, v in terms.items()},
                "grad_norm": math.sqrt(sum(s[0] for s in sums.values())),
                "groups": sums,
            }
        )
    rows = []
    for name, info in groups.items():
        norms = [math.sqrt(b["groups"].get(name, [0.0])[0]) for b in per_batch]
        mean = sum(norms) / len(norms)
        param_norm = math.sqrt(info["w2"])
        rows.append(
            {
                "group": name,
                "parameters": info["parameters"],
                "param_norm": param_norm,
                "grad_norm": mean,
                "grad_norm_max": max(norms),
                "relative": mean / param_norm if param_norm else float("nan"),
                "nan": int(sum(b["groups"].get(name, [0, 0, 0])[1] for b in per_batch)),
                "inf": int(sum(b["groups"].get(name, [0, 0, 0])[2] for b in per_batch)),
                "has_grad": any(name in b["groups"] for b in per_batch),
            }
        )
    for b in per_batch:
        del b["groups"]
    return {
        "batches": per_batch,
        "groups": rows,
        "nonfinite": sum(r["nan"] + r["inf"] for r in rows),
        "frozen_groups": [r["group"] for r in rows if not r["has_grad"]],
    }


def _top(logp: np.ndarray, tokenizer, k: int = 5) -> list[list]:
    ids = np.argsort(-logp)[:k]
    return [[tokenizer.decode([int(i)]), int(i), float(np.exp(logp[i]))] for i in ids]


def position_measures(s_logits: mx.array, t_logits: mx.array) -> dict[str, mx.array]:
    """Per-position KL(p||q), JS and top-10 agreement, [B, L] each (see module doc)."""
    V = min(s_logits.shape[-1], t_logits.shape[-1])
    ls = nn.log_softmax(s_logits[..., :V].astype(mx.float32), -1)
    lt = nn.log_softmax(t_logits[..., :V].astype(mx.float32), -1)
    ps, pt = mx.exp(ls), mx.exp(lt)
    kl = (pt * (lt - ls)).sum(-1)
    lm = mx.log(0.5 * (ps + pt) + 1e-30)
    js = 0.5 * (pt * (lt - lm)).sum(-1) + 0.5 * (ps * (ls - lm)).sum(-1)
    k = min(10, V)
    top_s = mx.argpartition(-ls, k - 1, axis=-1)[..., :k]
    top_t = mx.argpartition(-lt, k - 1, axis=-1)[..., :k]
    agree = (top_s[..., :, None] == top_t[..., None, :]).sum((-1, -2)) / k
    return {"kl": kl, "js": js, "top10": agree, "log_q": ls, "log_p": lt}


def worst_positions(
    student: nn.Module,
    teacher: nn.Module,
    examples: list[dict[str, np.ndarray]],
    tokenizer,
    count: int,
    path: str | Path,
    by: str = "kl",
    context: int = 48,
) -> dict[str, Any]:
    """Write the ``count`` positions where the student departs most from the teacher."""
    if by not in MEASURES:
        raise SpecError(f"--worst-by must be one of {', '.join(MEASURES)}, got {by!r}")
    if teacher is None:
        raise SpecError("--worst compares with a teacher and this run has no teacher model")
    # kl and js: larger is worse; top-10 agreement: smaller is worse.
    sign = -1.0 if by == "top10" else 1.0
    heap: list[tuple[float, int, dict]] = []
    totals = {"kl": 0.0, "js": 0.0, "top10": 0.0}
    tokens = 0.0
    serial = 0
    for batch in examples:
        ids = mx.array(batch["input_ids"])
        labels = mx.array(batch["labels"])
        s = student(ids).logits
        t = teacher(ids).logits
        m = position_measures(s, t)
        s_nll = token_cross_entropy(s, labels)
        t_nll = token_cross_entropy(t, labels)
        mx.eval(m, s_nll, t_nll)
        mask = np.asarray(batch["mask"]) > 0
        tokens += mask.sum()
        arrays = {k: np.array(m[k]) for k in ("kl", "js", "top10")}
        for key in totals:
            totals[key] += float(arrays[key][mask].sum())
        score = sign * arrays[by]
        rows, cols = np.nonzero(mask)
        order = np.argsort(-score[rows, cols])[:count]
        for j in order:
            r, c = int(rows[j]), int(cols[j])
            value = float(score[r, c])
            if len(heap) >= count and value <= heap[0][0]:
                break
            input_ids = np.asarray(batch["input_ids"][r])
            label = int(batch["labels"][r, c])
            record = {
                "example_index": int(batch["example_index"][r]) if "example_index" in batch else r,
                "position": c,
                "kl": float(arrays["kl"][r, c]),
                "js": float(arrays["js"][r, c]),
                "top10_agreement": float(arrays["top10"][r, c]),
                "student_nll": float(np.array(s_nll[r, c])),
                "teacher_nll": float(np.array(t_nll[r, c])),
                "context": tokenizer.decode(input_ids[max(0, c - context + 1) : c + 1]),
                "target": tokenizer.decode([label]) if label >= 0 else None,
                "teacher_top": _top(np.array(m["log_p"][r, c]), tokenizer),
                "student_top": _top(np.array(m["log_q"][r, c]), tokenizer),
            }
            serial += 1
            item = (value, -serial, record)  # -serial: earlier positions win ties
            if len(heap) < count:
                heapq.heappush(heap, item)
            else:
                heapq.heapreplace(heap, item)
    worst = [rec for _, _, rec in sorted(heap, key=lambda x: (-x[0], -x[1]))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rank, record in enumerate(worst, start=1):
            f.write(json.dumps({"rank": rank, **record}, ensure_ascii=False) + "\n")
    tokens = max(float(tokens), 1.0)
    return {
        "file": str(path),
        "by": by,
        "written": len(worst),
        "tokens": int(tokens),
        "mean": {k: v / tokens for k, v in totals.items()},
        "worst_mean": {
            k: (sum(r[n] for r in worst) / len(worst) if worst else float("nan"))
            for k, n in (("kl", "kl"), ("js", "js"), ("top10", "top10_agreement"))
        },
    }
