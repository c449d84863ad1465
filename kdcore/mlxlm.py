"""mlx-lm models as kdcore students and teachers (optional extra ``kdcore[mlx-lm]``).

A model comes from a local mlx-lm directory (``config.json`` with ``model_type``,
``*.safetensors``, a Hugging Face ``tokenizer.json``) and is never fetched from the hub,
or is built fresh from an mlx-lm config. Spec::

    [student.model]
    name = "mlx-lm"
    params = { path = "models/student" }        # weights and config from a directory
    # params = { config = { model_type = "llama", hidden_size = 64, ... } }   # fresh

    [[teachers]]
    source = "mlx-lm"
    path = "models/teacher"

:class:`MlxLmModel` shares the mlx-lm model's modules, so parameter names are mlx-lm's
(``model.layers.0.self_attn.q_proj.weight``) and a saved student or LoRA adapter loads with
``mlx_lm.load``. Without ``capture`` the forward *is* the mlx-lm forward (identical
logits). With ``capture`` each decoder layer is swapped, for that call only, for a catcher
that records its output (the hidden states are the embeddings, then each layer's output),
and ``attentions`` replace the fused attention kernel of the layer's module by an explicit
``softmax(q k^T * scale + mask)`` that records the weights [B, H, L, L]. Any family whose
layers call mlx-lm's ``scaled_dot_product_attention`` works; llama, qwen2, qwen3 and gpt2
are tested.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from kdcore.errors import CheckpointError, SpecError
from kdcore.io import read_json, save_arrays, write_json
from kdcore.models.output import ModelOutput
from kdcore.signal import TeacherSignal
from kdcore.vocab import (
    AlignedSignal,
    HFTokenizer,
    Retokenizer,
    byte_level_tokenizer_json,
    gather_positions,
    write_hf_tokenizer,
)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)


def require_mlx_lm():
    try:
        import mlx_lm  # noqa: F401
    except ImportError as exc:
        raise SpecError(
            "mlx-lm models need the optional extra: pip install 'kdcore[mlx-lm]'"
        ) from exc
    return sys.modules["mlx_lm"]


# ---------------------------------------------------------------- building and loading


def model_classes(config: dict) -> tuple[type, type]:
    """(Model, ModelArgs) of an mlx-lm ``model_type``."""
    require_mlx_lm()
    from mlx_lm import utils

    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise SpecError("an mlx-lm config needs model_type (e.g. 'llama') @ $.student.model")
    model_type = getattr(utils, "MODEL_REMAPPING", {}).get(model_type, model_type)
    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError:
        raise SpecError(f"mlx-lm has no model_type {model_type!r}") from None
    return module.Model, module.ModelArgs


def build_mlxlm(config: dict) -> nn.Module:
    """A fresh mlx-lm model of ``config`` (random weights from the current seed)."""
    model_cls, args_cls = model_classes(config)
    try:
        return model_cls(args_cls.from_dict(config))
    except TypeError as exc:
        raise SpecError(f"mlx-lm config: {exc} @ $.student.model.params.config") from None


def load_mlxlm(path: str | Path) -> tuple[nn.Module, dict]:
    """(mlx-lm model, config dict) from a local directory; never the hub."""
    require_mlx_lm()
    from mlx_lm.utils import load_model

    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"not an mlx-lm model directory (no config.json): {path}")
    try:
        model, config = load_model(path)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return model, config


def cast_floats(model: nn.Module, dtype: str | None) -> None:
    if dtype is None:
        return
    target = DTYPES[dtype]
    model.update(
        tree_map(
            lambda a: a.astype(target) if mx.issubdtype(a.dtype, mx.floating) else a,
            model.parameters(),
        )
    )


@attrs.frozen
class MlxLmShape:
    """The sizes other components read from a model config (``dim``, ``layers``...)."""

    model_type: str
    dim: int
    layers: int
    heads: int
    vocab_size: int


def shape_of(config: dict) -> MlxLmShape:
    def first(*keys, default=0):
        return next((int(config[k]) for k in keys if config.get(k) is not None), default)

    return MlxLmShape(
        model_type=str(config.get("model_type")),
        dim=first("hidden_size", "n_embd", "d_model"),
        layers=first("num_hidden_layers", "n_layer", "num_layers"),
        heads=first("num_attention_heads", "n_head"),
        vocab_size=first("vocab_size"),
    )


def create_mlxlm_dir(
    directory: str | Path,
    config: dict,
    tokenizer_json: dict | None = None,
    seed: int = 0,
    eos_token: str | None = None,
) -> Path:
    """Write a fresh (random) mlx-lm model directory offline: ``config.json``,
    ``model.safetensors`` and Hugging Face tokenizer files (byte-level by default).
    ``mlx_lm.load`` opens it; the tests and the example make their models this way."""
    directory = Path(directory)
    mx.random.seed(seed)
    lm = build_mlxlm(config)
    mx.eval(lm.parameters())
    directory.mkdir(parents=True, exist_ok=True)
    save_arrays(
        directory / "model.safetensors", dict(tree_flatten(lm.parameters())), {"format": "mlx"}
    )
    write_json(directory / "config.json", config)
    write_hf_tokenizer(directory, tokenizer_json or byte_level_tokenizer_json(), eos_token)
    return directory


# ---------------------------------------------------------------- capture


def _layer_list(lm: nn.Module) -> tuple[nn.Module, str]:
    """The module and attribute holding the decoder layers (``model.layers``, ``model.h``)."""
    inner = lm["model"] if isinstance(lm.get("model"), nn.Module) else lm
    for name in ("layers", "h", "blocks"):
        if isinstance(inner.get(name), list):
            return inner, name
    raise SpecError(f"cannot find the decoder layers of mlx-lm model {type(lm).__module__}")


class _Catcher:
    """Stands in for a decoder layer during one forward and records what flows through it."""

    def __init__(self, layer: nn.Module, first: bool, sink: list | None):
        self.layer, self.first, self.sink = layer, first, sink

    def __call__(self, x, *args, **kwargs):
        if self.first and self.sink is not None:
            self.sink.append(x)
        out = self.layer(x, *args, **kwargs)
        if self.sink is not None:
            self.sink.append(out[0] if isinstance(out, tuple) else out)
        return out

    def __getattr__(self, name: str):
        # Model loops read layer attributes (llama: layer.use_sliding).
        return getattr(self.layer, name)


def explicit_attention(sink: list):
    """A drop-in for mlx-lm's ``scaled_dot_product_attention`` that computes the weights
    ``softmax(q k^T * scale + mask)`` in float32 and appends them to ``sink``."""

    def attend(queries, keys, values, cache=None, scale=1.0, mask=None, sinks=None):
        if sinks is not None or hasattr(cache, "bits"):
            raise SpecError(
                "attention capture does not support attention sinks or quantized caches"
            )
        B, H, L, _ = queries.shape
        repeat = H // keys.shape[1]
        if repeat > 1:
            keys = mx.repeat(keys, repeat, axis=1)
            values = mx.repeat(values, repeat, axis=1)
        scores = (queries.astype(mx.float32) * scale) @ keys.astype(mx.float32).swapaxes(-1, -2)
        S = scores.shape[-1]
        low = mx.finfo(mx.float32).min
        if isinstance(mask, str):
            allowed = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None, :]
            scores = mx.where(allowed, scores, low)
        elif mask is not None and mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, low)
        elif mask is not None:
            scores = scores + mask.astype(mx.float32)
        weights = mx.softmax(scores, axis=-1)
        sink.append(weights)
        return (weights @ values.astype(mx.float32)).astype(queries.dtype)

    return attend


@contextmanager
def _patched_attention(layers: list, sink: list | None):
    if sink is None:
        yield
        return
    names = {type(m).__module__ for layer in layers for _, m in layer.named_modules()}
    modules = [
        sys.modules[n]
        for n in sorted(names)
        if n in sys.modules and hasattr(sys.modules[n], "scaled_dot_product_attention")
    ]
    if not modules:
        raise SpecError(
            f"attention capture is not supported for {type(layers[0]).__module__} "
            "(its layers do not call mlx-lm's scaled_dot_product_attention)"
        )
    saved = [m.scaled_dot_product_attention for m in modules]
    attend = explicit_attention(sink)
    try:
        for m in modules:
            m.scaled_dot_product_attention = attend
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.scaled_dot_product_attention = fn


class _Ref:
    """Holds objects outside the parameter tree (nn.Module adopts dicts, lists, modules)."""

    def __init__(self, **items: Any):
        self.__dict__.update(items)


class MlxLmModel(nn.Module):
    """kdcore's model interface over an mlx-lm model: ``__call__(ids, capture) -> ModelOutput``.

    The children are the mlx-lm model's own modules, so ``parameters()``, ``update()``,
    checkpoints and adapters use mlx-lm's names. ``lm`` is the wrapped mlx-lm model (what
    ``mlx_lm.generate`` takes), ``mlx_config`` its config.json content.
    """

    def __init__(
        self,
        lm: nn.Module,
        config: dict,
        source: Path | None = None,
        tokenizer_dir: Path | None = None,
    ):
        super().__init__()
        self._ref = _Ref(
            lm=lm, config=dict(config), source=source, tokenizer_dir=tokenizer_dir or source
        )
        self.sync()

    def sync(self) -> None:
        """Adopt the wrapped model's current children (after a module was swapped, e.g. LoRA
        on a top-level layer)."""
        for key in [k for k in self.keys() if k not in self._ref.lm]:
            del self[key]
        for key, value in self._ref.lm.items():
            self[key] = value

    @property
    def lm(self) -> nn.Module:
        return self._ref.lm

    @property
    def mlx_config(self) -> dict:
        return self._ref.config

    @property
    def source(self) -> Path | None:
        return self._ref.source

    @property
    def tokenizer_dir(self) -> Path | None:
        """Where the tokenizer files shipped with a saved copy come from."""
        return self._ref.tokenizer_dir

    @property
    def layers(self) -> list:
        owner, name = _layer_list(self._ref.lm)
        return owner[name]

    def __call__(self, input_ids: mx.array, capture: frozenset[str] = frozenset()) -> ModelOutput:
        lm = self._ref.lm
        want_hidden = "hidden_states" in capture
        want_attn = "attentions" in capture
        if not (want_hidden or want_attn):
            return ModelOutput(logits=lm(input_ids))
        owner, name = _layer_list(lm)
        layers = owner[name]
        hidden: list = []
        attentions: list = []
        catchers = [
            _Catcher(layer, i == 0, hidden if want_hidden else None)
            for i, layer in enumerate(layers)
        ]
        with _patched_attention(layers, attentions if want_attn else None):
            owner[name] = catchers
            try:
                logits = lm(input_ids)
            finally:
                owner[name] = layers
        if want_attn and len(attentions) != len(layers):
            raise SpecError(
                f"attention capture saw {len(attentions)} attention calls for {len(layers)} layers"
            )
        return ModelOutput(
            logits=logits,
            hidden_states=tuple(hidden) if want_hidden else None,
            attentions=tuple(attentions) if want_attn else None,
        )


# ---------------------------------------------------------------- the model component


@attrs.define
class MlxLmModelConfig:
    path: str | None = None  # a local mlx-lm directory
    config: dict[str, Any] = attrs.field(factory=dict)  # a fresh model of this mlx-lm config
    vocab_size: int | None = None  # for a fresh model without one: the run's tokenizer size
    dtype: Literal["float32", "float16", "bfloat16"] | None = "float32"
    tokenizer: str | None = None  # tokenizer files to ship with the saved student (default: path)


def mlxlm_model(config: MlxLmModelConfig, setup) -> MlxLmModel:
    """The ``mlx-lm`` model component: load ``path`` or build ``config`` fresh."""
    if (config.path is None) == (not config.config):
        raise SpecError(
            "model 'mlx-lm' needs exactly one of path = \"DIR\" or config = {...} "
            "@ $.student.model.params"
        )
    if config.path is not None:
        source = Path(setup.resolve(config.path)) if setup is not None else Path(config.path)
        lm, raw = load_mlxlm(source)
    else:
        raw = dict(config.config)
        if "vocab_size" not in raw:
            if config.vocab_size is None:
                raise SpecError("a fresh mlx-lm model needs vocab_size @ $.student.model.params")
            raw["vocab_size"] = config.vocab_size
        source = None
        lm = build_mlxlm(raw)
    have = int(raw.get("vocab_size") or 0)
    if config.vocab_size is not None and have and have < config.vocab_size:
        raise SpecError(
            f"the mlx-lm model has {have} token embeddings, fewer than the run tokenizer's "
            f"{config.vocab_size} @ $.student.model.params"
        )
    cast_floats(lm, config.dtype)
    mx.eval(lm.parameters())
    tokenizer_dir = None
    if config.tokenizer is not None:
        tokenizer_dir = Path(setup.resolve(config.tokenizer)) if setup else Path(config.tokenizer)
    model = MlxLmModel(lm, raw, source, tokenizer_dir)
    model.train()  # mlx-lm loads in eval mode; a student trains (LoRA dropout)
    return model


def load_kd_model(directory: str | Path) -> tuple[MlxLmModel, str, MlxLmModelConfig]:
    """(model, "mlx-lm", config) for an mlx-lm directory, as ``kdcore.models.load_model``
    returns them (``kd eval`` on a run whose student is an mlx-lm model)."""
    config = MlxLmModelConfig(path=str(directory))
    model = mlxlm_model(config, None)
    model.eval()
    return model, "mlx-lm", config


# ---------------------------------------------------------------- the teacher source


@attrs.define
class MlxLmTeacherConfig:
    retokenize: bool | None = None  # None: when the teacher's tokenizer is not the run's
    alignment: Literal["offsets", "position"] = "offsets"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None


def run_tokenizer(setup) -> Any:
    """The tokenizer the run's dataset will use (teachers are built before the dataset)."""
    from kdcore.data import resolve_tokenizer

    dataset = setup.extras.get("dataset") if setup is not None else None
    if dataset is not None:
        return dataset.tokenizer
    spec = getattr(setup, "spec", None)
    if spec is None:
        return None
    name = getattr(spec.data.config, "tokenizer", None)
    if isinstance(name, str) and name != "char":
        return resolve_tokenizer(name, Path(spec.base_dir))
    from kdcore.cache import build_dataset

    return build_dataset(spec, setup).tokenizer


def load_hf_tokenizer(directory: Path) -> HFTokenizer | None:
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        return None
    data = read_json(path, "tokenizer")
    if "model" not in data:  # a kdcore tokenizer.json ({"type": "byte"})
        return None
    require_mlx_lm()
    return HFTokenizer.from_json(data)


class MlxLmTeacher:
    """A frozen mlx-lm teacher from ``path``.

    When its tokenizer is not the run's (``retokenize`` unset), every batch is decoded to
    text, re-encoded with the teacher's tokenizer, and the teacher's outputs are read at
    the aligned positions (:class:`kdcore.vocab.Retokenizer`); the signal then carries a
    ``position_mask`` and is still in the teacher's vocabulary (an aligner maps it).
    ``model`` is None for such a teacher, since its ids are not the run's.
    """

    def __init__(self, config: MlxLmTeacherConfig, setup):
        ref = setup.teacher
        if ref is None or not ref.path:
            raise SpecError('the mlx-lm teacher source needs path = "MODEL_DIR" @ $.teachers')
        self.path = Path(setup.resolve(ref.path))
        lm, raw = load_mlxlm(self.path)
        cast_floats(lm, config.dtype)
        self.adapter = MlxLmModel(lm, raw, self.path)
        self.adapter.freeze()
        self.adapter.eval()
        self.config = shape_of(raw)
        self.tokenizer = load_hf_tokenizer(self.path)
        self.num_parameters = sum(v.size for _, v in tree_flatten(self.adapter.parameters()))
        retokenize = config.retokenize
        data_tok = None
        if retokenize is None or retokenize:
            data_tok = run_tokenizer(setup)
        if retokenize is None:
            from kdcore.tokenizer import fingerprint

            retokenize = (
                self.tokenizer is not None
                and data_tok is not None
                and fingerprint(self.tokenizer) != fingerprint(data_tok)
            )
        self.retokenizer = None
        if retokenize:
            if self.tokenizer is None or data_tok is None:
                raise SpecError(
                    f"retokenizing needs the teacher's tokenizer.json in {self.path} and the "
                    "run's tokenizer @ $.teachers"
                )
            self.retokenizer = Retokenizer(data_tok, self.tokenizer, config.alignment)
        self.model = None if retokenize else self.adapter

    def signal(self, batch: dict, capture: frozenset = frozenset(), student=None) -> TeacherSignal:
        sg = mx.stop_gradient
        if self.retokenizer is None:
            out = self.adapter(batch["input_ids"], capture=capture)
            return TeacherSignal(
                vocab_size=out.logits.shape[-1],
                logits=sg(out.logits),
                hidden_states=tuple(sg(h) for h in out.hidden_states)
                if out.hidden_states
                else None,
                attentions=tuple(sg(a) for a in out.attentions) if out.attentions else None,
            )
        if "attentions" in capture:
            raise SpecError(
                "attention maps of a teacher with another tokenizer do not line up with the "
                "student's tokens @ $.teachers"
            )
        t_ids, index, mask = self.retokenizer(np.array(batch["input_ids"]))
        out = self.adapter(mx.array(t_ids), capture=capture)
        index = mx.array(index)
        hidden = None
        if out.hidden_states:
            hidden = tuple(sg(gather_positions(h, index)) for h in out.hidden_states)
        return AlignedSignal(
            vocab_size=out.logits.shape[-1],
            logits=sg(gather_positions(out.logits, index)),
            hidden_states=hidden,
            position_mask=mx.array(mask),
        )


# ---------------------------------------------------------------- saving


def write_tokenizer_files(directory: Path, tokenizer_dir: Path | None, run_tok: Any) -> None:
    """Ship tokenizer files mlx-lm can load: copied from ``tokenizer_dir``, else written
    from the run's tokenizer (a Hugging Face one as it is; bytes as a byte-level BPE)."""
    copied = False
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").exists():
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists():
                shutil.copy(src, directory / name)
                copied = True
    if copied:
        return
    if isinstance(run_tok, HFTokenizer):
        write_hf_tokenizer(directory, run_tok.to_json())
    elif getattr(run_tok, "kind", None) == "byte":
        write_hf_tokenizer(directory, byte_level_tokenizer_json())
    else:
        raise CheckpointError(
            "cannot write tokenizer files for mlx-lm: give the model a tokenizer directory "
            "@ $.student.model.params.tokenizer"
        )


def save_mlxlm_student(
    model: MlxLmModel,
    directory: str | Path,
    tokenizer_dir: str | Path | None = None,
    run_tok: Any = None,
    weights: dict[str, mx.array] | None = None,
) -> None:
    """Write an mlx-lm directory: ``config.json``, ``model.safetensors``, tokenizer files.

    ``mlx_lm.load(directory)`` and ``mlx_lm.generate`` work on it. ``weights`` overrides
    the model's parameters (LoRA students save their fused weights this way).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = weights if weights is not None else dict(tree_flatten(model.parameters()))
    save_arrays(directory / "model.safetensors", weights, metadata={"format": "mlx"})
    write_json(directory / "config.json", model.mlx_config)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else model.tokenizer_dir
    write_tokenizer_files(directory, tokenizer_dir, run_tok)


def save_student(
    student: nn.Module, directory: Path, arch: str, config: Any, tokenizer: Any
) -> bool:
    """The engine's hook for students kdcore's own format does not fit; True if it saved.

    - a LoRA student: ``adapters.safetensors`` + ``adapter_config.json``, and with
      ``fuse`` the fused model beside them (an mlx-lm directory for an mlx-lm student,
      kdcore's layout otherwise) so that the directory loads as a whole model too;
    - a full mlx-lm student: an mlx-lm directory (:func:`save_mlxlm_student`).
    """
    from kdcore import lora

    directory = Path(directory)
    if lora.has_lora(student):
        lora.save_adapters(student, directory)
        if not student.kd_lora.fuse:
            return True
        fused = lora.fused_weights(student)
        if isinstance(student, MlxLmModel):
            save_mlxlm_student(student, directory, run_tok=tokenizer, weights=fused)
        else:
            from kdcore.spec import converter
            from kdcore.tokenizer import save_tokenizer

            save_arrays(directory / "model.safetensors", fused, metadata={"format": "mlx"})
            write_json(
                directory / "config.json", {"kd_model": arch, **converter.unstructure(config)}
            )
            save_tokenizer(tokenizer, directory)
        return True
    if isinstance(student, MlxLmModel):
        save_mlxlm_student(student, directory, run_tok=tokenizer)
        return True
    return False
