"""How much of the HH harmless preference a bag of words can predict, for scale.

    python examples/preference/baseline.py [DATA_DIR]

Reads split.py's ``train.jsonl.gz``, ``tune.jsonl.gz`` and ``heldout.jsonl.gz`` (default
``out/data``). Prints the response lengths, then the accuracy of a logistic regression on
the difference of the two responses' word unigram and bigram frequencies (features seen at
least 3 times in the training pairs; L2 penalty chosen on the tune split), trained on the
training pairs (each pair also flipped, so that it cannot learn a bias). Whole responses,
no model of the project: a reference point for what the teachers' margins could reach.
"""

from __future__ import annotations

import collections
import gzip
import json
import sys
from pathlib import Path

import numpy as np

MARKER = "\n\nAssistant:"


def responses(path: Path) -> list[tuple[str, str]]:
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            chosen, rejected = (
                record[k][record[k].rfind(MARKER) + len(MARKER) :] for k in ("chosen", "rejected")
            )
            pairs.append((chosen.lower(), rejected.lower()))
    return pairs


def ngrams(text: str) -> collections.Counter:
    words = text.split()
    return collections.Counter(words + [" ".join(words[i : i + 2]) for i in range(len(words) - 1)])


def features(pairs: list[tuple[str, str]], index: dict[str, int]) -> np.ndarray:
    def frequencies(text: str) -> np.ndarray:
        counts, row = ngrams(text), np.zeros(len(index))
        total = max(sum(counts.values()), 1)
        for gram, count in counts.items():
            if gram in index:
                row[index[gram]] += count / total
        return row

    return np.array([frequencies(c) - frequencies(r) for c, r in pairs])


def fit(x: np.ndarray, penalty: float, steps: int = 2000, lr: float = 2.0) -> np.ndarray:
    both = np.concatenate([x, -x])
    target = np.concatenate([np.ones(len(x)), np.zeros(len(x))])
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(both @ w, -30, 30)))
        w -= lr * (both.T @ (p - target) / len(both) + penalty * w)
    return w


def main(data: Path) -> None:
    splits = {name: responses(data / f"{name}.jsonl.gz") for name in ("train", "tune", "heldout")}
    for name, pairs in splits.items():
        chosen, rejected = (np.array([len(p[i]) for p in pairs]) for i in (0, 1))
        print(
            f"{name}: {len(pairs)} pairs, median response {np.median(chosen):.0f} bytes chosen, "
            f"{np.median(rejected):.0f} rejected; "
            f"chosen shorter in {np.mean(chosen < rejected):.3f}"
        )
    seen = collections.Counter()
    for c, r in splits["train"]:
        seen.update(set(ngrams(c)) | set(ngrams(r)))
    index = {g: i for i, g in enumerate(g for g, n in seen.items() if n >= 3)}
    x = {name: features(pairs, index) for name, pairs in splits.items()}
    scores = {}
    for penalty in (1e-3, 1e-2, 1e-1):
        w = fit(x["train"], penalty)
        scores[penalty] = (float(np.mean(x["tune"] @ w > 0)), w)
    penalty = max(scores, key=lambda k: scores[k][0])
    tune_accuracy, w = scores[penalty]
    heldout = x["heldout"] @ w > 0
    print(
        f"bag of words ({len(index)} features, L2 {penalty:g}): tune {tune_accuracy:.3f}, "
        f"held-out {heldout.mean():.3f} ({int(heldout.sum())}/{len(heldout)})"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "out" / "data")
