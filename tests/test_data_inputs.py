"""Data files that cannot be read are errors naming the file and line, never a traceback,
and ``max_chars`` bounds what is read (issue 20, point 7)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import kdcore
from kdcore import app
from kdcore.data.datasets import open_text, read_jsonl


def _text_dataset(path: Path, **params):
    return app.build("dataset", "text", path=str(path), seq_len=8, **params)


def test_text_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"first line\nsecond line\nthird caf\xe9 line\nfourth\n")
    with pytest.raises(kdcore.SpecError, match=r"corpus\.txt: line 3 is not valid UTF-8"):
        _text_dataset(path)


def test_a_bad_byte_megabytes_in_names_its_line(tmp_path):
    path = tmp_path / "big.txt"
    line = "é" * 40 + "\n"  # two-byte characters, so read blocks split characters
    good = line * ((3 << 20) // len(line.encode()))
    path.write_bytes(good.encode() + b"bad \xff\n")
    with pytest.raises(kdcore.SpecError, match=f"line {good.count(chr(10)) + 1} is not valid"):
        open_text(path)
    assert open_text(path, max_chars=100) == good[:100]


def test_utf8_split_across_read_blocks_and_newlines_read_as_text_mode(tmp_path):
    path = tmp_path / "crlf.txt"
    text = ("ab\r\ncd\ré" * (1 << 19))[: (2 << 20) + 7]
    path.write_bytes(text.encode())
    with open(path, encoding="utf-8") as handle:
        assert open_text(path) == handle.read()


@pytest.mark.parametrize("reader", ["text", "jsonl"])
def test_a_gz_file_that_is_not_gzip_or_cut_short_is_an_error(tmp_path, reader):
    records = "".join(json.dumps({"prompt": "p", "response": "r" * i}) + "\n" for i in range(500))
    whole = gzip.compress(records.encode())
    for name, content, words in (
        ("plain.gz", records.encode(), "not a whole gzip file"),
        ("cut.gz", whole[: len(whole) // 2], "not a whole gzip file"),
    ):
        path = tmp_path / f"{reader}-{name}"
        path.write_bytes(content)
        with pytest.raises(kdcore.SpecError, match=words) as err:
            if reader == "text":
                _text_dataset(path)
            else:
                app.build("dataset", "jsonl", path=str(path))
        assert str(path) in str(err.value)


@pytest.mark.parametrize("reader", ["text", "jsonl"])
def test_a_directory_is_not_a_data_file(tmp_path, reader):
    with pytest.raises(kdcore.SpecError, match="is a directory"):
        app.build("dataset", reader, path=str(tmp_path))


def test_jsonl_rejects_a_line_that_is_not_utf8_and_reads_the_rest(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "a", "response": "b"}).encode() + b"\n"
    path.write_bytes(good + b'{"prompt": "caf\xe9", "response": "x"}\n' + good)
    records, rejected = read_jsonl(path)
    assert [n for n, _ in records] == [1, 3]
    assert rejected == [{"line": 2, "reason": rejected[0]["reason"]}]
    assert "UTF-8" in rejected[0]["reason"]


def test_jsonl_rejects_huge_numbers_and_deep_nesting_as_records(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(
        '{"prompt": "a", "response": "b"}\n'
        + '{"n": '
        + "9" * 5000
        + "}\n"
        + "[" * 50_000
        + "]" * 50_000
        + "\n"
    )
    records, rejected = read_jsonl(path)
    assert len(records) == 1 and [r["line"] for r in rejected] == [2, 3]


def test_jsonl_line_numbers_follow_text_mode_newlines(tmp_path):
    path = tmp_path / "crlf.jsonl"
    a = json.dumps({"prompt": "a", "response": "b"})
    path.write_bytes(f"{a}\r\n{a}\r{a}\n".encode())
    records, _ = read_jsonl(path)
    assert [n for n, _ in records] == [1, 2, 3]


def _fifo_writer(path: Path, total: int) -> dict:
    """Write ``total`` bytes of text into the FIFO ``path`` from a thread; the result says
    how many got through before the reader closed its end."""
    done = {"written": 0}

    def write() -> None:
        try:
            with open(path, "wb") as handle:
                block = b"abcdefgh" * 8192
                while done["written"] < total:
                    handle.write(block)
                    done["written"] += len(block)
        except BrokenPipeError:
            pass

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    done["thread"] = thread
    return done


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_max_chars_bounds_what_is_read(tmp_path):
    fifo = tmp_path / "stream.txt"
    os.mkfifo(fifo)
    total = 64 << 20
    writer = _fifo_writer(fifo, total)
    dataset = _text_dataset(fifo, max_chars=4000)
    writer["thread"].join(timeout=30)
    assert dataset.num_examples("train") + dataset.num_examples("val") == 449 + 49
    # the reader stopped and closed the pipe long before the writer's 64 MiB
    assert writer["written"] < total // 4


def test_a_device_without_max_chars_is_refused_not_read_to_exhaustion(tmp_path):
    """``/dev/zero`` as a data path once filled 18.8 GB; now it is refused, or read up to
    ``max_chars``. Run in a child with a memory cap, so that a regression fails fast."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
        "import kdcore\nfrom kdcore import app\n"
        "try:\n"
        "    app.build('dataset', 'text', path='/dev/zero', seq_len=8)\n"
        "except kdcore.SpecError as exc:\n"
        "    print('refused:', exc)\n"
        "ds = app.build('dataset', 'text', path='/dev/zero', seq_len=8, max_chars=1000)\n"
        "print('read', ds.num_examples('train') + ds.num_examples('val'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused:" in proc.stdout and "not a regular file" in proc.stdout
    assert "read 124" in proc.stdout  # 112 train + 12 val windows of 8 from 1000 chars
