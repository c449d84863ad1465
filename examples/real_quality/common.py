"""What every part of the real-model quality example shares: paths, the budgets, the rows
of both tables, and small file helpers (``run.py`` is the driver)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_OUT = ROOT / "runs" / "real_quality"
RESULTS = HERE / "results"
UNITS = RESULTS / "units"  # every full-budget unit's result, per record: kept in the repository
TRAIN_DATA = HERE / "data" / "train.jsonl.gz"
HELDOUT_DATA = HERE / "data" / "heldout.jsonl.gz"
MANIFEST = HERE / "data" / "manifest.json"
GROUP_SIZE = 64


# ---------------------------------------------------------------- budgets and rows


@dataclass(frozen=True)
class Budget:
    """What a table costs: every row of table 1 trains ``t1_steps`` steps of ``batch_size``
    rows of ``seq_len`` tokens; every trained row of table 2 ``t2_steps``."""

    seq_len: int
    batch_size: int
    t1_steps: int
    t2_steps: int
    checkpoint_every: int
    onpolicy_new: int  # train.on_policy.max_new_tokens of the gkd row
    heldout_per_source: int | None  # held-out records scored per source (None: all)
    greedy_per_source: int  # held-out prompts answered greedily per source (table 1)
    greedy_new: int  # the most tokens of a greedy answer
    max_records: int | None  # training records read (None: all)

    @property
    def tokens_t1(self) -> int:
        return self.t1_steps * self.batch_size * self.seq_len

    @property
    def tokens_t2(self) -> int:
        return self.t2_steps * self.batch_size * self.seq_len


# README.md ("Budget") has the arithmetic behind these numbers: about 4.6 h for table 1 and
# 2.5 h for table 2 (an estimate) on the 2-core machine. max_records: the first 1,700
# training records (1,683 after the run's 1% val split, ~1,250 rows of 256), so that a
# table-1 row is about one epoch and the top-64 cache holds no row that no run reads.
FULL = Budget(
    seq_len=256,
    batch_size=8,
    t1_steps=150,
    t2_steps=8,
    checkpoint_every=25,
    onpolicy_new=128,
    heldout_per_source=None,
    greedy_per_source=24,
    greedy_new=128,
    max_records=1700,
)
# The plumbing in minutes: the full shapes (so the step times calibrate the budget), a few
# steps, a few records; one seed and 4 bits unless --seeds and --bits say otherwise.
QUICK = Budget(
    seq_len=256,
    batch_size=8,
    t1_steps=4,
    t2_steps=2,
    checkpoint_every=2,
    onpolicy_new=16,
    heldout_per_source=4,
    greedy_per_source=2,
    greedy_new=16,
    max_records=96,
)

CE = {"name": "ce", "weight": 0.5}
FKL = {"name": "hinton", "weight": 0.5, "params": {"temperature": 1.0}}
T1_LOSSES: dict[str, list[dict]] = {
    "sft": [{"name": "ce", "weight": 1.0}],
    "kd_fkl": [CE, FKL],
    "kd_cache": [CE, FKL],
    "kd_rkl": [CE, {"name": "reverse_kl", "weight": 0.5}],
    # the on-policy phase; its warm-up uses kd_fkl's losses
    "gkd": [{"name": "gjsd", "params": {"beta": 0.5}}],
}
T1_ROWS = tuple(T1_LOSSES)
T1_SEEDS = {"sft": 3, "kd_fkl": 3}  # the others: 1
GKD_LMBDA = 0.5
GKD_WARM_SHARE = 0.5  # share of the steps trained off-policy before GKD
GKD_SEED_OFFSET = 1000  # the on-policy phase's seed: seed + this

# method -> (loss, temperature, layers left in float32) for kdcore's quantize students;
# kd_fkl_fphead keeps the tied embedding (the head) in float32: what the head's bits cost
T2_KD: dict[str, tuple[str, float, list[str]]] = {
    "kd_fkl": ("hinton", 1.0, []),
    "kd_fkl_t2": ("hinton", 2.0, []),
    "kd_tvd": ("tvd", 1.0, []),
    "kd_fkl_fphead": ("hinton", 1.0, ["embed_tokens"]),
    "kd_fkl_h8": ("hinton", 1.0, []),
}
# method -> the per-layer widths (quantize's `layers`) of its student; kd_fkl_h8 keeps the
# tied embedding (the head) at 8 bits, group size 64, the rest at the row's bits, as
# mixed-precision recipes do: what a cheaper head costs next to kd_fkl_fphead's float one
T2_LAYERS: dict[str, list[dict]] = {
    "kd_fkl_h8": [{"pattern": "embed_tokens", "bits": 8, "group_size": GROUP_SIZE}],
}
# method -> (learning rate, batch size); None: the kdcore run's
T2_DWQ = {"dwq": (None, None), "dwq_default_lr": (1e-6, 4)}
T2_ROWS = ("rtn", *T2_DWQ, *T2_KD)
T2_DEFAULT = ("rtn", "dwq", "kd_fkl", "kd_tvd")
BITS = (3, 4)


# ---------------------------------------------------------------- small helpers


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_toml(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: Any, compact: bool = False) -> None:
    """Atomically (a temporary file renamed over it): a result file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=1)
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise SystemExit(f"{what}: expected integers >= 0, got {text!r}")
    return values


def name_list(text: str, allowed: Iterable[str], what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise SystemExit(f"{what}: unknown {unknown or text!r}; choose from {', '.join(allowed)}")
    return names


def machine() -> dict:
    return {
        "loadavg": list(os.getloadavg()),
        "nproc": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "platform": platform.platform(),
    }
