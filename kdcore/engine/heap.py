"""Keep freed memory in the process, so that big MLX buffers are not page-faulted anew.

MLX's CPU allocator on Linux (no GPU) is plain ``malloc`` / ``free``, and glibc serves
every block above 32 MiB with a fresh ``mmap`` that ``free`` hands back to the system. A
fused step at a 152k vocabulary allocates about 1 GB of such blocks per chunk of 220
tokens (both models' logits, the gradient rows, the head gradient), so it paid a page
fault per 4 KiB, every chunk, every step, in system time that varies with the host (a VM's
faults are dear). :func:`reuse_freed_memory` asks glibc to serve large blocks from its heap
(``M_MMAP_MAX = 0``) and never to give freed heap memory back (``M_TRIM_THRESHOLD``
unbounded): after the first steps the same memory is reused without a fault.
``benchmarks/run --only real_vocab`` measures it (``docs/performance.md``, real
vocabulary): ``kd distill``'s step with and without ``KD_HEAP=system``, and PyTorch's loop,
whose allocator is glibc's too, with and without the same settings made through glibc's
``MALLOC_`` variables.

The cost: the process keeps its high-water mark of memory until it exits (freed blocks
stay with it, for reuse). Training runs in ``kd`` and ``kdcore.app.distill`` turn it on;
``KD_HEAP=system`` leaves glibc's defaults. A no-op off glibc (macOS, musl), where MLX's
own allocator caches buffers, and on a GPU default device.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_state: list[str] = []


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only; musl has none
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def reuse_freed_memory() -> str:
    """Turn on heap reuse for this process (read the module doc); what holds now:
    ``"reuse"``, or why glibc's defaults stay (``"system: KD_HEAP=system"`` and the like).
    Idempotent: the first call decides."""
    if _state:
        return _state[0]
    import mlx.core as mx

    libc = _glibc()
    if os.environ.get("KD_HEAP") == "system":
        state = "system: KD_HEAP=system"
    elif libc is None:
        state = "system: not glibc"
    elif mx.default_device().type != mx.cpu:
        state = f"system: the default device is {mx.default_device()}"
    elif libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, -1) != 1:
        state = "system: mallopt refused"
    else:
        state = "reuse"
    _state.append(state)
    return state


def heap_status() -> str:
    """What :func:`reuse_freed_memory` did in this process (``"not asked"`` before)."""
    return _state[0] if _state else "not asked"
