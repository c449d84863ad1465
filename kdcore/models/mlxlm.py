"""mlx-lm models behind kdcore's model interface: loading local folders, building fresh
configs, capturing hidden states and attention maps, saving mlx-lm folders."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from kdcore.errors import CheckpointError, KdError, SpecError
from kdcore.io import read_json, save_arrays, write_json
from kdcore.models import ops
from kdcore.models.checkpoint import checkpointed
from kdcore.models.dtype import apply_policy
from kdcore.models.output import ModelOutput, plain_head
from kdcore.tokenizers.hf import (
    NEVER,
    HFTokenizer,
    byte_level_tokenizer_json,
    folder_code,
    require_mlx_lm,
    warn_folder_code,
    write_hf_tokenizer,
)

# mlx-lm model types whose ``Model.__call__`` is exactly ``head(self.model(inputs))`` with
# ``head`` the tied ``embed_tokens.as_linear`` or ``lm_head`` (no scaling, no soft-cap), so
# kdcore may run the body and the head apart (the fused loss path). Others give logits.
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "olmo2", "phi3"})

QUANTIZATION_KEYS = ("quantization", "quantization_config")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)


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
    ops.patch_mlx_lm()
    model_cls, args_cls = model_classes(config)
    try:
        return model_cls(args_cls.from_dict(config))
    except TypeError as exc:
        raise SpecError(f"mlx-lm config: {exc} @ $.student.model.params.config") from None


def locate_model(path: str | Path, base_dir: Path | None = None, where: str | None = None) -> Path:
    """The local mlx-lm folder a spec's model ``path`` names: a folder as it is; a ``.gguf``
    file imported once into the cache (``kd import``); a hub name (``owner/name``) through
    the Hugging Face cache (:func:`kdcore.hub.resolve_model`). ``where``: the spec place."""
    from kdcore.hub import local_path, resolve_model

    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    local = local_path(str(path), base_dir)
    if local.suffix.lower() == ".gguf":
        from kdcore.gguf.convert import imported_folder

        return imported_folder(local)
    return resolve_model(str(path), base_dir, where)


def load_mlxlm(
    path: str | Path, dtype: str | None = None, where: str = "$.teachers[0].params.dtype"
) -> tuple[nn.Module, dict]:
    """(mlx-lm model, config dict) from a local directory (see :func:`locate_model` for
    GGUF files and hub names), its float weights cast by the dtype policy
    (:mod:`kdcore.models.dtype`; ``dtype`` is the spec's choice, ``where`` its place)."""
    require_mlx_lm()
    from mlx_lm.utils import load_model

    ops.patch_mlx_lm()  # its layers' attention and SwiGLU through kdcore.models.ops
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"not an mlx-lm model directory (no config.json): {path}")
    # Never code from a model folder. mlx-lm would refuse a model_file too, but its message
    # points at trust_remote_code, which kdcore does not offer; auto_map entries (for
    # transformers) mlx-lm ignores: the model is its own implementation of model_type.
    raw = read_json(path / "config.json", "model config")
    raw = raw if isinstance(raw, dict) else {}
    requests = folder_code(path, "model")
    if raw.get("model_file") is not None:
        raise CheckpointError(
            f"{path} asks to run its own Python to build the model ({'; '.join(requests)}); {NEVER}"
        )
    warn_folder_code(path, requests, f"the model is mlx-lm's own {raw.get('model_type')!r}")
    try:
        model, config = load_model(path, trust_remote_code=False)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    # the choice rides on the model (not in config: that is written out with a student)
    model.dtype_choice = apply_policy(model, dtype, where)
    mx.eval(model.parameters())
    if model.dtype_choice.dequantize:  # dense now: a saved copy must not claim otherwise
        config = {k: v for k, v in config.items() if k not in QUANTIZATION_KEYS}
    return model, config


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


def _layer_list(lm: nn.Module) -> tuple[nn.Module, str]:
    """The module and attribute holding the decoder layers (``model.layers``, ``model.h``)."""
    inner = lm["model"] if isinstance(lm.get("model"), nn.Module) else lm
    for name in ("layers", "h", "blocks"):
        if isinstance(inner.get(name), list):
            return inner, name
    raise SpecError(f"cannot find the decoder layers of mlx-lm model {type(lm).__module__}")


class _Catcher:
    """Stands in for a decoder layer during one forward and records what flows through it."""

    def __init__(self, layer: nn.Module, first: bool, sink: list | None, recompute: bool = False):
        self.layer, self.first, self.sink, self.recompute = layer, first, sink, recompute

    def __call__(self, x, *args, **kwargs):
        if self.first and self.sink is not None:
            self.sink.append(x)
        if self.recompute and kwargs.get("cache") is None:
            out = checkpointed(self.layer, lambda h: self.layer(h, *args, **kwargs), x)
        else:
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
        # Set by the engine (train.checkpoint_layers): recompute each layer in the backward.
        self.checkpoint_layers = False

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

    def make_cache(self, left_padding: Sequence[int]) -> list:
        """mlx-lm's own prompt cache (``make_prompt_cache``) for a batch whose row ``b``
        starts with ``left_padding[b]`` pads; padded rows get mlx-lm's batch caches
        (``BatchKVCache``...), which mask the pads and offset each row's positions."""
        require_mlx_lm()
        from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, make_prompt_cache

        pads = [int(p) for p in left_padding]
        if not any(pads):
            return make_prompt_cache(self._ref.lm)
        # mlx-lm's batch generator builds its batch caches this way: merge empty per-row
        # caches, then announce the left padding before the prompt runs. Only the KV
        # caches take left padding (a recurrent state's cache would run over the pads).
        rows = [make_prompt_cache(self._ref.lm) for _ in pads]
        batch = []
        for layer, cache in enumerate(rows[0]):
            merged = cache.merge([row[layer] for row in rows]) if hasattr(cache, "merge") else None
            if not isinstance(merged, (BatchKVCache, BatchRotatingKVCache)):
                raise KdError(
                    f"mlx-lm model {self.mlx_config.get('model_type')!r}: its cache "
                    f"{type(cache).__name__} cannot hold left-padded rows; generate prompts "
                    "of one length per call"
                )
            merged.prepare(left_padding=pads)
            batch.append(merged)
        return batch

    def step(self, input_ids: mx.array, cache: list) -> mx.array:
        """Run the new tokens ``input_ids`` [B, L] on ``cache`` (mlx-lm's
        ``model(inputs, cache=cache)``): the logits [B, V] after the last one."""
        return self._ref.lm(input_ids, cache=cache)[:, -1, :]

    def split_head(self) -> tuple[nn.Module, Callable, nn.Module] | None:
        """``(body, head, head layer)`` when this model's logits are exactly
        ``head(body(ids))`` with a tied embedding or an ``lm_head`` (the families in
        ``PLAIN_HEAD_TYPES``; checked against their mlx-lm ``__call__``), else None."""
        lm = self._ref.lm
        if self.mlx_config.get("model_type") not in PLAIN_HEAD_TYPES or "model" not in lm:
            return None
        if "lm_head" in lm:
            return lm.model, lm.lm_head, lm.lm_head
        embed = lm.model.embed_tokens
        return lm.model, embed.as_linear, embed

    def _output(self, input_ids: mx.array, **captured) -> ModelOutput:
        split = self.split_head()
        if split is None:
            return ModelOutput(logits=self._ref.lm(input_ids), **captured)
        body, head, layer = split
        weight, bias = plain_head(layer)
        return ModelOutput(
            final_hidden=body(input_ids),
            head=head,
            head_weight=weight,
            head_bias=bias,
            vocab=layer["weight"].shape[0],
            **captured,
        )

    def __call__(self, input_ids: mx.array, capture: frozenset[str] = frozenset()) -> ModelOutput:
        lm = self._ref.lm
        want_hidden = "hidden_states" in capture
        want_attn = "attentions" in capture
        recompute = self.checkpoint_layers and not want_attn
        if not (want_hidden or want_attn or recompute):
            return self._output(input_ids)
        owner, name = _layer_list(lm)
        layers = owner[name]
        hidden: list = []
        attentions: list = []
        catchers = [
            _Catcher(layer, i == 0, hidden if want_hidden else None, recompute)
            for i, layer in enumerate(layers)
        ]
        with _patched_attention(layers, attentions if want_attn else None):
            owner[name] = catchers
            try:
                out = self._output(input_ids)
            finally:
                owner[name] = layers
        if want_attn and len(attentions) != len(layers):
            raise SpecError(
                f"attention capture saw {len(attentions)} attention calls for {len(layers)} layers"
            )
        out.hidden_states = tuple(hidden) if want_hidden else None
        out.attentions = tuple(attentions) if want_attn else None
        return out


@attrs.define
class MlxLmModelConfig:
    path: str | None = None  # an mlx-lm folder, a .gguf file or a hub name (locate_model)
    config: dict[str, Any] = attrs.field(factory=dict)  # a fresh model of this mlx-lm config
    # a fresh model whose config starts from this model's (folder, .gguf or hub name; its
    # quantization dropped, ``config`` keys override, its tokenizer files shipped): e.g.
    # base = "teacher.gguf", config = { num_hidden_layers = 15 } for a half-depth student
    base: str | None = None
    vocab_size: int | None = None  # for a fresh model without one: the run's tokenizer size
    # None: the dtype policy (kdcore.models.dtype: float32 on a CPU, as stored on a GPU)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer: str | None = None  # tokenizer files to ship with the saved student (default: path)


def mlxlm_model(config: MlxLmModelConfig, setup) -> MlxLmModel:
    """The ``mlx-lm`` model component: load ``path``, or build ``config`` fresh (on top of
    ``base``'s config when given)."""
    if (config.path is None) == (not config.config and config.base is None):
        raise SpecError(
            "model 'mlx-lm' needs exactly one of path = \"DIR\" or config = {...} / "
            'base = "DIR" @ $.student.model.params'
        )
    where = "$.student.model.params.dtype"
    base_dir = setup.base_dir if setup is not None else None
    tokenizer_dir = None
    if config.path is not None:
        source = locate_model(config.path, base_dir, "$.student.model.params.path")
        lm, raw = load_mlxlm(source, config.dtype, where)
    else:
        raw = dict(config.config)
        if config.base is not None and str(config.base).lower().endswith(".gguf"):
            # its header is enough: building the student must not import the weights (kd
            # validate builds it too); the tokenizer files come from the run's tokenizer
            from kdcore.gguf.convert import header_config
            from kdcore.hub import local_path

            gguf = local_path(config.base, base_dir or Path.cwd())
            if not gguf.is_file():
                raise SpecError(f"GGUF file not found: {gguf} @ $.student.model.params.base")
            found = header_config(gguf)
            raw = {**{k: v for k, v in found.items() if k not in QUANTIZATION_KEYS}, **raw}
        elif config.base is not None:
            tokenizer_dir = locate_model(config.base, base_dir, "$.student.model.params.base")
            raw = {**base_config(tokenizer_dir), **raw}
        if "vocab_size" not in raw:
            if config.vocab_size is None:
                raise SpecError("a fresh mlx-lm model needs vocab_size @ $.student.model.params")
            raw["vocab_size"] = config.vocab_size
        source = None
        lm = build_mlxlm(raw)
        lm.dtype_choice = apply_policy(lm, config.dtype, where)
    have = int(raw.get("vocab_size") or 0)
    if config.vocab_size is not None and have and have < config.vocab_size:
        raise SpecError(
            f"the mlx-lm model has {have} token embeddings, fewer than the run tokenizer's "
            f"{config.vocab_size} @ $.student.model.params"
        )
    mx.eval(lm.parameters())
    if config.tokenizer is not None:
        tokenizer_dir = Path(setup.resolve(config.tokenizer)) if setup else Path(config.tokenizer)
    model = MlxLmModel(lm, raw, source, tokenizer_dir)
    model.train()  # mlx-lm loads in eval mode; a student trains (LoRA dropout)
    return model


def base_config(folder: Path) -> dict:
    """``folder``'s config.json as the start of a fresh, unquantized model's."""
    path = folder / "config.json"
    if not path.is_file():
        raise SpecError(f"no config.json in {folder} @ $.student.model.params.base")
    raw = json.loads(path.read_text())
    return {k: v for k, v in raw.items() if k not in QUANTIZATION_KEYS}


def load_kd_model(
    directory: str | Path, dtype: str | None = None, where: str = "$.teachers[0].params.dtype"
) -> tuple[MlxLmModel, str, MlxLmModelConfig]:
    """(model, "mlx-lm", config) for an mlx-lm directory, as ``kdcore.models.load_model``
    returns them (``kd eval`` on a run whose student is an mlx-lm model)."""
    config = MlxLmModelConfig(path=str(directory), dtype=dtype)
    lm, raw = load_mlxlm(Path(directory), dtype, where)
    model = MlxLmModel(lm, raw, Path(directory))
    model.dtype_choice = lm.dtype_choice  # what a `path` teacher reports, as a kd model does
    model.eval()
    return model, "mlx-lm", config


# The ids mlx-lm's generate reads from config.json (eos: where a turn ends).
TURN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def write_tokenizer_files(directory: Path, tokenizer_dir: Path | None, run_tok: Any) -> None:
    """Ship tokenizer files mlx-lm can load: copied from ``tokenizer_dir``, else from the
    folder the run's tokenizer was read from (its chat template, special tokens and
    generation config with it), else written from the run's tokenizer itself (a Hugging
    Face one as it is; bytes as a byte-level BPE)."""
    if tokenizer_dir is None:
        tokenizer_dir = getattr(run_tok, "source", None)
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


def turn_ids(folder: Path | None) -> dict[str, Any]:
    """bos/eos/pad ids a model folder declares (generation_config.json over config.json):
    what a student built from a bare config must carry to stop at the end of a turn."""
    found: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json"):  # the later one wins
        path = Path(folder) / name if folder is not None else None
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            found.update({k: data[k] for k in TURN_IDS if data.get(k) is not None})
    return found


def save_mlxlm_student(
    model: MlxLmModel,
    directory: str | Path,
    tokenizer_dir: str | Path | None = None,
    run_tok: Any = None,
    weights: dict[str, mx.array] | None = None,
    config: dict | None = None,
) -> None:
    """Write an mlx-lm directory: ``config.json``, ``model.safetensors``, tokenizer files
    and ``generation_config.json``.

    ``mlx_lm.load(directory)`` and ``mlx_lm.generate`` work on it: the chat template and
    the end-of-turn ids come from the tokenizer's folder when the model's own config lacks
    them (a student built from a config). ``weights`` overrides the model's parameters (LoRA
    students save their fused weights this way), ``config`` its config.json (a quantized
    student's carries its ``"quantization"`` entry).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = weights if weights is not None else dict(tree_flatten(model.parameters()))
    save_arrays(directory / "model.safetensors", weights, metadata={"format": "mlx"})
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else model.tokenizer_dir
    write_tokenizer_files(directory, tokenizer_dir, run_tok)
    config = dict(config if config is not None else model.mlx_config)
    source = tokenizer_dir or getattr(run_tok, "source", None)
    ids = {**turn_ids(model.source), **turn_ids(source)}
    config.update({k: v for k, v in ids.items() if k not in config})
    write_json(directory / "config.json", config)
    if not (directory / "generation_config.json").exists() and ids:
        write_json(directory / "generation_config.json", ids)
