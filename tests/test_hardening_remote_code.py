"""kdcore never runs Python from a model or tokenizer folder, and never asks whether to.

transformers loads a tokenizer whose ``tokenizer_config.json`` has ``"auto_map":
{"AutoTokenizer": ["my_tok.MyTokenizer", null]}`` by importing the folder's ``my_tok.py``;
called without ``trust_remote_code`` it asks ``[y/N]`` on stdin first, so a ``y`` (or a
pipe that says it) runs the folder's code. Each folder here has a ``my_tok.py`` that writes
a marker file when imported: no load through kdcore may create it or read stdin, and each
says what the folder asked for."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kdcore
from kdcore import app, testing
from kdcore.errors import CheckpointError, SpecError
from kdcore.tokenizers.hf import byte_level_tokenizer_json, write_hf_tokenizer

ENTRY = "my_tok.MyTokenizer"


def _code_folder(folder: Path, marker: Path, tokenizer_class: str | None = None) -> Path:
    """A byte-level tokenizer folder (with a chat template) whose config names its own
    ``my_tok.py``, which writes ``marker`` when imported."""
    write_hf_tokenizer(folder, byte_level_tokenizer_json())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class")
    if tokenizer_class is not None:
        config["tokenizer_class"] = tokenizer_class
    config["auto_map"] = {"AutoTokenizer": [ENTRY, None]}
    config["chat_template"] = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "my_tok.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class MyTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n"
    )
    return folder


class _Yes(io.StringIO):
    """A stdin that answers ``y`` to any question and remembers being read."""

    def __init__(self):
        super().__init__("y\n" * 10)
        self.reads = 0

    def readline(self, *args):
        self.reads += 1
        return super().readline(*args)

    def read(self, *args):
        self.reads += 1
        return super().read(*args)


@pytest.fixture
def yes(monkeypatch) -> _Yes:
    stdin = _Yes()
    monkeypatch.setattr(sys, "stdin", stdin)
    return stdin


def _chat_data(folder: Path) -> Path:
    path = folder / "chat.jsonl"
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path.write_text("".join(json.dumps({"messages": turns}) + "\n" for _ in range(8)))
    return path


def test_a_chat_dataset_refuses_a_tokenizer_that_needs_its_folders_code(tmp_path, yes):
    marker = tmp_path / "MARKER"
    folder = _code_folder(tmp_path / "tok", marker)
    component = app.get_registry().get("dataset", "chat")
    config = app.make_config(
        "dataset", "chat", path=str(_chat_data(tmp_path)), tokenizer=str(folder)
    )
    with pytest.raises(SpecError) as caught:
        component.factory(config, kdcore.Setup())
    assert not marker.exists(), "the folder's code ran"
    assert yes.reads == 0, "stdin was read"
    message = str(caught.value)
    assert str(folder) in message and "never runs code" in message


def test_the_safe_tokenizer_loader_names_the_auto_map_entry(tmp_path, yes, capsys):
    from kdcore.tokenizers.hf import load_mlx_tokenizer

    marker = tmp_path / "MARKER"
    folder = _code_folder(tmp_path / "tok", marker)
    with pytest.raises(SpecError) as caught:
        load_mlx_tokenizer(folder, "$.data.params.tokenizer")
    message = str(caught.value)
    assert ENTRY in message and "auto_map" in message and "never runs code" in message
    assert "$.data.params.tokenizer" in message
    # a folder whose class transformers has itself loads without its code, and says so
    plain = _code_folder(tmp_path / "plain", marker, tokenizer_class="PreTrainedTokenizerFast")
    wrapper = load_mlx_tokenizer(plain, "$.data.params.tokenizer")
    assert wrapper.encode("ab", add_special_tokens=False) == [97, 98]
    err = capsys.readouterr().err
    assert ENTRY in err and "never runs code" in err
    assert not marker.exists() and yes.reads == 0


def test_kd_sample_reads_a_code_tokenizer_as_data_and_says_so(tmp_path, corpus, yes, capsys):
    """A text spec whose tokenizer folder names its own code: its tokenizer.json is read
    (no code), with a warning naming the entry."""
    marker = tmp_path / "MARKER"
    folder = _code_folder(tmp_path / "tok", marker)
    teacher = testing.save_random_model(tmp_path / "teacher", max_seq_len=128)
    spec = testing.tiny_spec(corpus, teachers=[{"path": str(teacher)}])
    spec["data"]["params"]["tokenizer"] = str(folder)
    file = tmp_path / "spec.json"
    file.write_text(json.dumps(spec))
    out = tmp_path / "answers.jsonl"
    argv = ["sample", file, "--output", out, "--limit", 2, "--max-new-tokens", 2]
    assert testing.run_kd(*argv, "--truncated", "keep") == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert ENTRY in err and "never runs code" in err and str(folder) in err
    assert not marker.exists() and yes.reads == 0
    assert len(out.read_text().splitlines()) == 2


def test_kd_sample_on_a_chat_spec_never_asks_even_when_stdin_says_yes(tmp_path):
    """The whole command, in a process of its own, its stdin a pipe that answers ``y``."""
    marker = tmp_path / "MARKER"
    folder = _code_folder(tmp_path / "tok", marker)
    teacher = testing.save_random_model(tmp_path / "teacher", max_seq_len=128)
    data = _chat_data(tmp_path)
    spec = testing.tiny_spec(data, teachers=[{"path": str(teacher)}])
    spec["data"] = {"name": "chat", "params": {"path": str(data), "tokenizer": str(folder)}}
    file = tmp_path / "spec.json"
    file.write_text(json.dumps(spec))
    argv = [sys.executable, "-m", "kdcore.cli", "sample", str(file), "--output"]
    done = subprocess.run(
        [*argv, str(tmp_path / "answers.jsonl")],
        input="y\n" * 10,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "_KD_REEXEC": "1"},
    )
    assert not marker.exists(), "the folder's code ran"
    assert done.returncode == 2, done.stderr
    assert "[y/N]" not in done.stdout + done.stderr
    assert "never runs code" in done.stderr and "Traceback" not in done.stderr


def test_an_mlx_lm_folder_naming_its_own_model_code_is_refused(tmp_path, capsys):
    from kdcore.models.mlxlm import create_mlxlm_dir, load_mlxlm

    marker = tmp_path / "MARKER"
    llama = dict(
        model_type="llama",
        hidden_size=16,
        num_hidden_layers=1,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        rms_norm_eps=1e-5,
        vocab_size=256,
    )
    folder = create_mlxlm_dir(tmp_path / "model", llama)
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    # model code through auto_map: mlx-lm builds its own llama, the folder's code is named
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    load_mlxlm(folder)
    err = capsys.readouterr().err
    assert "evil.Model" in err and "never runs code" in err
    # model code through mlx-lm's model_file: refused
    (folder / "config.json").write_text(json.dumps({**config, "model_file": "evil.py"}))
    with pytest.raises(CheckpointError) as caught:
        load_mlxlm(folder)
    message = str(caught.value)
    assert "evil.py" in message and "never runs code" in message
    assert "trust_remote_code" not in message  # not an option kdcore has
    assert not marker.exists()
