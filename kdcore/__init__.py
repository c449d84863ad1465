"""kdcore: knowledge distillation for language models on MLX, composed from plugins.

The names below are the plugin API: what a plugin implements and the helpers a loss
needs. A plugin imports these, ``kdcore.testing`` for its tests and, when it adds ``kd``
commands or datasets, ``kdcore.app`` (the application API); every other module is private
and may change. A plugin's entry point (group ``kdcore``) is a module with ``kd_*`` hook
implementations (``kdcore.registry.hookspecs`` documents each hook);
docs/authoring-plugins.md walks through a loss in one file first.
"""

from kdcore import builtins
from kdcore.data.datasets import Dataset
from kdcore.errors import SpecError
from kdcore.kernels.chunked import map_rows
from kdcore.kernels.kinds import KINDS as DIVERGENCES
from kdcore.kernels.support import teacher_support
from kdcore.losses.inputs import LossInputs, StepContext
from kdcore.losses.rows import RowLoss, Rows, cross_entropy_rows, teacher_rows, token_divergence
from kdcore.losses.tokens import IGNORE_INDEX, log_softmax, masked_mean, token_cross_entropy
from kdcore.models.output import ModelOutput
from kdcore.protocols import (
    AfterStep,
    Aggregator,
    Aligner,
    HasRequirements,
    HasState,
    Initializer,
    Learnable,
    Loss,
    Metric,
    Model,
    PreparesBatch,
    PreparesVocabularies,
    ReadsTeacherModel,
    RunCallback,
    Scheduler,
    TeacherSource,
)
from kdcore.registry.components import Component
from kdcore.registry.manager import hookimpl, use_builtins
from kdcore.registry.setup import Setup
from kdcore.signal.mixture import mixture
from kdcore.signal.teacher import TeacherSignal
from kdcore.spec import validators
from kdcore.spec.schedules import value_at

__version__ = "0.1.0"

use_builtins(builtins.MODULES)  # the core's own components, through the plugin hooks

__all__ = [
    # registering components
    "Component",
    "Setup",
    "SpecError",
    "hookimpl",
    "validators",
    "value_at",
    # the kinds of component, and what the engine may call on one
    "AfterStep",
    "Aggregator",
    "Aligner",
    "Dataset",
    "HasRequirements",
    "HasState",
    "Initializer",
    "Learnable",
    "Loss",
    "Metric",
    "Model",
    "PreparesBatch",
    "PreparesVocabularies",
    "ReadsTeacherModel",
    "RunCallback",
    "Scheduler",
    "TeacherSource",
    # what a component receives
    "IGNORE_INDEX",
    "LossInputs",
    "ModelOutput",
    "StepContext",
    "TeacherSignal",
    # a loss as rows
    "RowLoss",
    "Rows",
    "cross_entropy_rows",
    "teacher_rows",
    # loss maths
    "DIVERGENCES",
    "log_softmax",
    "map_rows",
    "masked_mean",
    "mixture",
    "teacher_support",
    "token_cross_entropy",
    "token_divergence",
]
