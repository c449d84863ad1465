"""A model distilled into its own low-bit version, side by side with mlx-lm's DWQ.

One command (``bash examples/quantize/run.sh``, or ``python examples/quantize/run.py``)
makes everything it uses, offline, in ``runs/quantize`` (``KD_OUT`` to change):

1. the full-precision model: a fresh mlx-lm llama trained with ce (``teacher.toml``);
2. then at each of 3 and 4 bits (group size 64, ``affine``):

   - ``rtn``: plain round-to-nearest, ``mlx_lm convert -q``;
   - ``dwq``: ``mlx_lm dwq`` on the same model, rows and token budget (run offline: its
     Hugging Face data loader is replaced by mlx-lm's own local JSONL reader, nothing else);
   - ``kd-hinton``, ``kd-hinton-t2`` and ``kd-tvd``: kdcore's ``quantize`` student
     (``student.toml``) with forward KL (``hinton`` at T = 1, and at DWQ's T = 2) and with
     total variation distance;

3. every model scored on the same held-out bytes: val loss (nats per byte), KL to the
   full-precision model, and the share of the quantization gap each recovers,
   ``(rtn - x) / (rtn - fp)`` of the val loss; time per step and peak MLX memory of each
   training process. ``results.json`` and the table in ``README.md`` are rewritten.

``KD_STEPS`` (quantized runs) and ``KD_TEACHER_STEPS`` shorten a smoke run. The
benchmarks call :func:`main` (``benchmarks/quantization.py``).

Internal subcommands (each a process of its own, so its peak memory is its own):
``run.py kd ARGS`` runs ``kd ARGS``; ``run.py dwq ARGS`` runs ``mlx_lm dwq ARGS`` offline.
Each prints one JSON line last: its peak memory (and DWQ's time per step).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BITS = (3, 4)
GROUP_SIZE = 64
METHODS = ("fp", "rtn", "dwq", "kd-hinton", "kd-hinton-t2", "kd-tvd")
# method -> (loss, temperature); kd-hinton-t2 is DWQ's own objective (KL at T = 2)
KD_LOSSES = {"kd-hinton": ("hinton", 1.0), "kd-hinton-t2": ("hinton", 2.0), "kd-tvd": ("tvd", 1.0)}
VALID_ROWS = 8  # DWQ's own validation rows (one batch; mlx-lm takes 32); not used for scoring
TABLE_START, TABLE_END = "<!-- results:start -->", "<!-- results:end -->"


# ---------------------------------------------------------------- the subprocesses


def _peak_line(**extra: Any) -> None:
    import mlx.core as mx

    print(json.dumps({"peak_memory_bytes": mx.get_peak_memory(), **extra}), flush=True)


def kd_command(argv: list[str]) -> int:
    """``kd ARGV`` in this process, then its peak memory."""
    from kdcore.cli.main import main as kd_main

    code = kd_main(argv)
    if code == 0:
        _peak_line()
    return code


def dwq_command(argv: list[str]) -> int:
    """``mlx_lm dwq ARGV`` with ``--data-path`` a local folder (train.jsonl, valid.jsonl).

    Two changes to mlx-lm's ``main``, both to run here at all:

    - ``mlx_lm.quant.dwq.load_data`` reads a Hugging Face dataset (the ``datasets``
      package and the hub); here it reads the folder with mlx-lm's own local reader
      (``load_local_dataset``: the same ``TextDataset`` processing), the rows in file
      order, the order kdcore's run draws them;
    - ``dwq_quantize`` casts the trained scales and biases to its ``dtype`` argument
      (bfloat16, not a command-line flag) at every step; on a CPU bfloat16 products are
      emulated (16 s a step here instead of about 3), so it gets the model's own float32.

    The training loop's batches are timed where ``dwq_quantize`` asks for them."""
    import mlx.core as mx
    from mlx_lm.quant import dwq
    from mlx_lm.tuner.datasets import load_local_dataset

    loaded: dict[str, list] = {}

    def load_data(tokenizer, data_path, num_samples, max_seq_length, num_valid_samples=32):
        train, valid, _ = load_local_dataset(Path(data_path), tokenizer, types.SimpleNamespace())

        def rows(dataset, count):
            out = []
            for i in range(min(count, len(dataset))):
                tokens, offset = dataset.process(dataset[i])
                out.append((tokens[:max_seq_length], offset))
            return out

        loaded["train"] = rows(train, num_samples)
        return loaded["train"], rows(valid, num_valid_samples)

    stamps: list[float] = []
    iterate = dwq.iterate_batches

    def timed_batches(dataset, *args, **kwargs):
        train = dataset is loaded.get("train")
        for item in iterate(dataset, *args, **kwargs):
            if train:  # the previous step has ended (its loss and parameters evaluated)
                stamps.append(time.perf_counter())
            yield item
        if train:
            stamps.append(time.perf_counter())

    quantize = dwq.dwq_quantize

    def dwq_quantize(*args, **kwargs):
        return quantize(*args, **{**kwargs, "dtype": mx.float32})

    dwq.load_data = load_data
    dwq.iterate_batches = timed_batches
    dwq.dwq_quantize = dwq_quantize
    sys.argv = ["mlx_lm.dwq", *argv]
    dwq.main()
    steps = len(stamps) - 1
    _peak_line(steps=steps, step_s=(stamps[-1] - stamps[0]) / max(steps, 1))
    return 0


def _run(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``, its output to ``log``; the JSON of its last line (if any)."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    text = log.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        sys.stderr.write(text[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)} (log: {log})")
    last = text.strip().splitlines()[-1] if text.strip() else ""
    try:
        result = json.loads(last)
    except ValueError:
        result = {}
    result = result if isinstance(result, dict) else {}
    result["wall_s"] = time.perf_counter() - start
    return result


def _self(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


# ---------------------------------------------------------------- data and scoring


def _toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _dataset(spec: dict):
    from kdcore.registry.setup import Setup
    from kdcore.spec.build import build

    setup = Setup(base_dir=HERE, seed=spec["run"]["seed"])
    return build("dataset", spec["data"]["name"], setup, **spec["data"]["params"])


def write_dwq_data(dataset, directory: Path, steps: int, batch_size: int) -> int:
    """The rows kdcore's run trains on, batch after batch (``dataset.batch(step)``), as
    mlx-lm text records of ``seq_len + 1`` bytes; the first val rows for DWQ's own
    validation. Returns the number of training rows."""
    directory.mkdir(parents=True, exist_ok=True)

    def records(batches) -> list[str]:
        out = []
        for rows in batches:
            for ids, labels in zip(rows["input_ids"], rows["labels"]):
                tokens = [int(t) for t in ids] + [int(labels[-1])]
                text = dataset.tokenizer.decode(tokens)
                if list(text.encode("utf-8")) != tokens:
                    raise SystemExit("the DWQ rows must be plain ASCII bytes to match kdcore's")
                out.append(json.dumps({"text": text}))
        return out

    train = records(dataset.batch(i, batch_size) for i in range(steps))
    valid = records(dataset.batches(batch_size, "val", VALID_ROWS // batch_size))
    (directory / "train.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
    (directory / "valid.jsonl").write_text("\n".join(valid) + "\n", encoding="utf-8")
    return len(train)


def score(folders: dict[str, Path], teacher_dir: Path, rows: list[dict]) -> dict[str, dict]:
    """kdcore's evaluation of each model folder on the same held-out rows, against the
    full-precision model; with mlx-lm's bits per weight of each folder as saved.

    A quantized folder is scored as the float model of its dequantized weights: the same
    function (to float rounding), without MLX's quantized product, ~7x slower on a CPU."""
    import mlx.core as mx
    from mlx_lm.utils import compute_bits_per_weight

    from kdcore.engine.evaluate import evaluate
    from kdcore.models.mlxlm import load_kd_model, load_mlxlm
    from kdcore.models.quantize import dequantized_weights

    teacher, _, _ = load_kd_model(teacher_dir)
    out = {}
    for name, folder in folders.items():
        lm, _ = load_mlxlm(folder)  # as saved, quantized
        model, _, _ = load_kd_model(teacher_dir)
        weights = {k: v.astype(mx.float32) for k, v in dequantized_weights(lm).items()}
        model.load_weights(list(weights.items()), strict=True)
        figures = evaluate(model, teacher, rows)
        out[name] = {
            "val_loss": figures["val_loss"],
            "kl": figures["kl_teacher_student"],
            "top1_agreement": figures["top1_agreement"],
            "bits_per_weight": compute_bits_per_weight(lm),
            "tokens": figures["tokens"],
        }
    return out


# ---------------------------------------------------------------- the comparison


def main(
    out: Path | None = None,
    steps: int | None = None,
    teacher_steps: int | None = None,
    bits: tuple[int, ...] = BITS,
    write: bool = True,
) -> dict:
    """Train, quantize, distil and score; returns the results (also ``results.json`` and
    the README table when ``write``)."""
    out = Path(out or os.environ.get("KD_OUT") or ROOT / "runs" / "quantize").resolve()
    student_spec = _toml(HERE / "student.toml")
    train = student_spec["train"]
    steps = int(steps or os.environ.get("KD_STEPS") or train["steps"])
    teacher_steps = int(teacher_steps or os.environ.get("KD_TEACHER_STEPS") or 0) or None
    batch_size = int(train["batch_size"])
    seq_len = int(student_spec["data"]["params"]["seq_len"])
    lr = float(train["optimizer"]["lr"])
    eval_batches = int(student_spec["eval"]["batches"])
    for name in ["teacher", "data", *[f"{m}{b}" for m in METHODS[1:] for b in bits]]:
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    print(f"== 1. the full-precision model ({out / 'teacher'})", flush=True)
    sets = ["--set", f"train.steps={teacher_steps}"] if teacher_steps else []
    cmd = ["distill", str(HERE / "teacher.toml"), "--output", str(out / "teacher"), *sets]
    runs: dict[str, dict] = {"teacher": _run(_self("kd", *cmd), out / "logs" / "teacher.log")}
    teacher = out / "teacher" / "student"

    dataset = _dataset(student_spec)
    samples = write_dwq_data(dataset, out / "data", steps, batch_size)
    eval_rows = list(dataset.batches(batch_size, "val", eval_batches))

    folders: dict[str, Path] = {"fp": teacher}
    for b in bits:
        print(f"== 2. {b} bits: round-to-nearest", flush=True)
        rtn = out / f"rtn{b}"
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(teacher)]
        cmd += ["--mlx-path", str(rtn), "-q", "--q-bits", str(b)]
        cmd += ["--q-group-size", str(GROUP_SIZE)]
        _run(cmd, out / "logs" / f"rtn{b}.log")
        folders[f"rtn{b}"] = rtn

        print(f"== 2. {b} bits: mlx_lm dwq ({steps} steps of {batch_size} rows)", flush=True)
        cmd = ["--model", str(teacher), "--mlx-path", str(out / f"dwq{b}")]
        cmd += ["--bits", str(b), "--group-size", str(GROUP_SIZE), "--data-path", str(out / "data")]
        cmd += ["--num-samples", str(samples), "--max-seq-length", str(seq_len + 1)]
        cmd += ["--batch-size", str(batch_size), "--learning-rate", str(lr), "--seed", "0"]
        runs[f"dwq{b}"] = _run(_self("dwq", *cmd), out / "logs" / f"dwq{b}.log")
        folders[f"dwq{b}"] = out / f"dwq{b}"

        for method, (loss, temperature) in KD_LOSSES.items():
            print(f"== 2. {b} bits: kdcore quantize + {loss} at T = {temperature}", flush=True)
            run_dir = out / f"{method}{b}"
            sets = [
                f'teachers.0.path="{teacher}"',
                f'student.model.params.path="{teacher}"',
                f"student.init.params.bits={b}",
                f"student.init.params.group_size={GROUP_SIZE}",
                f'losses.0.name="{loss}"',
                f"losses.0.params.temperature={temperature}",
                f"train.steps={steps}",
            ]
            cmd = ["distill", str(HERE / "student.toml"), "--output", str(run_dir)]
            for item in sets:
                cmd += ["--set", item]
            runs[f"{method}{b}"] = _run(_self("kd", *cmd), out / "logs" / f"{method}{b}.log")
            summary = json.loads((run_dir / "summary.json").read_text())
            runs[f"{method}{b}"]["step_s"] = summary["wall_seconds"] / summary["steps"]
            runs[f"{method}{b}"]["trainable_parameters"] = summary["trainable_parameters"]
            folders[f"{method}{b}"] = run_dir / "student"

    print("== 3. scoring every model on the same held-out bytes", flush=True)
    scores = score(folders, teacher, eval_rows)
    results = _results(scores, runs, bits, steps, batch_size, seq_len, lr)
    results["total_wall_s"] = time.perf_counter() - began
    table = render(results)
    print(table)
    if write:
        (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        readme = HERE / "README.md"
        text = readme.read_text(encoding="utf-8")
        head, _, rest = text.partition(TABLE_START)
        _, _, tail = rest.partition(TABLE_END)
        readme.write_text(f"{head}{TABLE_START}\n{table}{TABLE_END}{tail}", encoding="utf-8")
    return results


def _results(scores, runs, bits, steps, batch_size, seq_len, lr) -> dict:
    import mlx.core as mx

    fp = scores["fp"]["val_loss"]
    rows, recovered = [], {}
    rows.append({"bits": None, "method": "fp", **scores["fp"]})
    for b in bits:
        rtn = scores[f"rtn{b}"]["val_loss"]
        gap = rtn - fp
        recovered[str(b)] = {}
        for method in METHODS[1:]:
            key = f"{method}{b}"
            share = (rtn - scores[key]["val_loss"]) / gap if gap > 0 else None
            run = runs.get(key, {})
            rows.append(
                {
                    "bits": b,
                    "method": method,
                    **scores[key],
                    "gap_recovered": share,
                    "step_s": run.get("step_s"),
                    "peak_memory_bytes": run.get("peak_memory_bytes"),
                    "trainable_parameters": run.get("trainable_parameters"),
                }
            )
            if method != "rtn":
                recovered[str(b)][method] = share
    return {
        "budget": {
            "steps": steps,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "tokens": steps * batch_size * seq_len,
            "lr": lr,
            "group_size": GROUP_SIZE,
        },
        "teacher": {"train_s": runs["teacher"]["wall_s"]},
        "rows": rows,
        "gap_recovered": recovered,
        "machine": {"cpus": os.cpu_count(), "mlx": mx.__version__},
    }


def render(results: dict) -> str:
    budget = results["budget"]
    lines = [
        f"{budget['steps']} steps of {budget['batch_size']} x {budget['seq_len']} bytes "
        f"({budget['tokens']:,} tokens) for each trained row; val loss in nats per byte on "
        f"{results['rows'][0]['tokens']:,} held-out bytes.",
        "",
        "| bits | model | val loss | KL to fp | gap recovered | s / step | peak MB | bits/weight |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for row in results["rows"]:
        peak = row.get("peak_memory_bytes")
        lines.append(
            f"| {row['bits'] or '-'} | {row['method']} | {row['val_loss']:.4f} | "
            f"{row['kl']:.4f} | {num(row.get('gap_recovered'), '.2f')} | "
            f"{num(row.get('step_s'), '.2f')} | {num(peak and peak / 1e6, '.0f')} | "
            f"{row['bits_per_weight']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "kd":
        sys.exit(kd_command(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "dwq":
        sys.exit(dwq_command(sys.argv[2:]))
    main()
