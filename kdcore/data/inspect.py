"""``kd data inspect``: how a spec's or a file's records tokenize and which tokens carry loss."""

from __future__ import annotations

from pathlib import Path

from kdcore.errors import SpecError
from kdcore.registry.manager import get_registry
from kdcore.registry.setup import Setup
from kdcore.spec.load import load_spec

_FORMAT_BY_SUFFIX = {".txt": "text", ".jsonl": "jsonl", ".gz": "jsonl"}


def inspect_data(source: str, fmt: str | None, limit: int = 3, overrides=None) -> dict:
    path = Path(source)
    registry = get_registry()
    if path.suffix in (".toml", ".json") and fmt is None:
        spec = load_spec(path, overrides or [])
        setup = Setup(base_dir=path.parent, seed=spec.run.seed)
        dataset = registry.get("dataset", spec.data.name).factory(spec.data.config, setup)
        name = spec.data.name
    else:
        name = fmt or _FORMAT_BY_SUFFIX.get(path.suffix)
        if name is None:
            raise SpecError(f"cannot tell the format of {path}: pass --format")
        try:
            component = registry.get("dataset", name)
        except KeyError as exc:
            raise SpecError(exc.args[0]) from None
        from kdcore.spec.build import make_config

        config = make_config("dataset", name, **_file_params(path, overrides or []))
        dataset = component.factory(config, Setup(base_dir=Path.cwd()))
    report = {"source": str(source), "format": name}
    report.update(dataset.inspect(limit))
    return report


def _file_params(path: Path, overrides: list[str]) -> dict:
    """A data file's dataset parameters: its path and each ``--set KEY=VALUE`` (``--set
    tokenizer=model --set seq_len=64``)."""
    from kdcore.spec.load import parse_override

    params: dict = {"path": str(path.resolve())}
    for item in overrides:
        keys, value = parse_override(item)
        if len(keys) != 1 or keys[0] == "path":
            raise SpecError(
                f"--set {item!r}: with a data file, --set takes one of the dataset's "
                "parameters (tokenizer=..., seq_len=...)"
            )
        params[keys[0]] = value
    return params
