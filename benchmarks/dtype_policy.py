"""A float16 checkpoint on a CPU: kd distill's step with the dtype policy (float32 compute)
against the same checkpoint's teacher computed in float16 (what the mlx-lm teacher source
did before the policy, and what a spec gets with the teacher's params.dtype = "float16"),
and against a float32 import, in one run.

The model is SmolLM2-135M-Instruct imported from its GGUF (``kd import --dtype float16``,
the dense 16-bit folder converters and mlx-community publish), the teacher of a student
loaded from the same folder (full depth; the student computes in float32 in every row:
AdamW on float16 weights turns them NaN within two steps here), on GSM8K chat records; each
configuration runs in its own process, ``STEPS`` steps, and the step time is the median of
all but the first.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import run_isolated

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "smollm2" / "data" / "gsm8k_chat.jsonl"
STEPS = 4


def smollm2_gguf() -> Path:
    """The GGUF the test suite fetches (tests/real_models.py: one download, cached)."""
    spec = importlib.util.spec_from_file_location("real_models", ROOT / "tests" / "real_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.smollm2_gguf()


def run_spec(folder: Path, dtype: str | None, out: Path) -> dict:
    params = {} if dtype is None else {"dtype": dtype}
    return {
        "run": {"name": f"dtype-{dtype or 'policy'}", "seed": 0},
        "data": {
            "name": "chat",
            "params": {"path": str(DATA), "tokenizer": str(folder), "seq_len": 256},
        },
        "teachers": [{"source": "mlx-lm", "path": str(folder), "params": params}],
        "student": {"model": {"name": "mlx-lm", "params": {"path": str(folder)}}},
        "losses": [{"name": "ce", "weight": 0.5}, {"name": "hinton", "weight": 0.5}],
        "train": {
            "steps": STEPS,
            "batch_size": 2,
            "optimizer": {"name": "adamw", "lr": 1e-5},
            "log_every": 1,
        },
        "eval": {"batches": 1},
    }


def child(folder: str, dtype: str) -> dict:
    from kdcore.engine.distill import distill

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        summary = distill(
            run_spec(Path(folder), None if dtype == "policy" else dtype, out),
            output=out,
            progress=False,
        )
        steps = [
            json.loads(line)["step_s"]
            for line in (out / "metrics.jsonl").read_text().splitlines()
            if "step_s" in json.loads(line)
        ]
    return {
        "step_s": statistics.median(steps[1:]),
        "steps_s": steps,
        "val_loss": summary["eval"]["val_loss"],
        "peak_rss_bytes": summary.get("peak_rss_bytes"),
    }


def main() -> None:
    from kdcore.gguf.convert import import_gguf

    gguf = smollm2_gguf()
    load = os.getloadavg()[0]  # the timings mean something only on a quiet machine
    with tempfile.TemporaryDirectory() as tmp:
        f16 = import_gguf(gguf, Path(tmp) / "f16", "float16")
        f32 = import_gguf(gguf, Path(tmp) / "f32", "float32")
        runs = {
            "float16_folder_policy": run_isolated("dtype_policy", ["--child", str(f16), "policy"]),
            "float16_folder_as_float16": run_isolated(
                "dtype_policy", ["--child", str(f16), "float16"]
            ),
            "float32_folder": run_isolated("dtype_policy", ["--child", str(f32), "policy"]),
        }
    policy = runs["float16_folder_policy"]["step_s"]
    print(
        json.dumps(
            {
                **runs,
                "steps": STEPS,
                "load_at_start": load,
                "tokens_per_step": 2 * 256,
                "policy_vs_float32_folder": policy / runs["float32_folder"]["step_s"],
                "float16_compute_vs_policy": runs["float16_folder_as_float16"]["step_s"] / policy,
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
    else:
        main()
