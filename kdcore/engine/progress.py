"""A progress line on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", stream=None, enabled: bool | None = None):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if enabled is None else enabled
        self.start = time.perf_counter()

    def update(self, step: int, text: str, force_line: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        if self.tty:
            width = 24
            filled = int(width * step / max(1, self.total))
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {step}/{self.total} {text} {elapsed:.0f}s")
            self.stream.flush()
        elif force_line:
            self.stream.write(f"{self.label} step {step}/{self.total} {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
