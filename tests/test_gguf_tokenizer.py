"""kdcore.gguf.tokenizer: Hugging Face tokenizer files rebuilt from GGUF metadata, checked
against transformers' own GGUF tokenizer loader (``AutoTokenizer(..., gguf_file=...)``), an
independent implementation, on SmolLM2's real file and on small files written here."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import transformers
from tokenizers import Tokenizer

from kdcore.errors import CheckpointError
from kdcore.gguf.read import read_metadata
from kdcore.gguf.tokenizer import FILES, tokenizer_files, write_tokenizer_files

TEXTS = [
    "Hello world! 123",
    "The quick brown fox jumps over the lazy dog.",
    "1234567",
    "3.14159 and 2,000,000",
    "  multiple   spaces\tand\ttabs   ",
    "line one\nline two\n\n\nthree\r\nfour\n",
    " leading space",
    "café naïve résumé — “quotes” 😀🎉 日本語のテキスト 한국어",
    "don't I'LL you've",
    "def f(x):\n    return x**2  # comment\n",
    "<|im_end|> between <|im_start|>specials",
    "",
]
CONVERSATION = [
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "It is 42.\n\nAnything else?"},
]


def write_gguf(path: Path, meta: dict) -> Path:
    """A GGUF holding only ``meta`` (no tensors): all the tokenizer loaders read."""
    writer = gguf.GGUFWriter(str(path), meta["general.architecture"])
    for key, value in meta.items():
        if key == "general.architecture":
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def assert_same_ids(folder: Path, ref, texts=TEXTS) -> Tokenizer:
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in texts:
        expected = ids(ref(text))
        assert ours.encode(text).ids == expected, text
        assert ids(auto(text)) == expected, text
    return ours


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    meta = read_metadata(smollm2_gguf)
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    write_tokenizer_files(meta, folder, source=smollm2_gguf.name)
    return meta, folder, reference(smollm2_gguf)


def test_smollm2_ids_match_transformers_and_mlx_lm(smollm2):
    from mlx_lm.tokenizer_utils import load

    _, folder, ref = smollm2
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    ours = assert_same_ids(folder, ref)
    wrapped = load(folder)
    for text in TEXTS:
        assert wrapped.encode(text) == ours.encode(text).ids, text
    # Known SmolLM2 ids, independent of either loader: digits one by one, " " alone before them.
    assert ours.encode("Hello world! 123").ids == [19556, 905, 17, 216, 33, 34, 35]
    assert ours.encode("  multiple   spaces").ids == [216, 2701, 256, 5600]


def test_smollm2_specials_and_chat_template(smollm2):
    meta, folder, ref = smollm2
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert ours.encode("<|im_end|>").ids == [2]
    assert ours.encode("a<|im_start|>b").ids[1] == 1
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == meta["tokenizer.chat_template"]
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert config["add_bos_token"] is False
    assert json.loads((folder / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"

    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    chat = ids(auto.apply_chat_template(CONVERSATION, tokenize=True))
    assert chat == ids(ref.apply_chat_template(CONVERSATION, tokenize=True))
    assert chat.count(2) == 3 and chat[0] == 1  # system turn (the template's default) + 2 turns
    assert auto.eos_token_id == 2 and auto.pad_token_id == 2


def test_smollm2_decodes_back(smollm2):
    from mlx_lm.tokenizer_utils import load

    _, folder, _ = smollm2
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    wrapped = load(folder)
    for text in TEXTS:
        tokens = ours.encode(text).ids
        assert ours.decode(tokens, skip_special_tokens=False) == text
        detokenizer = wrapped.detokenizer  # mlx-lm's streaming decoder, as generation uses it
        detokenizer.reset()
        for token in tokens:
            detokenizer.add_token(token)
        detokenizer.finalize()
        # mlx-lm drops one leading space of a generation by design, whatever the tokenizer.
        assert detokenizer.text == (text[1:] if text.startswith(" ") else text)


# Merges SmolLM2 lacks (it reads digits one by one), so that the families' digit and
# punctuation rules give different ids: "1234567" is "123 456 7" for Llama 3, seven digits for
# Qwen2, and "(x" is one piece for Llama 3 and two for GPT-2.
EXTRA_MERGES = ["1 2", "12 3", "4 5", "45 6", "( x"]


def cut_vocabulary(meta: dict, pre: str, size: int = 8000) -> dict:
    """SmolLM2's first ``size`` tokens and the merges they can still make, plus
    ``EXTRA_MERGES``, under pre type ``pre`` (small files, quick loaders)."""
    tokens = meta["tokenizer.ggml.tokens"][:size]
    kept = set(tokens)
    merges = [
        m for m in meta["tokenizer.ggml.merges"] if {*m.split(" "), m.replace(" ", "")} <= kept
    ]
    extra = [m.replace(" ", "") for m in EXTRA_MERGES]
    cut = {**meta, "tokenizer.ggml.pre": pre, "tokenizer.ggml.add_bos_token": False}
    cut.pop("tokenizer.chat_template")
    cut["tokenizer.ggml.tokens"] = tokens + extra
    cut["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"][:size] + [1] * len(extra)
    cut["tokenizer.ggml.merges"] = merges + EXTRA_MERGES
    return cut


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2", "tekken", "gpt-4o"])
def test_pre_types_match_transformers(smollm2, tmp_path, pre):
    path = write_gguf(tmp_path / "model.gguf", cut_vocabulary(smollm2[0], pre))
    write_tokenizer_files(read_metadata(path), tmp_path / "out")
    assert_same_ids(tmp_path / "out", reference(path), [*TEXTS, "(x) 1234567 x1234"])


def test_pre_types_differ_where_their_regexes_do(smollm2):
    def encode(pre: str, text: str) -> list[int]:
        files = tokenizer_files(cut_vocabulary(smollm2[0], pre))
        return Tokenizer.from_str(json.dumps(files["tokenizer.json"])).encode(text).ids

    digits = [33, 34, 35, 36, 37, 38, 39]
    assert encode("llama-bpe", "1234567") == [8001, 8003, 39]  # "123", "456", "7"
    assert encode("qwen2", "1234567") == encode("tekken", "1234567") == digits
    # SmolLM's own rule (llama.cpp's and its tokenizer.json's): every digit apart, though
    # the merges could join them; transformers' GGUF loader has no such rule.
    assert encode("smollm", "1234567") == digits and encode("gpt-2", "1234567") != digits
    assert encode("llama-bpe", "(x")[0] == 8004 and encode("gpt-2", "(x")[0] != 8004


def test_default_pre_type_splits_as_llama_cpp(smollm2):
    """No pre type is llama.cpp's "default" (transformers has no counterpart): digit runs
    in threes from the left, punctuation runs apart from letters."""
    meta = {**smollm2[0]}
    meta.pop("tokenizer.ggml.pre")
    built = Tokenizer.from_str(json.dumps(tokenizer_files(meta)["tokenizer.json"]))
    pieces = [p for p, _ in built.pre_tokenizer.pre_tokenize_str("x 1234567 don't")]
    assert pieces == ["x", "Ġ", "123", "456", "7", "Ġdon", "'", "t"]


def test_add_bos_and_eos_flags(smollm2):
    meta = {
        **smollm2[0],
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": True,
    }
    files = tokenizer_files(meta)
    built = Tokenizer.from_str(json.dumps(files["tokenizer.json"]))
    assert built.encode("hi").ids[0] == 1 and built.encode("hi").ids[-1] == 2
    assert built.encode("hi", add_special_tokens=False).ids == [6004]
    assert files["tokenizer_config.json"]["add_bos_token"] is True
    # llama.cpp adds a BOS for Llama 3's pre type when the file does not say.
    meta = {**smollm2[0], "tokenizer.ggml.pre": "llama-bpe"}
    meta.pop("tokenizer.ggml.add_bos_token")
    assert tokenizer_files(meta)["tokenizer_config.json"]["add_bos_token"] is True


def sentencepiece_meta(architecture: str) -> dict:
    """A small SentencePiece vocabulary in llama.cpp's layout: no merges, scores rank them."""
    pieces = ["▁", "e", "h", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "llo", "▁hello",
              "▁w", "or", "▁wor", "ld", "▁world", "lo", "▁l", "▁▁"]  # fmt: skip
    tokens = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<tool>", "   "]
    types = [2, 3, 3, 3, 4, 4]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)] + pieces
    types += [6] * 256 + [1] * len(pieces)
    # Gemma's scores do not follow its merge order: make ours run backwards for it.
    sign = 1.0 if architecture.startswith("gemma") else -1.0
    scores = [0.0] * (len(tokens) - len(pieces)) + [sign * i for i in range(len(pieces))]
    return {
        "general.architecture": architecture,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_space_prefix": architecture == "llama",
    }


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_sentencepiece_matches_transformers(tmp_path, architecture):
    path = write_gguf(tmp_path / "spm.gguf", sentencepiece_meta(architecture))
    write_tokenizer_files(read_metadata(path), tmp_path / "out")
    texts = ["hello world", " hello  world", "hello   world", "héllo wörld 😀", "\n",
             "<start_of_turn>hello<tool> world</s>", "lol", ""]  # fmt: skip
    ref = reference(path)
    ours = assert_same_ids(tmp_path / "out", ref, texts)
    assert ours.encode("hello").ids[0] == 1  # llama.cpp adds BOS to SentencePiece by default
    assert ours.encode("héllo").ids[2:4] == [0xC3 + 6, 0xA9 + 6]  # é falls back to its bytes
    for text in texts:
        tokens = ours.encode(text).ids
        assert ours.decode(tokens, skip_special_tokens=False) == ref.decode(tokens), text
        # A leading space merges into the "▁" prefix that decoding strips (as in transformers).
        if "<" not in text and not text.startswith(" "):
            assert ours.decode(tokens, skip_special_tokens=True) == text


def test_errors_name_the_key(smollm2):
    meta = smollm2[0]
    cases = [
        ({"tokenizer.ggml.pre": "no-such-pre"}, "'no-such-pre'"),
        ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.merges": []}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.eos_token_id": 10**6}, "tokenizer.ggml.eos_token_id"),
        ({"tokenizer.ggml.token_type": [1]}, "tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.merges": ["a b c"]}, "'a b c'"),
    ]
    for change, named in cases:
        with pytest.raises(CheckpointError, match="model.gguf: .*" + named):
            tokenizer_files({**meta, **change}, source="model.gguf")
    doubled = {**meta, "tokenizer.ggml.tokens": [*meta["tokenizer.ggml.tokens"][:-1], "a"]}
    with pytest.raises(CheckpointError, match="'a' twice"):
        tokenizer_files(doubled)
    spm = sentencepiece_meta("llama")
    spm.pop("tokenizer.ggml.scores")
    with pytest.raises(CheckpointError, match="tokenizer.ggml.scores"):
        tokenizer_files(spm)
