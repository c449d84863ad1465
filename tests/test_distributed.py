"""Data-parallel training through ``mx.distributed`` (ring backend, two local processes).

``test_two_processes_match_one`` runs ``mlx.launch -n 2 --backend ring -- kd distill`` and
needs the engine patch (batch sharding, gradient averaging, rank-0 writes). Tolerance: SGD
keeps the two runs within 1e-6 of each other (measured ~3e-8: only the float32 order of the
all-reduce sum differs); Adam divides by sqrt(v), which magnifies those rounding
differences on near-zero gradients, so we do not compare Adam runs that tightly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kdcore import app
from kdcore.engine.distributed import DataParallel, barrier, my_items
from kdcore.errors import CheckpointError, SpecError
from kdcore.io import load_arrays
from kdcore.spec.tomlwrite import dumps as toml_dumps

BIN = Path(sys.executable).parent


class FakeGroup:
    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_one_process_is_a_group_of_one():
    dp = DataParallel()
    assert (dp.rank, dp.size, dp.is_main) == (0, 1, True)
    batch = {"input_ids": np.arange(8).reshape(4, 2)}
    assert dp.shard(batch) is batch
    grads = {"w": mx.ones((2,))}
    assert dp.average(grads) is grads
    assert dp.reduce_step(mx.array(1.0), {}, {}, grads, 7)[-1] == 7
    barrier()  # returns at once


def test_shards_split_the_global_batch_in_rank_order():
    batch = {"input_ids": np.arange(12).reshape(6, 2), "mask": np.ones((6, 2))}
    parts = [DataParallel(FakeGroup(r, 3)).shard(batch)["input_ids"] for r in range(3)]
    assert np.array_equal(np.concatenate(parts), batch["input_ids"])
    with pytest.raises(SpecError, match="not divisible"):
        DataParallel(FakeGroup(0, 4)).shard(batch)
    # rank 0 keeps the single-process random stream; the others draw their own
    assert DataParallel(FakeGroup(0, 2)).seed(41) == 41
    assert DataParallel(FakeGroup(1, 2)).seed(41) != 41


def test_cache_work_is_split_without_overlap():
    shares = [my_items(10, FakeGroup(r, 3)) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(10))
    assert shares[1] == [1, 4, 7]


def test_only_rank_zero_writes_the_output(tmp_path):
    out = tmp_path / "run"
    assert DataParallel(FakeGroup(0, 2)).output_dir(out) == out
    other = DataParallel(FakeGroup(1, 2)).output_dir(out)
    assert other != out and not str(other).startswith(str(out))
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-1")
    with pytest.raises(CheckpointError, match="already holds a run"):
        DataParallel(FakeGroup(1, 2)).output_dir(out)
    resumed = DataParallel(FakeGroup(1, 2)).output_dir(out, resume=True)
    assert (resumed / "checkpoints" / "latest").read_text() == "step-1"
    assert DataParallel(FakeGroup(1, 2)).log_stream() is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(corpus, tmp_path):
    """Needs the engine patch. Same global batch of 4 rows: 1 process x 4 vs 2 x 2."""
    spec = {
        "run": {"name": "dp", "seed": 0},
        "data": {"name": "text", "params": {"path": str(corpus), "seq_len": 16, "max_chars": 8000}},
        "student": {
            "model": {
                "name": "transformer",
                "params": {"dim": 32, "layers": 2, "heads": 2, "max_seq_len": 16},
            }
        },
        "losses": [{"name": "ce"}],
        "train": {
            "steps": 4,
            "batch_size": 4,
            "log_every": 1,
            "checkpoint_every": 2,
            "optimizer": {"name": "sgd", "lr": 0.05},
        },
        "eval": {"batches": 1},
    }
    path = tmp_path / "spec.toml"
    path.write_text(toml_dumps(spec))
    env = dict(os.environ)
    one = subprocess.run(
        [str(BIN / "kd"), "distill", str(path), "-o", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            str(BIN / "mlx.launch"),
            "-n",
            "2",
            "--backend",
            "ring",
            "--starting-port",
            str(_free_port()),
            "--",
            str(BIN / "kd"),
            "distill",
            str(path),
            "-o",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    a = load_arrays(tmp_path / "one" / "student" / "model.safetensors")
    b = load_arrays(tmp_path / "two" / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float(mx.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-6, worst
    from kdcore.engine.build import build_parts

    start = dict(tree_flatten(build_parts(app.load_spec(spec)).student.parameters()))
    moved = max(float(mx.abs(a[k] - start[k]).max()) for k in a)
    assert moved > 0  # training moved the weights (the comparison is not vacuous)
    # one progress line per step: only rank 0 reports
    assert two.stderr.count("dp step 4/4") == 1
    # rank 0 alone wrote the run directory: the same files as the single process
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
