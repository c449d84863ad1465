"""Memory bandwidth of this machine: the physical limit for memory-bound kernels such as
the token losses, and MLX's element-wise throughput beside it.

``copy``: NumPy copies a 256 MiB float32 array (read + write), which is memory-bound.
``mlx_elementwise``: MLX computes ``x * c`` over the same array; on Linux CPU its
element-wise kernels are scalar, so this is compute-bound well below the memory limit.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

from benchmarks.common import median_time


def measure(megabytes: int = 256) -> dict:
    n = megabytes * (1 << 20) // 4
    src = np.random.default_rng(0).random(n, dtype=np.float32)
    dst = np.empty_like(src)
    copy_s = median_time(lambda: np.copyto(dst, src), repeats=5)
    x = mx.array(src)
    mx.eval(x)
    mlx_s = median_time(lambda: mx.eval(x * 1.0001), repeats=5)
    moved = 2 * n * 4  # read the source, write the result
    return {
        "bytes": moved,
        "gb_per_s": moved / copy_s / 1e9,
        "mlx_elementwise_gb_per_s": moved / mlx_s / 1e9,
    }


if __name__ == "__main__":
    print(json.dumps(measure()))
