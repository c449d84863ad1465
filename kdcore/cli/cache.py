"""``kd cache SPEC --output DIR``: write the spec's teachers' top-k caches."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kdcore.cache.format import DTYPES, verify_cache
from kdcore.cache.write import write_cache


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cache",
        help="run the teachers (or ask their servers) once and store their top-k log-probs "
        "(or --verify a cache)",
        description="Write an offline top-k teacher cache for SPEC's training data.",
    )
    p.add_argument(
        "spec", nargs="?", help="TOML or JSON spec whose [[teachers]] have path or server"
    )
    p.add_argument("--output", "-o", help="cache directory")
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="log-probs per position (default: 64 for a model, params.top_k for a server)",
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float16",
        help="storage of the log-probs (float32 for exact reference caches)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="capture temperature")
    p.add_argument("--shard-tokens", type=int, default=1 << 20, help="token positions per shard")
    p.add_argument("--batch-size", type=int, default=16, help="rows per teacher forward")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--verify", metavar="DIR", help="check every shard of an existing cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    if args.verify:
        report = verify_cache(args.verify)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for name, info in report.items():
                print(
                    f"{args.verify}/{name}: ok, {info['shards']} shards, {info['tokens']} tokens, "
                    f"{info['bytes'] / max(info['tokens'], 1):.1f} bytes/token (k={info['k']})"
                )
        return 0
    if not args.spec or not args.output:
        print("error: kd cache needs SPEC and --output DIR (or --verify DIR)", file=sys.stderr)
        return 2
    manifest = write_cache(
        args.spec,
        args.output,
        top_k=args.top_k,
        dtype=args.dtype,
        temperature=args.temperature,
        shard_tokens=args.shard_tokens,
        batch_size=args.batch_size,
        overrides=args.set,
    )
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        for entry in manifest["teachers"]:
            origin = entry.get("server") or entry["path"]
            print(f"{args.output}/{entry['dir']}: cache of {origin}")
    return 0
