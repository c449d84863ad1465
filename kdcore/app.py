"""kdcore's application API: run, evaluate and inspect distillations from Python, and the
model, tokenizer, data, spec and file helpers that ``kd`` itself uses.

``kdcore`` (its ``__all__``) is the plugin API; this module is for programs that drive
kdcore, and for plugins that add ``kd`` commands or datasets. Example::

    from kdcore import app

    spec = app.load_spec("examples/shakespeare/distill.toml")
    run_dir = app.distill(spec, output="runs/demo")
    print(app.evaluate(run_dir))
"""

from kdcore.analysis.report import write_report
from kdcore.cli.outputs import check_output
from kdcore.data.datasets import open_text, read_jsonl, resolve_tokenizer
from kdcore.engine.distill import distill
from kdcore.engine.evaluate import evaluate
from kdcore.engine.loop import RunInfo
from kdcore.engine.rundir import load_run_spec, open_run
from kdcore.errors import CheckpointError, KdError, NonFiniteLossError, RegistryError, SpecError
from kdcore.io import atomic_path, load_arrays, read_json, save_arrays, write_json
from kdcore.kernels.native import install_registered_kernels
from kdcore.models.io import count_parameters, load_model, save_model
from kdcore.models.sampling import generate, top_p_filter
from kdcore.models.transformer import Transformer, TransformerConfig
from kdcore.registry.components import KINDS, PROPERTIES, REQUIREMENTS, NoConfig
from kdcore.registry.manager import get_registry
from kdcore.signal.teacher import dense_signal
from kdcore.spec.build import build, make_config
from kdcore.spec.load import load_spec, read_config, to_plain
from kdcore.spec.schedules import Schedule
from kdcore.spec.schema import RunSpec
from kdcore.tokenizers.simple import ByteTokenizer, fingerprint, load_tokenizer, save_tokenizer

__all__ = [
    # runs
    "RunInfo",
    "distill",
    "evaluate",
    "load_run_spec",
    "open_run",
    "write_report",
    # specs and components
    "KINDS",
    "PROPERTIES",
    "REQUIREMENTS",
    "NoConfig",
    "RunSpec",
    "Schedule",
    "build",
    "get_registry",
    "install_registered_kernels",
    "load_spec",
    "make_config",
    "read_config",
    "to_plain",
    # models, tokenizers, data
    "ByteTokenizer",
    "Transformer",
    "TransformerConfig",
    "count_parameters",
    "dense_signal",
    "fingerprint",
    "generate",
    "load_model",
    "load_tokenizer",
    "open_text",
    "read_jsonl",
    "resolve_tokenizer",
    "save_model",
    "save_tokenizer",
    "top_p_filter",
    # files
    "atomic_path",
    "check_output",
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
