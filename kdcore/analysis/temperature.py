"""``kd temperature``: what the teacher's distribution looks like at each temperature.

For every real token position (mask 1) and temperature ``T``, with ``p = softmax(z / T)``
over a vocabulary of ``V`` tokens:

- entropy ``H = -sum_i p_i ln p_i`` (nats; the uniform distribution has ``ln V``);
- effective support ``#{i : p_i > 1/V}``: how many tokens beat the uniform probability;
- top-k mass ``sum of the k largest p_i`` for k = 1, 5, 10.

Each is averaged over positions. Softening (large ``T``) raises entropy and support and
lowers the top-k masses; a temperature where top-1 mass is still high carries little
"dark knowledge", one where support approaches ``V`` is mostly noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kdcore.errors import CheckpointError, SpecError
from kdcore.io import read_json
from kdcore.signal.teacher import stable_log_softmax

TOPK = (1, 5, 10)


def _is_run_dir(path: Path) -> bool:
    return (path / "spec.toml").exists() and (path / "run.json").exists()


# Keys of the chat dataset's record formats (kdcore.data.chat): messages, prompt/completion,
# text. A JSONL file whose first record has one of them is read as chat records.
_CHAT_KEYS = ("messages", "completion", "text")


def jsonl_format(path: Path) -> str:
    """``"chat"`` when the first record of a JSONL file (``.gz`` too) is one of the chat
    dataset's formats, else ``"jsonl"`` (prompt/response records)."""
    import gzip
    import json

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as handle:  # a BOM is not a record
            first = next((line for line in handle if line.strip()), "")
        record = json.loads(first) if first else None
    except (OSError, ValueError, EOFError):
        return "jsonl"  # the jsonl dataset reports what is wrong with the file, by line
    if isinstance(record, dict) and "response" not in record:
        if any(key in record for key in _CHAT_KEYS):
            return "chat"
    return "jsonl"


def dataset_for_file(
    data: str | Path,
    tokenizer,
    seq_len: int,
    seed: int = 0,
    chat_tokenizer: str | None = None,
    base_dir: str | Path | None = None,
):
    """A dataset over a text or JSONL file, every example in its ``train`` split. Chat
    records (``messages``, ``prompt``/``completion``, ``text``: the ``chat`` dataset's
    formats) are rendered with the chat template of ``chat_tokenizer`` (a tokenizer folder or
    hub name, relative to ``base_dir``), one record a row, loss on the assistant tokens;
    other JSONL is prompt/response records, loss on the response."""
    from kdcore.registry.manager import get_registry
    from kdcore.registry.setup import Setup
    from kdcore.spec.build import make_config

    path = Path(data).resolve()
    fmt = "text"
    if path.suffix in (".jsonl", ".gz"):
        fmt = jsonl_format(path)
    params: dict[str, Any] = {"path": str(path), "seq_len": seq_len, "val_fraction": 0.0}
    if fmt == "chat":
        if chat_tokenizer is None:
            raise SpecError(
                f"{path} holds chat records, which need a tokenizer folder with a chat "
                "template: the run's data is not a chat dataset and its student/ folder has "
                "no chat template"
            )
        # unpacked: a record is scored in its own context, as the student will see it
        params.update(tokenizer=chat_tokenizer, pack=False)
    config = make_config("dataset", fmt, **params)
    setup = Setup(base_dir=Path(base_dir or Path.cwd()), seed=seed, tokenizer=tokenizer)
    return get_registry().get("dataset", fmt).factory(config, setup)


def run_teacher(spec, notes: list[str] | None = None) -> tuple[Any, Any, Path | None]:
    """The first teacher of a run with a model in the run's token ids: (model, tokenizer,
    directory). A top-k cache gives the model it was captured from when that folder is
    known and unchanged (``kdcore.cache.read.cached_teacher_folder``; why not is appended
    to ``notes``); a retokenizing teacher has no such model."""
    from kdcore.cache.read import cached_teacher_folder
    from kdcore.models.io import load_model
    from kdcore.registry.manager import get_registry
    from kdcore.registry.setup import Setup
    from kdcore.tokenizers.simple import load_tokenizer

    registry = get_registry()
    for ref in spec.teachers:
        if ref.source_name == "cache":
            folder, note = cached_teacher_folder(spec, ref)
            if folder is None:
                if notes is not None:
                    notes.append(note)
                continue
            model = load_model(folder)[0]
            model.freeze()
            model.eval()
            return model, load_tokenizer(folder), folder
        component = registry.get("teacher_source", ref.source_name)
        config = ref.config if ref.config is not None else component.config()
        setup = Setup(base_dir=Path(spec.base_dir), seed=spec.run.seed, spec=spec, teacher=ref)
        teacher = component.factory(config, setup)
        if getattr(teacher, "model", None) is not None:
            return teacher.model, teacher.tokenizer, getattr(teacher, "path", None)
    return None, None, None


def load_model_dir(directory: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a kdcore model folder or a local mlx-lm folder."""
    from kdcore.models.io import load_model
    from kdcore.tokenizers.simple import load_tokenizer

    directory = Path(directory)
    raw = read_json(directory / "config.json", "model config")
    if "kd_model" not in raw and "model_type" in raw:
        from kdcore.models.mlxlm import MlxLmModel, load_mlxlm
        from kdcore.tokenizers.hf import load_hf_tokenizer

        lm, config = load_mlxlm(directory)
        tokenizer = load_hf_tokenizer(directory)
        if tokenizer is None:
            raise CheckpointError(f"{directory} has no Hugging Face tokenizer.json")
        return MlxLmModel(lm, config, directory), tokenizer
    return load_model(directory)[0], load_tokenizer(directory)


def load_teacher_and_data(
    source: str | Path, data: str | Path | None, batches: int, batch_size: int | None
):
    """(model, tokenizer, numpy batches, description) for a run folder or a model folder.

    A run folder gives its first teacher with a model and its val split; a model folder
    that is ``RUN/student`` of a run gives that run's val split; ``data`` overrides the split.
    """
    from kdcore.engine.rundir import load_run_spec
    from kdcore.registry.manager import get_registry
    from kdcore.registry.setup import Setup

    source = Path(source)
    spec = None
    if _is_run_dir(source):
        spec = load_run_spec(source)
        model, tokenizer, model_dir = run_teacher(spec)
        if model is None:
            raise SpecError(
                f"{source}: the run has no teacher model in its own token ids; pass the "
                "teacher's model folder and --data"
            )
    elif (source / "config.json").exists():
        model, tokenizer = load_model_dir(source)
        model_dir = source
        if _is_run_dir(source.parent):
            spec = load_run_spec(source.parent)
    else:
        raise CheckpointError(f"{source} is neither a kd run folder nor a model folder")
    model.freeze()
    model.eval()
    seq_len = 128
    if spec is not None:
        seq_len = getattr(spec.data.config, "seq_len", seq_len)
        batch_size = batch_size or spec.train.batch_size
    batch_size = batch_size or 8
    if data is not None:
        dataset = dataset_for_file(data, tokenizer, seq_len)
        split, where = "train", str(data)
    elif spec is not None:
        setup = Setup(base_dir=Path(spec.base_dir), seed=spec.run.seed, tokenizer=tokenizer)
        dataset = get_registry().get("dataset", spec.data.name).factory(spec.data.config, setup)
        split, where = "val", f"val split of {spec.run.name}"
    else:
        raise SpecError(f"{source} is a model folder outside a run: pass --data FILE")
    examples = list(dataset.batches(batch_size, split, batches))
    if not examples:
        raise SpecError(f"no {split} examples in {where}")
    return model, tokenizer, examples, {"teacher": str(model_dir), "data": where}


def distribution_shape(logits: mx.array, mask: mx.array, temperature: float) -> dict[str, float]:
    """Sums over masked positions of entropy, support and top-k masses (see module doc)."""
    V = logits.shape[-1]
    logp = stable_log_softmax(logits.astype(mx.float32) / temperature)
    p = mx.exp(logp)
    entropy = -(p * logp).sum(-1)
    support = (p > 1.0 / V).sum(-1).astype(mx.float32)
    kmax = min(max(TOPK), V)
    top = mx.sort(mx.topk(p, kmax, axis=-1), axis=-1)  # ascending: the largest last
    out = {"entropy": (entropy * mask).sum(), "support": (support * mask).sum()}
    for k in TOPK:
        out[f"top{k}_mass"] = (top[..., kmax - min(k, kmax) :].sum(-1) * mask).sum()
    mx.eval(out)
    return {k: v.item() for k, v in out.items()}


def temperature_stats(
    source: str | Path,
    data: str | Path | None = None,
    temperatures: list[float] | tuple[float, ...] = (1.0, 2.0, 4.0, 8.0),
    batches: int = 4,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """The table of ``kd temperature``: one row per temperature."""
    temperatures = [float(t) for t in temperatures]
    if not temperatures or any(not t > 0 for t in temperatures):
        raise SpecError(f"temperatures must be > 0, got {temperatures}")
    model, tokenizer, examples, where = load_teacher_and_data(source, data, batches, batch_size)
    sums = {t: {} for t in temperatures}
    tokens = 0.0
    vocab = None
    for batch in examples:
        mask = mx.array(batch["mask"])
        logits = model(mx.array(batch["input_ids"])).logits
        vocab = logits.shape[-1]
        tokens += mask.sum().item()
        for t in temperatures:
            for key, value in distribution_shape(logits, mask, t).items():
                sums[t][key] = sums[t].get(key, 0.0) + value
    tokens = max(tokens, 1.0)
    rows = [{"temperature": t, **{k: v / tokens for k, v in sums[t].items()}} for t in temperatures]
    return {
        **where,
        "vocab_size": vocab,
        "max_entropy": float(np.log(vocab)),
        "tokens": int(tokens),
        "rows": rows,
    }


def plot_temperatures(report: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = report["rows"]
    ts = [r["temperature"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=100)
    axes[0].plot(ts, [r["entropy"] for r in rows], marker="o")
    axes[0].axhline(report["max_entropy"], ls="--", c="gray", label="ln V (uniform)")
    axes[0].set_title("entropy (nats)")
    axes[0].legend(fontsize=8)
    axes[1].plot(ts, [r["support"] for r in rows], marker="o")
    axes[1].axhline(report["vocab_size"], ls="--", c="gray", label="V")
    axes[1].set_title("effective support (p > 1/V)")
    axes[1].legend(fontsize=8)
    for k in TOPK:
        axes[2].plot(ts, [r[f"top{k}_mass"] for r in rows], marker="o", label=f"top-{k}")
    axes[2].set_title("top-k mass")
    axes[2].set_ylim(0, 1.02)
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ts, [f"{t:g}" for t in ts])
        ax.minorticks_off()
        ax.set_xlabel("temperature")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"teacher {report['teacher']} on {report['data']} ({report['tokens']} tokens)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
