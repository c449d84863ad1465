"""Generation speed: kdcore's KV-cache sampler against its full recompute, and against
mlx-lm's own ``stream_generate`` on the same mlx-lm model.

Batch 1, greedy, a 64-token prompt and 256 new tokens. Tokens per second are new tokens
over the wall time of the whole call (prompt included, the same for every variant); each
figure is the median of ``--rounds`` interleaved runs after one untimed run of each. The mlx-lm
model is a small random Qwen3 written offline (``create_mlxlm_dir``); kdcore's sampler
runs on the very weights ``mlx_lm.load`` returns. Targets: KV-cache >= 5x the full
recompute on the bundled teacher, and >= 0.8x ``mlx_lm`` on the Qwen3 model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from kdcore.models.io import count_parameters, load_model
from kdcore.models.mlxlm import MlxLmModel, create_mlxlm_dir
from kdcore.models.sampling import generate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shakespeare"
QWEN3 = {
    "model_type": "qwen3",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "intermediate_size": 768,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "vocab_size": 256,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


def timed(run: Callable[[], int]) -> float:
    """New tokens per second of one call of ``run`` (which returns how many it made)."""
    start = time.perf_counter()
    made = run()
    return made / (time.perf_counter() - start)


def ours(model, prompt: mx.array, new: int, cache: bool) -> Callable[[], int]:
    def run() -> int:
        tokens, mask = generate(model, prompt, new, temperature=0.0, cache=cache)
        mx.eval(tokens, mask)
        return int(mask.sum().item())

    return run


def mlx_lm_run(lm, tokenizer, prompt: list[int], new: int) -> Callable[[], int]:
    from mlx_lm import stream_generate

    def run() -> int:
        responses = stream_generate(lm, tokenizer, prompt, max_tokens=new)
        return max(r.generation_tokens for r in responses)

    return run


def mlx_lm_tokens(lm, tokenizer, prompt: list[int], new: int) -> list[int]:
    from mlx_lm import stream_generate

    return [r.token for r in stream_generate(lm, tokenizer, prompt, max_tokens=new)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    new, rounds = args.new_tokens, args.rounds
    text = (EXAMPLE / "data" / "tinyshakespeare.txt").read_bytes()[: args.prompt_tokens]
    prompt_ids = list(text)  # the bundled models read bytes

    teacher, _, _ = load_model(EXAMPLE / "teacher")
    teacher.eval()
    prompt = mx.array([prompt_ids], dtype=mx.int32)
    greedy = [generate(teacher, prompt, new, temperature=0.0, cache=c)[0] for c in (True, False)]

    from mlx_lm import load as mlx_lm_load

    with tempfile.TemporaryDirectory() as tmp:
        folder = create_mlxlm_dir(Path(tmp) / "qwen3", QWEN3, seed=0)
        lm, tokenizer = mlx_lm_load(str(folder))
    ours_lm = MlxLmModel(lm, QWEN3)
    # the same greedy tokens from both samplers on the same weights
    mine = generate(ours_lm, prompt, new, temperature=0.0)[0][0, len(prompt_ids) :].tolist()
    same_as_mlx_lm = mine == mlx_lm_tokens(lm, tokenizer, prompt_ids, new)

    variants = {
        "kv": ours(teacher, prompt, new, True),
        "no_cache": ours(teacher, prompt, new, False),
        "kv_mlxlm": ours(ours_lm, prompt, new, True),
        "mlx_lm": mlx_lm_run(lm, tokenizer, prompt_ids, new),
    }
    # (the token checks above were every variant's warm-up run)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved so drifts in machine load hit every variant
        for name, run in variants.items():
            rates[name].append(timed(run))
    kv, no_cache, kv_mlxlm, mlx_lm = rates.values()
    med = statistics.median
    result = {
        "new_tokens": new,
        "prompt_tokens": len(prompt_ids),
        "batch": 1,
        "rounds": rounds,
        "teacher_parameters": count_parameters(teacher),
        "mlx_lm_model": {**QWEN3, "parameters": count_parameters(ours_lm)},
        "kv_tokens_per_s": med(kv),
        "no_cache_tokens_per_s": med(no_cache),
        "kv_mlxlm_tokens_per_s": med(kv_mlxlm),
        "mlx_lm_tokens_per_s": med(mlx_lm),
        "kv_over_no_cache": med(kv) / med(no_cache),
        "kv_over_mlx_lm": med(kv_mlxlm) / med(mlx_lm),
        "same_tokens": {
            "kv_vs_no_cache": bool(mx.array_equal(*greedy)),
            "kv_vs_mlx_lm": same_as_mlx_lm,
        },
    }
    result["targets"] = {
        "kv_at_least_5x_no_cache": result["kv_over_no_cache"] >= 5.0,
        "kv_at_least_0.8x_mlx_lm": result["kv_over_mlx_lm"] >= 0.8,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
