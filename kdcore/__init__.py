"""kdcore: knowledge distillation for language models on MLX, composed from plugins."""

from kdcore.components import Component, NoConfig
from kdcore.errors import CheckpointError, KdError, NonFiniteLossError, RegistryError, SpecError
from kdcore.losses import IGNORE_INDEX, LossInputs, log_softmax, masked_mean
from kdcore.plugins import get_registry, hookimpl
from kdcore.schedules import Schedule
from kdcore.setup import Setup, build, make_config
from kdcore.signal import TeacherSignal
from kdcore.spec import RunSpec, load_spec

__version__ = "0.1.0"


def distill(spec, overrides=None, output=None, resume=False, progress=None):
    """Run a distillation from a spec (a path, a dict or a RunSpec); returns the summary."""
    from kdcore.train import distill as _distill

    return _distill(spec, overrides=overrides, output=output, resume=resume, progress=progress)


__all__ = [
    "IGNORE_INDEX",
    "CheckpointError",
    "Component",
    "KdError",
    "LossInputs",
    "NoConfig",
    "NonFiniteLossError",
    "RegistryError",
    "RunSpec",
    "Schedule",
    "Setup",
    "SpecError",
    "TeacherSignal",
    "build",
    "distill",
    "get_registry",
    "hookimpl",
    "load_spec",
    "log_softmax",
    "make_config",
    "masked_mean",
]
