"""``kd import SOURCE --output DIR``: a GGUF file (llama.cpp, Ollama, LM Studio) or a hub
name to a local mlx-lm folder that ``mlx_lm.load`` and every kdcore spec open; and back out,
``kd export STUDENT --gguf FILE``: a llama-family student to a GGUF file for those tools."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from kdcore.errors import CheckpointError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "import",
        help="a GGUF file (or a hub name) to an mlx-lm folder",
        description=(
            "Write the mlx-lm folder of SOURCE: a .gguf file (llama, mistral, qwen2, qwen3, "
            "gemma3) with its weights renamed and llama.cpp's fix-ups undone, tokenizer files "
            "rebuilt from its header, chat template and generation config; Q4_0/Q4_1/Q8_0 stay "
            "quantized unless --dtype is given, other types are dequantized. Or a hub name "
            "(owner/name), copied out of the Hugging Face cache."
        ),
    )
    p.add_argument("source", help="a .gguf file, or a hub name owner/name")
    p.add_argument("--output", "-o", required=True, help="the new folder (must not exist)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="dequantize every weight and store it in this dtype (default: keep MLX-native "
        "quantized weights, store other dequantized ones as float16)",
    )
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    source = Path(args.source)
    if source.suffix.lower() == ".gguf" or source.is_file():
        from kdcore.gguf.convert import import_gguf

        import_gguf(source, args.output, args.dtype, log=print)
        return 0
    from kdcore.models.mlxlm import locate_model

    folder = locate_model(args.source)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{args.source}: not a GGUF file nor a model folder or hub name")
    output = Path(args.output)
    if output.exists():
        raise CheckpointError(f"{output} exists: choose a new folder")
    if args.dtype is None:
        shutil.copytree(folder, output)
    else:
        from kdcore.models.mlxlm import MlxLmModel, load_mlxlm, save_mlxlm_student

        lm, config = load_mlxlm(folder, args.dtype, "--dtype")
        save_mlxlm_student(MlxLmModel(lm, config, folder), output)
    print(f"imported {args.source} -> {output}")
    return 0


def add_export_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="a student (mlx-lm folder) to a GGUF file for llama.cpp, Ollama, LM Studio",
        description=(
            "Write STUDENT (an mlx-lm folder, or a run folder with student/) as one GGUF file "
            "as llama.cpp's converter writes it: llama, mistral, qwen2 and qwen3 models with "
            "a byte-level BPE tokenizer; MLX-quantized weights are dequantized first. The file "
            "is written under a temporary name and renamed at the end."
        ),
    )
    p.add_argument("student", help="an mlx-lm model folder, or a kd distill run folder")
    p.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF file to write")
    p.add_argument(
        "--type",
        choices=["f16", "q8_0", "f32"],
        default="f16",
        help="matrices as float16 (default), Q8_0 or float32; 1-D tensors are always float32",
    )
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument(
        "--tokenizer-pre",
        metavar="NAME",
        help="llama.cpp's pre-tokenizer name (tokenizer.ggml.pre, e.g. llama-bpe, qwen2, "
        "smollm); default: the import record's, or recognised from a tokenizer.json kd import "
        "wrote",
    )
    p.add_argument("--license", help="general.license (default: the import record's)")
    p.add_argument("--name", help="general.name (default: the import record's, or the folder)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from kdcore.gguf.export import export_gguf

    export_gguf(
        args.student,
        args.gguf,
        args.type,
        force=args.force,
        tokenizer_pre=args.tokenizer_pre,
        license=args.license,
        name=args.name,
        log=print,
    )
    return 0
