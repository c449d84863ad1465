"""On-policy distillation (GKD) against off-policy and sequence-level KD, on HH chat data.

    examples/on_policy/run.sh [--quick] [--seeds 0 1 2] [--out runs/on_policy]

One command, everything offline and made by the example itself (kdcore's own training):

1. the teacher: ``teacher.toml``, cross-entropy on ``data/hh_chat.jsonl.gz`` (single-exchange
   chat records from the bundled HH dialogues, ``make_data.py``), rendered with the byte-level
   ChatML tokenizer in ``data/tokenizer`` (``<|im_end|>`` ends a reply);
2. students of one size and budget (``student.toml``: same model, steps, batch and optimiser),
   at each seed:

   - ``fkl``: off-policy forward KL (``gjsd``, beta 0), on the dataset's replies;
   - ``gjsd``: off-policy generalised JSD, beta 0.5;
   - ``gjsd, on-policy 0.5`` and ``gjsd, on-policy 1``: the same loss, ``train.on_policy.lmbda``
     0.5 and 1 (a share of the batches are the student's own replies to the batch's prompts);
   - ``reverse KL, on-policy 1``: ``reverse_kl`` on the student's replies only;
   - ``seq-KD``: ``ce`` on the teacher's sampled replies to the training prompts (``kd sample``,
     one file, made once);

3. for each student: the held-out loss (cross-entropy on the held-out records' replies, the
   dataset's val split), the teacher's per-token NLL of the student's own replies to the
   held-out prompts (what on-policy distillation lowers: each student samples at temperature
   1, up to 64 tokens, from the same random state; the teacher scores every sampled token,
   the end-of-turn token included), the replies' mean length, and wall time per training step.

Writes ``results/results.json`` and ``results/results.md`` beside this script (``--quick``: a
smoke run of a few steps, written to ``OUT/quick.{json,md}`` only). ``--out`` holds the runs; a
teacher already there (``OUT/teacher/summary.json``) is reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import kdcore
from kdcore import app
from kdcore.cli.main import main as kd
from kdcore.engine import onpolicy
from kdcore.losses.tokens import log_softmax

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MAX_NEW = 64
EVAL_SEED = 1234

# name -> (losses, train.on_policy.lmbda, trained on the teacher's samples)
STUDENTS = {
    "fkl (off-policy)": ([{"name": "gjsd", "params": {"beta": 0.0}}], 0.0, False),
    "gjsd (off-policy)": ([{"name": "gjsd", "params": {"beta": 0.5}}], 0.0, False),
    "gjsd, on-policy 0.5": ([{"name": "gjsd", "params": {"beta": 0.5}}], 0.5, False),
    "gjsd, on-policy 1": ([{"name": "gjsd", "params": {"beta": 0.5}}], 1.0, False),
    "reverse KL, on-policy 1": ([{"name": "reverse_kl"}], 1.0, False),
    "seq-KD (ce on teacher samples)": ([{"name": "ce"}], 0.0, True),
}

QUICK = {"teacher_steps": 12, "student_steps": 4, "prompts": 8, "sample_limit": 24, "new": 12}


def read_spec(name: str) -> dict:
    """A spec of this folder as a dict, its data and tokenizer paths made absolute."""
    spec = tomllib.loads((HERE / name).read_text(encoding="utf-8"))
    params = spec["data"]["params"]
    for key in ("path", "tokenizer"):
        params[key] = str(HERE / params[key])
    return spec


def train_teacher(out: Path, steps: int | None) -> Path:
    folder = out / "teacher"
    if (folder / "summary.json").exists():
        print(f"teacher: reusing {folder}", file=sys.stderr)
        return folder / "student"
    spec = read_spec("teacher.toml")
    if steps is not None:
        spec["train"]["steps"] = steps
        spec["train"]["log_every"] = 1
    started = time.perf_counter()
    summary = app.distill(spec, output=folder, progress=False)
    print(
        f"teacher: {summary['steps']} steps, val loss {summary['eval']['val_loss']:.4f} "
        f"({time.perf_counter() - started:.0f}s)",
        file=sys.stderr,
    )
    return folder / "student"


def sample_teacher(out: Path, teacher: Path, limit: int | None, new: int) -> Path:
    """``kd sample``: the teacher's replies to every training prompt (the seq-KD data)."""
    target = out / "teacher_samples.jsonl.gz"
    if target.exists():
        return target
    spec = read_spec("student.toml")
    spec["teachers"] = [{"path": str(teacher)}]
    spec_file = out / "sample_spec.json"
    spec_file.write_text(json.dumps(spec))
    args = ["sample", str(spec_file), "--output", str(target), "--max-new-tokens", str(new)]
    # every reply, cut ones included, as the seq-KD figures in docs/results.md were made
    # (kd sample now drops replies cut at --max-new-tokens by default)
    args += ["--truncated", "keep"]
    args += ["--batch-size", "32", "--json"] + (["--limit", str(limit)] if limit else [])
    if kd(args) != 0:
        raise SystemExit("kd sample failed")
    return target


def student_spec(name: str, seed: int, teacher: Path, samples: Path, quick: bool) -> dict:
    losses, lmbda, seq_kd = STUDENTS[name]
    spec = read_spec("student.toml")
    spec["run"] = {"name": name, "seed": seed}
    spec["losses"] = losses
    spec["teachers"] = [{"path": str(teacher)}]
    spec["train"]["on_policy"]["lmbda"] = lmbda
    if seq_kd:  # ce on the teacher's replies: no teacher in the run, all of the file trains
        spec.pop("teachers")
        spec["data"]["params"].update(path=str(samples), val_fraction=0.0)
    if quick:
        spec["train"].update(steps=QUICK["student_steps"], log_every=1)
        spec["train"]["on_policy"]["max_new_tokens"] = QUICK["new"]
        spec["train"]["optimizer"]["lr"] = 3e-3
    return spec


def held_out_prompts(limit: int | None) -> tuple[object, list[np.ndarray]]:
    """The held-out split of the chat data (as the students read it) and its prompts."""
    spec = app.load_spec(read_spec("student.toml") | {"teachers": []})
    data = app.get_registry().get("dataset", spec.data.name)
    dataset = data.factory(spec.data.config, kdcore.Setup(seed=0))
    n = dataset.num_prompts("val") if limit is None else limit
    prompts = [np.asarray(p, np.int32) for p in dataset.prompts(0, n, "val")]
    return dataset, prompts


def score(
    student_dir: Path, teacher, dataset, prompts: list[np.ndarray], new: int, eval_batches: int
) -> dict:
    """The held-out loss, and the teacher's per-token NLL of the student's own replies."""
    student, _, _ = app.load_model(student_dir)
    student.eval()
    batches = dataset.batches(8, "val", eval_batches)
    held_out = app.evaluate(student, teacher, batches)
    stops = onpolicy.default_stops(dataset.tokenizer, dataset)
    mx.random.seed(EVAL_SEED)  # every student samples from the same random state
    replies = []
    for start in range(0, len(prompts), 16):
        chunk = prompts[start : start + 16]
        replies += onpolicy.continue_prompts(student, chunk, new, 1.0, 1.0, stops)
    nll, tokens = 0.0, 0
    for start in range(0, len(prompts), 16):
        built = onpolicy.assemble(prompts[start : start + 16], replies[start : start + 16])
        logits = teacher(mx.array(built["input_ids"])).logits.astype(mx.float32)
        labels = mx.array(np.where(built["mask"] > 0, built["labels"], 0))
        picked = mx.take_along_axis(log_softmax(logits), labels[..., None], axis=-1)[..., 0]
        mask = mx.array(built["mask"])
        nll -= (picked * mask).sum().item()
        tokens += int(built["mask"].sum())
    return {
        "held_out_loss": held_out["val_loss"],
        "top1_agreement": held_out["top1_agreement"],
        "teacher_nll_of_samples": nll / max(tokens, 1),
        "sample_length": tokens / len(prompts),
        "stopped": sum(len(r) > 0 and int(r[-1]) in stops for r in replies) / len(prompts),
    }


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def table(results: dict) -> str:
    seeds = results["seeds"]
    head = (
        f"Students of {results['student_parameters']:,} parameters, {results['steps']} steps "
        f"of {results['batch_size']} rows each, distilled from a {results['teacher_parameters']:,}"
        f"-parameter teacher (held-out loss {results['teacher']['held_out_loss']:.4f}; its NLL "
        f"of its own replies {results['teacher']['teacher_nll_of_samples']:.4f}); mean ± sd "
        f"over seeds {', '.join(map(str, seeds))}.\n\n"
    )
    rows = [
        "| student | held-out loss (nats/token) | teacher NLL of the student's replies "
        "(nats/token) | reply length (tokens) | replies ended | s / step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["students"].items():

        def cell(key: str, digits: int = 4, r: dict = r) -> str:
            return f"{r[key]['mean']:.{digits}f} ± {r[key]['sd']:.{digits}f}"

        rows.append(
            f"| {name} | {cell('held_out_loss')} | {cell('teacher_nll_of_samples')} | "
            f"{cell('sample_length', 1)} | {cell('stopped', 2)} | {cell('seconds_per_step', 3)} |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/on_policy"))
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few steps")
    args = parser.parse_args(argv)
    quick = QUICK if args.quick else None
    out = (args.out / "quick" if quick else args.out).resolve()  # specs written there name it
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds[:1] if quick else args.seeds
    new = quick["new"] if quick else MAX_NEW
    started = time.perf_counter()

    teacher_dir = train_teacher(out, quick and quick["teacher_steps"])
    samples = sample_teacher(out, teacher_dir, quick and quick["sample_limit"], new)
    teacher, _, _ = app.load_model(teacher_dir)
    teacher.eval()
    dataset, prompts = held_out_prompts(quick and quick["prompts"])
    eval_batches = 1 if quick else 8

    per_student: dict[str, list[dict]] = {name: [] for name in STUDENTS}
    for seed in seeds:
        for name in STUDENTS:
            run = out / f"seed{seed}" / name.split(" (")[0].replace(", ", "-").replace(" ", "_")
            shutil.rmtree(run, ignore_errors=True)  # a student is always trained afresh
            spec = student_spec(name, seed, teacher_dir, samples, bool(quick))
            summary = app.distill(spec, output=run, progress=False)
            figures = score(run / "student", teacher, dataset, prompts, new, eval_batches)
            figures["seconds_per_step"] = summary["wall_seconds"] / summary["steps"]
            per_student[name].append(figures)
            print(
                f"seed {seed} {name}: held-out {figures['held_out_loss']:.4f}, teacher NLL "
                f"of its replies {figures['teacher_nll_of_samples']:.4f}, "
                f"{figures['seconds_per_step']:.3f}s/step",
                file=sys.stderr,
            )
    teacher_figures = score(teacher_dir, teacher, dataset, prompts, new, eval_batches)
    student_summary = json.loads((run / "summary.json").read_text())
    results = {
        "command": "examples/on_policy/run.sh" + (" --quick" if quick else ""),
        "seeds": seeds,
        "steps": student_summary["steps"],
        "batch_size": spec["train"]["batch_size"],
        "max_new_tokens": new,
        "held_out_prompts": len(prompts),
        "student_parameters": student_summary["student_parameters"],
        "teacher_parameters": app.count_parameters(teacher),
        "teacher": teacher_figures,
        "students": {
            name: {key: spread([f[key] for f in runs]) for key in runs[0]}
            for name, runs in per_student.items()
        },
        "seconds": time.perf_counter() - started,
    }
    target = out / "quick" if quick else RESULTS / "results"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    target.with_suffix(".md").write_text(table(results))
    print(table(results))
    print(f"wrote {target}.json and {target}.md ({results['seconds']:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
