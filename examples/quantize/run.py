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
SEEDS = 3  # each trained row runs once per seed: its rows, their order and DWQ's shuffle
SCORE_BATCHES = 64  # held-out batches of 8 x 64 bytes scored per model (32,768 bytes)
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


def _dataset(spec: dict, seed: int):
    from kdcore.registry.setup import Setup
    from kdcore.spec.build import build

    setup = Setup(base_dir=HERE, seed=seed)
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
    seeds: int | None = None,
) -> dict:
    """Train, quantize, distil (each trained row once per seed) and score; returns the
    results (also ``results.json`` and the README table when ``write``)."""
    out = Path(out or os.environ.get("KD_OUT") or ROOT / "runs" / "quantize").resolve()
    student_spec = _toml(HERE / "student.toml")
    train = student_spec["train"]
    steps = int(steps or os.environ.get("KD_STEPS") or train["steps"])
    teacher_steps = int(teacher_steps or os.environ.get("KD_TEACHER_STEPS") or 0) or None
    seeds = int(seeds or os.environ.get("KD_SEEDS") or SEEDS)
    batch_size = int(train["batch_size"])
    seq_len = int(student_spec["data"]["params"]["seq_len"])
    lr = float(train["optimizer"]["lr"])
    # only what this script makes (a previous run's, any number of seeds)
    patterns = ["teacher", "data*", *[f"{m}{b}*" for m in METHODS[1:] for b in bits]]
    for pattern in patterns:
        for old in out.glob(pattern):
            shutil.rmtree(old, ignore_errors=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    print(f"== 1. the full-precision model ({out / 'teacher'})", flush=True)
    sets = ["--set", f"train.steps={teacher_steps}"] if teacher_steps else []
    cmd = ["distill", str(HERE / "teacher.toml"), "--output", str(out / "teacher"), *sets]
    runs: dict[str, dict] = {"teacher": _run(_self("kd", *cmd), out / "logs" / "teacher.log")}
    teacher = out / "teacher" / "student"
    # the held-out split does not depend on the seed
    score_rows = list(_dataset(student_spec, 0).batches(batch_size, "val", SCORE_BATCHES))

    folders: dict[str, Path] = {"fp": teacher}
    for b in bits:
        print(f"== 2. {b} bits: round-to-nearest", flush=True)
        rtn = out / f"rtn{b}"
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(teacher)]
        cmd += ["--mlx-path", str(rtn), "-q", "--q-bits", str(b)]
        cmd += ["--q-group-size", str(GROUP_SIZE)]
        _run(cmd, out / "logs" / f"rtn{b}.log")
        folders[f"rtn{b}"] = rtn

    for seed in range(seeds):
        data = out / f"data-s{seed}"
        samples = write_dwq_data(_dataset(student_spec, seed), data, steps, batch_size)
        for b in bits:
            tag = f"{b}-s{seed}"
            print(f"== 2. {b} bits, seed {seed}: mlx_lm dwq ({steps} steps)", flush=True)
            cmd = ["--model", str(teacher), "--mlx-path", str(out / f"dwq{tag}")]
            cmd += ["--bits", str(b), "--group-size", str(GROUP_SIZE), "--data-path", str(data)]
            cmd += ["--num-samples", str(samples), "--max-seq-length", str(seq_len + 1)]
            cmd += ["--batch-size", str(batch_size), "--learning-rate", str(lr)]
            cmd += ["--seed", str(seed)]
            runs[f"dwq{tag}"] = _run(_self("dwq", *cmd), out / "logs" / f"dwq{tag}.log")
            folders[f"dwq{tag}"] = out / f"dwq{tag}"

            for method, (loss, temperature) in KD_LOSSES.items():
                print(f"== 2. {b} bits, seed {seed}: quantize + {loss} at T = {temperature}")
                run_dir = out / f"{method}{tag}"
                sets = [
                    f"run.seed={seed}",
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
                log = out / "logs" / f"{method}{tag}.log"
                runs[f"{method}{tag}"] = _run(_self("kd", *cmd), log)
                summary = json.loads((run_dir / "summary.json").read_text())
                runs[f"{method}{tag}"]["step_s"] = summary["wall_seconds"] / summary["steps"]
                runs[f"{method}{tag}"]["trainable_parameters"] = summary["trainable_parameters"]
                folders[f"{method}{tag}"] = run_dir / "student"

    print("== 3. scoring every model on the same held-out bytes", flush=True)
    scores = score(folders, teacher, score_rows)
    results = _results(scores, runs, bits, seeds, steps, batch_size, seq_len, lr)
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


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _results(scores, runs, bits, seeds, steps, batch_size, seq_len, lr) -> dict:
    """One row per (bits, method): the mean over seeds of each figure, and each seed's
    val loss, KL and gap share (``per_seed``). The gap share of a seed is
    ``(rtn - x) / (rtn - fp)`` of the val loss; rtn and fp are the same for every seed."""
    import mlx.core as mx

    fp = scores["fp"]["val_loss"]
    rows, recovered, spread = [], {}, {}
    rows.append({"bits": None, "method": "fp", **scores["fp"], "seeds": 1})
    for b in bits:
        rtn = scores[f"rtn{b}"]["val_loss"]
        gap = rtn - fp
        recovered[str(b)], spread[str(b)] = {}, {}
        rows.append({"bits": b, "method": "rtn", **scores[f"rtn{b}"], "gap_recovered": 0.0})
        rows[-1]["seeds"] = 1
        for method in METHODS[2:]:
            keys = [f"{method}{b}-s{seed}" for seed in range(seeds)]
            per_seed = []
            for key in keys:
                share = (rtn - scores[key]["val_loss"]) / gap if gap > 0 else None
                per_seed.append(
                    {
                        "val_loss": scores[key]["val_loss"],
                        "kl": scores[key]["kl"],
                        "gap_recovered": share,
                        "step_s": runs[key].get("step_s"),
                    }
                )
            row = {"bits": b, "method": method, "seeds": seeds}
            for name in ("val_loss", "kl", "top1_agreement", "bits_per_weight", "tokens"):
                row[name] = _mean([scores[k][name] for k in keys])
            row["gap_recovered"] = _mean([x["gap_recovered"] for x in per_seed])
            row["step_s"] = _mean([x["step_s"] for x in per_seed])
            row["peak_memory_bytes"] = max(runs[k].get("peak_memory_bytes") or 0 for k in keys)
            row["trainable_parameters"] = runs[keys[0]].get("trainable_parameters")
            row["per_seed"] = per_seed
            rows.append(row)
            recovered[str(b)][method] = row["gap_recovered"]
            shares = [x["gap_recovered"] for x in per_seed if x["gap_recovered"] is not None]
            spread[str(b)][method] = [min(shares), max(shares)] if shares else None
    return {
        "budget": {
            "steps": steps,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "tokens": steps * batch_size * seq_len,
            "lr": lr,
            "group_size": GROUP_SIZE,
            "seeds": seeds,
        },
        "teacher": {"train_s": runs["teacher"]["wall_s"]},
        "rows": rows,
        "gap_recovered": recovered,
        "gap_recovered_range": spread,
        "machine": {"cpus": os.cpu_count(), "mlx": mx.__version__},
    }


def render(results: dict) -> str:
    budget = results["budget"]
    lines = [
        f"{budget['steps']} steps of {budget['batch_size']} x {budget['seq_len']} bytes "
        f"({budget['tokens']:,} tokens) for each trained row, {budget['seeds']} seeds (the "
        "rows drawn, their order, DWQ's shuffle); each figure is the mean over the seeds, "
        "the gap share's range in brackets; val loss in nats per byte on "
        f"{results['rows'][0]['tokens']:,} held-out bytes.",
        "",
        "| bits | model | val loss | KL to fp | gap recovered | s / step | peak MB | bits/weight |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for row in results["rows"]:
        peak = row.get("peak_memory_bytes")
        share = num(row.get("gap_recovered"), ".2f")
        seeds = [x["gap_recovered"] for x in row.get("per_seed", [])]
        if len(seeds) > 1 and None not in seeds:
            share += f" [{min(seeds):.2f}, {max(seeds):.2f}]"
        lines.append(
            f"| {row['bits'] or '-'} | {row['method']} | {row['val_loss']:.4f} | "
            f"{row['kl']:.4f} | {share} | "
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
