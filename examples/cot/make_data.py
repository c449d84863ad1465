"""Write the synthetic arithmetic task: train, held-out test and one-digit-longer test sets.

    python examples/cot/make_data.py examples/cot/out/data [--base 5] [--digits 1,2,3]

Also writes task.json (the settings) beside the data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kd_cot.synthetic import make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", type=int, default=5)
    parser.add_argument("--digits", default="1,2,3", help="digit counts in training")
    args = parser.parse_args()
    digits = tuple(int(d) for d in args.digits.split(","))
    paths = make_task(
        args.out_dir,
        seed=args.seed,
        train=args.train,
        test=args.test,
        digits=digits,
        base=args.base,
    )
    settings = {
        "base": args.base,
        "train_digits": list(digits),
        "seed": args.seed,
        "train": args.train,
        "test": args.test,
    }
    (Path(args.out_dir) / "task.json").write_text(json.dumps(settings, indent=2) + "\n")
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
