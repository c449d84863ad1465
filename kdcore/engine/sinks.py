"""Metric sinks: run callbacks that send a run's logs somewhere besides ``metrics.jsonl``.

The engine always writes ``RUN/metrics.jsonl`` itself; a spec adds sinks with::

    [[callbacks]]
    name = "tensorboard"              # pip install 'kdcore[tensorboard]'
    params = { logdir = "tensorboard" }   # relative to the run's output folder

    [[callbacks]]
    name = "jsonl"                    # the same records, appended to another file
    params = { path = "/shared/all-runs.jsonl" }

Records are flattened to scalar series: train logs as ``train/<key>`` at their step, each
periodic evaluation and the final one as ``eval/<key>``. Non-numeric values (the stage
name) are skipped. A plugin writes its own sink (wandb, mlflow, ...) by subclassing
:class:`MetricSink` and implementing ``write(tag_values, step)``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import attrs

from kdcore.errors import KdError


def scalars(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{"loss": 1.0, "eval": {"kl": 2}}`` -> ``{prefix/loss: 1.0, prefix/eval/kl: 2.0}``;
    bools, strings and ``step`` are dropped; non-finite floats are kept (they are news)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        tag = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            out.update(scalars(value, tag))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


class MetricSink:
    """Base of the built-in sinks: turns the engine's callbacks into ``write(values, step)``."""

    run_dir: Path | None = None

    def on_start(self, info) -> None:
        self.run_dir = Path(info.output)
        self.run_name = info.spec.run.name
        self.open(info)

    def on_log(self, step: int, record: dict[str, Any]) -> None:
        self.write(scalars(record, "train"), step, "train")

    def on_eval(self, step: int, record: dict[str, Any]) -> None:
        self.write(scalars(record, "eval"), step, "eval")

    def on_end(self, summary: dict[str, Any]) -> None:
        self.close()

    def open(self, info) -> None:  # pragma: no cover - overridden
        pass

    def write(self, values: dict[str, float], step: int, kind: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- jsonl


@attrs.define
class JsonlSinkConfig:
    path: str  # relative paths start at the run's output folder


class JsonlSink(MetricSink):
    """Appends ``{"run", "step", "kind", **values}`` lines to ``path``: one file can gather
    many runs (the engine's own ``metrics.jsonl`` is per run)."""

    def __init__(self, config: JsonlSinkConfig, setup=None):
        self.config = config
        self.file = None

    def open(self, info) -> None:
        path = Path(os.path.expanduser(self.config.path))
        path = path if path.is_absolute() else self.run_dir / path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, values: dict[str, float], step: int, kind: str) -> None:
        if self.file is None:
            return
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}
        line = {"run": self.run_name, "step": step, "kind": kind, **clean}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# ---------------------------------------------------------------- tensorboard


class MissingExtraError(KdError):
    """An optional dependency of a component is not installed."""


@attrs.define
class TensorBoardConfig:
    logdir: str = "tensorboard"  # relative paths start at the run's output folder
    flush_secs: int = 10


def _summary_writer():
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise MissingExtraError(
            "the tensorboard sink needs the tensorboardX package: pip install 'kdcore[tensorboard]'"
        ) from None
    return SummaryWriter


class TensorBoardSink(MetricSink):
    """Scalars as TensorBoard event files (``tensorboard --logdir RUN/tensorboard``), plus
    the resolved spec as text. Written with tensorboardX (no TensorFlow, no torch)."""

    def __init__(self, config: TensorBoardConfig, setup=None):
        self.config = config
        self.writer_class = _summary_writer()  # fail while building the run, not mid-way
        self.writer = None
        self.logdir: Path | None = None

    def open(self, info) -> None:
        logdir = Path(os.path.expanduser(self.config.logdir))
        self.logdir = logdir if logdir.is_absolute() else self.run_dir / logdir
        self.writer = self.writer_class(logdir=str(self.logdir), flush_secs=self.config.flush_secs)
        spec_file = self.run_dir / "spec.toml"
        if spec_file.exists():
            self.writer.add_text("spec", "```toml\n" + spec_file.read_text() + "\n```", 0)

    def write(self, values: dict[str, float], step: int, kind: str) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_event_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``logdir``: tag -> [(step, value)].

    Reads the TFRecord framing (length, masked CRC32C of the length, payload, masked CRC32C
    of the payload) and checks both checksums, then parses each payload with tensorboardX's
    ``Event`` protobuf class.
    """
    import struct

    try:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.record_writer import masked_crc32c as masked
    except ImportError:
        raise MissingExtraError(
            "reading event files needs tensorboardX: pip install 'kdcore[tensorboard]'"
        ) from None

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            if masked(header) != length_crc:
                raise KdError(f"{path}: corrupt record header at byte {pos}")
            payload = data[pos + 12 : pos + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            if masked(payload) != payload_crc:
                raise KdError(f"{path}: corrupt record at byte {pos}")
            pos += 16 + length
            event = Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
