"""kdcore: knowledge distillation for language models on MLX, composed from plugins.

The names below are the whole plugin API: a plugin imports these (and ``kdcore.testing``)
and nothing else; every other module of kdcore is private and may change. A plugin's
entry point (group ``kdcore``) is a module with ``kd_*`` hook implementations
(``kdcore.registry.hookspecs`` documents each hook; ``kdcore.protocols`` what the engine
calls on a component; docs/authoring-plugins.md walks through both).
"""

from kdcore import builtins
from kdcore.analysis.report import write_report
from kdcore.data.datasets import Dataset, open_text, read_jsonl, resolve_tokenizer
from kdcore.engine.distill import distill
from kdcore.engine.evaluate import evaluate
from kdcore.engine.loop import RunInfo
from kdcore.engine.onpolicy import sample_continuations
from kdcore.engine.rundir import load_run_spec, open_run
from kdcore.errors import CheckpointError, KdError, NonFiniteLossError, RegistryError, SpecError
from kdcore.io import atomic_path, load_arrays, read_json, save_arrays, write_json
from kdcore.kernels.chunked import chunked_token_mean, map_rows
from kdcore.kernels.divergence import dense_divergence, sparse_divergence
from kdcore.kernels.kinds import KINDS as DIVERGENCES
from kdcore.kernels.native import install_registered_kernels
from kdcore.kernels.support import TAILS as TAIL_POLICIES
from kdcore.kernels.support import teacher_support, topk_sorted
from kdcore.losses.inputs import LossInputs, StepContext
from kdcore.losses.rows import (
    RowLoss,
    Rows,
    cross_entropy_rows,
    rows_on_logits,
    teacher_rows,
    token_divergence,
)
from kdcore.losses.tokens import IGNORE_INDEX, log_softmax, masked_mean, token_cross_entropy
from kdcore.models.io import count_parameters, load_model, save_model
from kdcore.models.output import ModelOutput
from kdcore.models.sampling import generate, top_p_filter
from kdcore.models.transformer import Transformer, TransformerConfig
from kdcore.protocols import (
    AfterStep,
    Aggregator,
    Aligner,
    DeclaresRows,
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
from kdcore.protocols import Dataset as DatasetProtocol
from kdcore.registry.components import KINDS, PROPERTIES, REQUIREMENTS, Component, NoConfig
from kdcore.registry.manager import get_registry, hookimpl, use_builtins
from kdcore.registry.setup import Setup
from kdcore.signal.mixture import mixture
from kdcore.signal.teacher import TeacherSignal, dense_signal
from kdcore.spec import validators
from kdcore.spec.build import build, make_config
from kdcore.spec.load import load_spec, read_config, to_plain
from kdcore.spec.schedules import Schedule, value_at
from kdcore.spec.schema import RunSpec
from kdcore.tokenizers.simple import ByteTokenizer, fingerprint, load_tokenizer, save_tokenizer

__version__ = "0.1.0"

use_builtins(builtins.MODULES)  # the core's own components, through the plugin hooks

__all__ = [
    # plugins: hooks, records, registry
    "KINDS",
    "PROPERTIES",
    "REQUIREMENTS",
    "Component",
    "NoConfig",
    "Setup",
    "build",
    "get_registry",
    "hookimpl",
    "make_config",
    # what the engine calls on components
    "AfterStep",
    "Aggregator",
    "Aligner",
    "DatasetProtocol",
    "DeclaresRows",
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
    # what components receive
    "IGNORE_INDEX",
    "LossInputs",
    "ModelOutput",
    "RunInfo",
    "StepContext",
    "TeacherSignal",
    "dense_signal",
    "mixture",
    # loss maths
    "DIVERGENCES",
    "TAIL_POLICIES",
    "RowLoss",
    "Rows",
    "chunked_token_mean",
    "cross_entropy_rows",
    "dense_divergence",
    "log_softmax",
    "map_rows",
    "masked_mean",
    "sparse_divergence",
    "teacher_support",
    "token_cross_entropy",
    "teacher_rows",
    "rows_on_logits",
    "token_divergence",
    "topk_sorted",
    # specs and schedules
    "RunSpec",
    "Schedule",
    "load_spec",
    "read_config",
    "to_plain",
    "validators",
    "value_at",
    # models, tokenizers, data
    "ByteTokenizer",
    "Dataset",
    "Transformer",
    "TransformerConfig",
    "count_parameters",
    "fingerprint",
    "generate",
    "install_registered_kernels",
    "sample_continuations",
    "load_model",
    "load_tokenizer",
    "open_text",
    "read_jsonl",
    "resolve_tokenizer",
    "save_model",
    "save_tokenizer",
    "top_p_filter",
    # runs
    "distill",
    "evaluate",
    "load_run_spec",
    "open_run",
    "write_report",
    # files
    "atomic_path",
    "load_arrays",
    "read_json",
    "save_arrays",
    "write_json",
    # errors
    "CheckpointError",
    "KdError",
    "NonFiniteLossError",
    "RegistryError",
    "SpecError",
]
