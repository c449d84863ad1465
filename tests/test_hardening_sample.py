"""``kd sample``'s output file: never over an existing file without ``--force``, never over
one of its own inputs, resumed from ``OUTPUT.partial`` after an interruption, no temporary
left beside it; and its counts (``--max-new-tokens``, ``--batch-size``, ``--limit``) are
checked as given, never replaced by the spec's when 0."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kdcore import testing
from kdcore.engine import onpolicy
from kdcore.errors import KdError

LIMIT, BATCH, NEW = 12, 4, 4  # three chunks of four prompts, four tokens each


@pytest.fixture
def setup(tmp_path, corpus) -> tuple[Path, Path]:
    """(spec file, data file): a random byte-level teacher answering the prompts of a copy
    of the corpus (the test may see it overwritten)."""
    data = tmp_path / "data.txt"
    data.write_bytes(corpus.read_bytes())
    teacher = testing.save_random_model(tmp_path / "teacher", max_seq_len=128)
    spec = testing.tiny_spec(data, teachers=[{"path": str(teacher)}])
    file = tmp_path / "spec.json"
    file.write_text(json.dumps(spec))
    return file, data


def _sample(spec: Path, out: Path, *extra) -> int:
    argv = ["sample", spec, "--output", out, "--limit", LIMIT, "--batch-size", BATCH]
    argv += ["--max-new-tokens", NEW, "--temperature", 1.0, "--truncated", "keep"]
    return testing.run_kd(*argv, *extra)


def _stop_at(monkeypatch, call: int, error: BaseException) -> list[int]:
    """Make the ``call``-th chunk's sampling raise ``error`` (1-based); the calls seen."""
    real = onpolicy.continue_prompts
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == call:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(onpolicy, "continue_prompts", counted)
    return calls


# ---------------------------------------------------------------- A1: --force


def test_kd_sample_refuses_to_replace_an_existing_output_without_force(setup, tmp_path, capsys):
    spec, _ = setup
    out = tmp_path / "answers.jsonl"
    out.write_text("earlier answers\n")
    assert _sample(spec, out) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert out.read_text() == "earlier answers\n"
    assert _sample(spec, out, "--force") == 0, capsys.readouterr().err
    assert len(out.read_text().splitlines()) == LIMIT


# ---------------------------------------------------------------- A2: its own inputs


def test_kd_sample_never_writes_over_its_own_inputs_even_with_force(setup, tmp_path, capsys):
    spec, data = setup
    teacher = tmp_path / "teacher"
    alias = tmp_path / "alias"
    alias.symlink_to(tmp_path)  # another spelling of the same files: paths are resolved
    before = {p: p.read_bytes() for p in (data, spec, teacher / "config.json")}
    for target in (data, alias / "data.txt", spec, teacher / "config.json"):
        for force in ([], ["--force"]):
            assert _sample(spec, target, *force) == 1, target
            err = capsys.readouterr().err
            assert "input" in err and str(target) in err, err
    assert {p: p.read_bytes() for p in before} == before


# ---------------------------------------------------------------- A3: resuming


def test_kd_sample_resumes_an_interrupted_output_to_the_same_bytes(
    setup, tmp_path, capsys, monkeypatch
):
    spec, _ = setup
    reference = tmp_path / "reference.jsonl"
    assert _sample(spec, reference) == 0, capsys.readouterr().err
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "answers.jsonl"
    partial = folder / "answers.jsonl.partial"

    _stop_at(monkeypatch, 3, KeyboardInterrupt())  # interrupted in its last chunk
    assert _sample(spec, out) == 130
    capsys.readouterr()
    assert not out.exists() and partial.is_file()
    assert sorted(p.name for p in folder.iterdir()) == [partial.name]  # no .tmp
    with open(partial, "a", encoding="utf-8") as handle:  # a kill in the middle of a line
        handle.write('{"prompt": "12')

    calls = _stop_at(monkeypatch, 0, RuntimeError())  # never raises: counts the calls
    assert _sample(spec, out) == 0, capsys.readouterr().err
    assert calls == [BATCH]  # the two chunks answered before were not sampled again
    assert out.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == [out.name]


def test_kd_sample_refuses_a_partial_output_of_other_arguments_or_prompts(
    setup, tmp_path, capsys, monkeypatch
):
    spec, data = setup
    out = tmp_path / "answers.jsonl"
    partial = tmp_path / "answers.jsonl.partial"
    _stop_at(monkeypatch, 2, KeyboardInterrupt())
    assert _sample(spec, out, "--seed", 1) == 130
    monkeypatch.undo()
    capsys.readouterr()
    held = partial.read_bytes()

    assert _sample(spec, out, "--seed", 2) == 1  # other arguments: refused, kept
    err = capsys.readouterr().err
    assert str(partial) in err and "--force" in err and "seed" in err
    assert partial.read_bytes() == held and not out.exists()

    data.write_text("Another text altogether.\n" * 800)  # the same arguments, other prompts
    assert _sample(spec, out, "--seed", 1) == 1
    err = capsys.readouterr().err
    assert str(partial) in err and "--force" in err and "prompt" in err
    assert partial.read_bytes() == held and not out.exists()

    fresh = tmp_path / "fresh.jsonl"
    assert _sample(spec, fresh, "--seed", 1) == 0
    assert _sample(spec, out, "--seed", 1, "--force") == 0, capsys.readouterr().err
    assert out.read_bytes() == fresh.read_bytes() and not partial.exists()


# ---------------------------------------------------------------- A4: no temporaries


def test_kd_sample_leaves_no_temporary_file_beside_its_output(setup, tmp_path, capsys, monkeypatch):
    spec, _ = setup
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "answers.jsonl.gz"
    # what a kill while the file was moved into place left (atomic_path's naming)
    (folder / ".answers.jsonl.gz.k1ll3d00.tmp").write_bytes(b"half a file")

    _stop_at(monkeypatch, 1, KdError("the sampler broke"))
    assert _sample(spec, out) == 1
    assert "the sampler broke" in capsys.readouterr().err
    assert not out.exists() and not (folder / "answers.jsonl.gz.partial").exists()
    monkeypatch.undo()

    assert _sample(spec, out) == 0, capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == [out.name]


# ---------------------------------------------------------------- B: counts as given


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--max-new-tokens", 0),
        ("--max-new-tokens", -3),
        ("--batch-size", 0),
        ("--batch-size", -1),
        ("--limit", -1),
    ],
)
def test_kd_sample_refuses_a_count_below_one_instead_of_the_spec_default(
    setup, tmp_path, capsys, flag, value
):
    spec, _ = setup
    out = tmp_path / "answers.jsonl"
    argv = ["sample", spec, "--output", out, "--limit", 2, "--max-new-tokens", NEW, flag, value]
    assert testing.run_kd(*argv) == 2
    err = capsys.readouterr().err
    assert f"{flag} {value}" in err, err
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert sorted(os.listdir(tmp_path)) == ["data.txt", "spec.json", "teacher"]


def test_every_other_file_a_user_names_is_checked_the_same_way(
    tmp_path, make_spec, teacher_dir, capsys
):
    """kd eval --positions-out: an existing file only with --force, never a file of the run."""
    from kdcore import app

    run = tmp_path / "run"
    spec = make_spec(teachers=[{"path": str(teacher_dir)}])
    app.distill(app.load_spec(spec), output=run, progress=False)
    taken = tmp_path / "positions.jsonl"
    taken.write_text("keep me\n")
    capsys.readouterr()
    code = testing.run_kd("eval", run, "--worst", "2", "--positions-out", taken)
    assert code == 1 and "pass --force" in capsys.readouterr().err
    assert taken.read_text() == "keep me\n"
    own = run / "summary.json"
    before = own.read_bytes()
    code = testing.run_kd("eval", run, "--worst", "2", "--positions-out", own, "--force")
    assert code == 1 and "a file of the run" in capsys.readouterr().err
    assert own.read_bytes() == before
    assert testing.run_kd("eval", run, "--worst", "2", "--positions-out", taken, "--force") == 0
    assert taken.read_text() != "keep me\n"
