"""Native row kernels: which table of them this process uses, and the dispatch to them.

A plugin may replace (hook ``kd_row_kernels``) the dense and top-k (``"sparse:KIND"``)
divergence rows, the fused path's cross-entropy and the Adam(W) step of
``kdcore.engine.optim`` (``"adam"``); ``KD_KERNELS=pure`` keeps kdcore's own MLX code
everywhere. The kernels never ask the plugin registry for them: the engine installs the
run's table once when it builds a run (:func:`use_row_kernels`) and hands the ``"adam"``
kernel to the optimizer it builds; a caller outside a run (``kd doctor``, the benchmarks, a
notebook, a test) installs the registry's table with :func:`install_registered_kernels`.
Until a table is installed the pure rows run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import mlx.core as mx

from kdcore.errors import KdError
from kdcore.kernels.kinds import KINDS
from kdcore.models import ops
from kdcore.registry.manager import RowKernel, get_registry

RowFn = Callable[..., tuple[mx.array, mx.array]]

# Every name a plugin may register a kernel for (kd doctor reports each).
ROW_KERNELS = (
    *KINDS,
    *(f"sparse:{kind}" for kind in KINDS),
    "cross_entropy",
    "adam",
    "softmax",  # attention's softmax (kdcore.models.ops)
    "swiglu",
    "attention",  # whole causal attention, flash style (kdcore.models.ops)
)

# None until a table is installed (kd doctor says so, rather than "no plugin registers one").
_installed: dict[str, RowKernel] | None = None


def use_row_kernels(kernels: Mapping[str, RowKernel] | None) -> dict[str, RowKernel] | None:
    """Use ``kernels`` (name -> :class:`~kdcore.registry.manager.RowKernel`, as
    ``Registry.row_kernels()`` gives them) as this process's native row kernels from now
    on; None: none. Returns the table it replaces, so that a caller can put it back."""
    global _installed
    previous = _installed
    _installed = None if kernels is None else dict(kernels)
    # The layers' kernels too: the built-in transformer and mlx-lm's layers read them there
    # (and check KD_KERNELS and the device at each call).
    ops.use_layer_kernels(_built("softmax", ()), _built("swiglu", ()), _built("attention", ()))
    return previous


def install_registered_kernels() -> dict[str, RowKernel] | None:
    """Install the plugin registry's row kernels (loading the plugins if no registry is
    built yet), for callers that run kernels outside a run; returns the table it
    replaces."""
    return use_row_kernels(get_registry().row_kernels())


def kernels_mode() -> str:
    """``"native"`` (the default: installed kernels) or ``"pure"`` (KD_KERNELS=pure)."""
    # Crashes seen while kd-kernels was developed came from processes whose extension was
    # rebuilt in place under them; 40 stress runs and an AddressSanitizer build are clean
    # (plugins/kernels/tests/test_stress.py runs in the suite).
    raw = os.environ.get("KD_KERNELS", "")
    mode = raw.strip().lower() or "native"
    if mode not in ("native", "pure"):
        raise KdError(
            f"KD_KERNELS={raw!r}: use 'native' (the registered native kernels, the default) "
            "or 'pure' (kdcore's MLX row functions)"
        )
    return mode


def _on_cpu() -> bool:
    return mx.default_device().type == mx.cpu


def _built(name: str, args: tuple[Any, ...]) -> Callable[..., Any] | None:
    kernel = (_installed or {}).get(name)
    return kernel.factory(*args) if kernel is not None else None


def native_kernel(name: str, *args: Any) -> Callable[..., Any] | None:
    """The installed native kernel for ``name`` built with ``args``, or None (none
    installed, ``KD_KERNELS=pure``, a default device other than the CPU, or the factory
    leaves these parameters to kdcore)."""
    if kernels_mode() == "pure" or not _on_cpu():
        return None
    return _built(name, args)


def with_row_kernel(name: str, pure: RowFn, *args: Any) -> RowFn:
    """``pure``, or the native kernel installed for ``name`` built with ``args`` (its
    factory's arguments, see ``kd_row_kernels``), run when the default device is the CPU
    (the native kernels are CPU primitives; elsewhere ``pure`` runs)."""
    if kernels_mode() == "pure":
        return pure
    native = _built(name, args)
    if native is None:  # none installed, or the factory leaves these parameters to us
        return pure

    def rows(*inputs: mx.array) -> tuple[mx.array, mx.array]:
        return native(*inputs) if _on_cpu() else pure(*inputs)

    rows.native = True
    rows.pure = pure  # the differentiable twin (kdcore.losses.rows.rows_on_logits)
    return rows


def is_native(rows_fn: RowFn) -> bool:
    """Whether ``rows_fn`` runs a native kernel here (see :func:`with_row_kernel`): one
    primitive per call, no temporaries to bound."""
    return getattr(rows_fn, "native", False) and _on_cpu()


def row_kernel_status() -> dict[str, dict[str, str]]:
    """Per name of :data:`ROW_KERNELS`: ``path`` (``"native"`` or ``"pure"``), ``source``
    (the distribution that registered the installed kernel) and ``detail`` (its
    description, or why the pure rows run), as ``kd doctor`` reports them."""
    if kernels_mode() == "pure":
        why = "KD_KERNELS=pure"
    elif not _on_cpu():
        why = f"the default device is {mx.default_device()}; the native kernels are CPU only"
    elif _installed is None:
        why = "no row kernels installed (install_registered_kernels() installs the plugins')"
    else:
        why = ""
    status = {}
    for name in ROW_KERNELS:
        kernel = (_installed or {}).get(name)
        source = f"{kernel.distribution} {kernel.version}" if kernel is not None else ""
        if why or kernel is None:
            detail = why or "no plugin registers one (kd-kernels builds them)"
            status[name] = {"path": "pure", "source": source, "detail": detail}
        else:
            detail = str(getattr(kernel.factory, "description", ""))
            status[name] = {"path": "native", "source": source, "detail": detail}
    return status
