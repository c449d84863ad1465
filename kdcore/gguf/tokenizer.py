"""Hugging Face tokenizer files rebuilt from a GGUF file's metadata.

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary, merges, scores,
token types and special ids under ``tokenizer.*`` keys, and names its pre-tokenizer
(``tokenizer.ggml.pre``) rather than spelling it out. We rebuild the tokenizer with the
``tokenizers`` library, so that an imported model folder loads with ``AutoTokenizer`` and
mlx-lm alone:

- ``gpt2``: byte-level BPE (SmolLM2, Llama 3, Qwen2/3...); the split regexes are llama.cpp's
  (``src/llama-vocab.cpp``), in the original ``tokenizer.json`` spelling it quotes.
- ``llama``: SentencePiece BPE with byte fallback (Llama 2, Mistral 7B, Gemma); the merges,
  which these files do not store, are recovered from the vocabulary the way transformers'
  GGUF integration does (``transformers/integrations/gguf/gguf_tokenizer_mapping.py``).

transformers' own ``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` is the reference
the tests compare token ids with."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdcore.errors import CheckpointError

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (gguf.TokenType)
SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    + CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    + CONTRACTIONS
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "lfm2")

# pre type -> the regexes llama.cpp splits with, one after the other (each splits the pieces
# the previous one left, keeping what it does not match), and whether whole-word vocabulary
# hits skip the merges (llama.cpp's ``ignore_merges``; Llama 3's tokenizer.json says so too).
_FAMILIES: list[tuple[tuple[str, ...], tuple[str, ...], bool]] = [
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    (("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), (GPT2,), False),
    (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        (r"\p{N}", GPT2),
        False,
    ),
    (LLAMA3_NAMES, (LLAMA3,), True),
    (("dbrx", "smaug-bpe"), (LLAMA3,), False),
    (("qwen2", "deepseek-r1-qwen", "kormo", "stablelm2", "megrez"), (QWEN2,), False),
    (("tekken",), (TEKKEN,), True),
    (("gpt-4o", "llama4"), (GPT4O,), False),
]
PRE_TYPES = {name: (splits, ignore) for names, splits, ignore in _FAMILIES for name in names}
# llama.cpp adds a BOS for these when the file does not say (``tokenizer.ggml.add_bos_token``).
BOS_BY_DEFAULT = {*LLAMA3_NAMES, "tekken"}


def tokenizer_files(meta: Mapping[str, Any], *, source: str = "GGUF metadata") -> dict[str, Any]:
    """``{file name: JSON content}`` for tokenizer.json, tokenizer_config.json and
    special_tokens_map.json, from a GGUF file's metadata (``kdcore.gguf.read.read_metadata``).
    ``source`` (the file's name) starts every error message."""
    from tokenizers import Tokenizer, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = list(_required(meta, "tokenizer.ggml.tokens", source))
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise CheckpointError(
            f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )
    seen: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if token in seen:  # one string, two ids: no tokenizer.json vocabulary can say that
            raise CheckpointError(
                f"{source}: tokenizer.ggml.tokens holds {token!r} twice (ids {seen[token]} "
                f"and {index})"
            )
        seen[token] = index
    special = {name: _token(meta, key, tokens, source) for name, key in SPECIAL_IDS.items()}

    if kind == "gpt2":
        tokenizer = _byte_level(meta, tokens, source)
        bos_default = meta.get("tokenizer.ggml.pre") in BOS_BY_DEFAULT
    elif kind == "llama":
        tokenizer, tokens = _sentencepiece(meta, tokens, special["unk_token"], source)
        bos_default = True  # llama.cpp's default for a SentencePiece vocabulary
    else:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.model is {kind!r}; kdcore builds tokenizers for "
            "'gpt2' (byte-level BPE) and 'llama' (SentencePiece) only"
        )
    _add_tokens(tokenizer, tokens, types, special)

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if flag and special[name] is None:
            raise CheckpointError(f"{source}: the file asks to add a {name} but names none")
    # The same template transformers writes for add_bos_token / add_eos_token, so that the
    # tokenizer.json alone and AutoTokenizer (which reads the flags) agree.
    bos = [special["bos_token"]] if add_bos else []
    eos = [special["eos_token"]] if add_eos else []
    single = " ".join([f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos])
    pair = single + " " + " ".join([f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tokens.index(t)) for t in bos + eos]
    )

    named = {name: token for name, token in special.items() if token is not None}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    if isinstance(context, int):
        config["model_max_length"] = context
    template = _chat_template(meta)
    if template is not None:
        config["chat_template"] = template
    return {
        "tokenizer.json": json.loads(Tokenizer.to_str(tokenizer)),
        "tokenizer_config.json": config,
        "special_tokens_map.json": named,
    }


def write_tokenizer_files(
    meta: Mapping[str, Any], folder: str | Path, *, source: str = "GGUF metadata"
) -> list[Path]:
    """Write ``tokenizer_files(meta)`` into ``folder``; the paths written."""
    from kdcore.io import write_json

    written = []
    for name, content in tokenizer_files(meta, source=source).items():
        write_json(Path(folder) / name, content)
        written.append(Path(folder) / name)
    return written


def _required(meta: Mapping[str, Any], key: str, source: str) -> Sequence[Any]:
    value = meta.get(key)
    if not value:
        raise CheckpointError(f"{source}: no {key} in the metadata: the file has no tokenizer")
    return value


def _token(meta: Mapping[str, Any], key: str, tokens: list[str], source: str) -> str | None:
    index = meta.get(key)
    if index is None:
        return None
    if not 0 <= index < len(tokens):
        raise CheckpointError(f"{source}: {key} = {index} is past the {len(tokens)} tokens")
    return tokens[index]


def _byte_level(meta: Mapping[str, Any], tokens: list[str], source: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre") or "default"  # llama.cpp's reading of no pre type
    if pre not in PRE_TYPES:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer kdcore does not know; "
            f"known: {', '.join(sorted(PRE_TYPES))}"
        )
    splits, ignore_merges = PRE_TYPES[pre]
    merges = []
    for line in _required(meta, "tokenizer.ggml.merges", source):
        pieces = line.split(" ")
        if len(pieces) != 2:  # byte-level tokens spell a space as "Ġ": one space per merge
            raise CheckpointError(f"{source}: tokenizer.ggml.merges entry {line!r} is not 'a b'")
        merges.append(tuple(pieces))
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(meta: Mapping[str, Any], tokens: list[str], unk: str | None, source: str):
    """A BPE with byte fallback, as transformers builds LlamaTokenizer / GemmaTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    gemma = str(meta.get("general.architecture", "")).startswith("gemma")
    if gemma:
        # Gemma stores its runs of spaces as real spaces, but text reaches the model with
        # spaces spelled "▁": respell them (where that spelling is free) or no merge makes them.
        present = set(tokens)
        tokens = [
            "▁" * len(t) if t and not t.strip(" ") and "▁" * len(t) not in present else t
            for t in tokens
        ]
    vocab = {token: index for index, token in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(line.split(" ", 1)) for line in meta["tokenizer.ggml.merges"]]
    else:
        # Gemma's scores do not follow its merge order, its token order does (transformers'
        # finding); elsewhere a token's score ranks the merge that makes it.
        if gemma:
            rank = [-float(index) for index in range(len(tokens))]
        else:
            rank = [float(s) for s in _required(meta, "tokenizer.ggml.scores", source)]
        merges = _merges_from_vocab(vocab, rank)
    tokenizer = Tokenizer(
        models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's default
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(
        steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else [])
    )
    return tokenizer, tokens


def _merges_from_vocab(vocab: dict[str, int], rank: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, best rank first; ties by the
    pieces' lengths, then vocabulary order (transformers' ``generate_merges``, exactly, so
    that both pick the same merge where two apply)."""
    found = []
    for token, score in zip(vocab, rank):
        local = [
            (token[:cut], token[cut:], score)
            for cut in range(1, len(token))
            if token[:cut] in vocab and token[cut:] in vocab
        ]
        found.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _add_tokens(tokenizer, tokens: list[str], types: list[int], special: dict) -> None:
    """Control tokens (and the named special ones) become special added tokens, user-defined
    ones plain added tokens: both are matched whole in raw text, as llama.cpp does, instead
    of being cut into pieces by the model."""
    from tokenizers import AddedToken

    named = {token for token in special.values() if token is not None}
    control = [t for t, kind in zip(tokens, types) if kind == CONTROL or t in named]
    user = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED and t not in named]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _chat_template(meta: Mapping[str, Any]) -> str | list[dict[str, str]] | None:
    """``tokenizer.chat_template``; with named ones (``tokenizer.chat_template.NAME``) the
    list form transformers reads, the unnamed one as "default"."""
    main = meta.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    named = {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix)}
    if not named:
        return main
    templates = [{"name": "default", "template": main}] if main is not None else []
    return templates + [{"name": name, "template": text} for name, text in named.items()]
