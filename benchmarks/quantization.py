"""Quantized students against mlx-lm's DWQ: ``examples/quantize/run.py`` at its configured
budget, in a temporary folder; it rewrites the example's results.json and README table too,
so the example and ``benchmarks/results.json`` show the same run.

``python -m benchmarks.quantization`` prints one JSON line: the share of the 4-bit
quantization gap that kdcore's ``quantize`` student (forward KL) and ``mlx_lm dwq`` recover,
``(rtn - x) / (rtn - fp)`` of the held-out loss, the mean over the example's seeds (their
range beside it), with every row of the example's table. About 30 minutes on a 2-core
machine (three seeds).
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quantize" / "run.py"
BITS = 4


def _example():
    spec = importlib.util.spec_from_file_location("kd_quantize_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quantization(out: Path | None = None) -> dict:
    """Run the example (into ``out``, default a temporary folder) and return the
    ``quantization`` section of ``benchmarks/results.json``."""
    example = _example()
    with tempfile.TemporaryDirectory() as tmp:
        results = example.main(out=Path(out or tmp), write=True)
    shares = results["gap_recovered"][str(BITS)]
    return {
        "bits": BITS,
        "seeds": results["budget"]["seeds"],
        "kd_gap_recovered": shares["kd-hinton"],
        "kd_t2_gap_recovered": shares["kd-hinton-t2"],
        "dwq_gap_recovered": shares["dwq"],
        "kd_tvd_gap_recovered": shares["kd-tvd"],
        "gap_recovered": results["gap_recovered"],
        "gap_recovered_range": results["gap_recovered_range"],
        "budget": results["budget"],
        "rows": results["rows"],
        "example_wall_s": results["total_wall_s"],
    }


if __name__ == "__main__":
    print(json.dumps(quantization()))
