"""Greedy exact-match answer accuracy of the teacher and the four students; JSON + Markdown.

    python examples/cot/evaluate.py examples/cot/out

Each model answers with the prompt of the format it was trained on: the CoT format writes
the column steps before "A:", the answer-only format answers right after "A:", the
step-by-step student uses its "predict:" row (no rationale at test time, as in Hsieh et al.).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kd_cot.generate import answer_accuracy
from kd_cot.records import read_records
from kd_cot.templates import get_template

from kdcore.app import count_parameters, load_model, load_tokenizer

COT = "Q:{question}\n{rationale}\nA:{answer}\n"
ANSWER = "Q:{question}\nA:{answer}\n"

# (row label, run folder, template, what it was trained with)
MODELS = [
    ("teacher (CoT)", "teacher", COT, "CE on reference rationales + answer rows"),
    ("teacher (answer only)", "teacher", ANSWER, "same model, answer-only prompt"),
    ("(a) answer only, CE", "answer_ce", ANSWER, "CE on reference answers"),
    ("(b) answer only, hinton", "answer_hinton", ANSWER, "hinton (T=2) + CE on answers"),
    ("(c) cot", "cot", COT, "cot loss on teacher rationales"),
    ("(d) step_by_step", "step_by_step", "predict", "predict/explain rows, alpha 0.5"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--max-new-tokens", type=int, default=72)
    args = parser.parse_args()
    out = Path(args.out_dir)
    sets = {}
    for name in ("test", "longer"):
        records, rejected, _ = read_records(out / "data" / f"{name}.jsonl")
        assert not rejected, rejected
        sets[name] = records
    rows = []
    for label, folder, template_spec, how in MODELS:
        model_dir = out / folder / "student"
        model, _, _ = load_model(model_dir)
        tokenizer = load_tokenizer(model_dir)
        template = get_template(template_spec)
        row = {
            "model": label,
            "run": folder,
            "trained_with": how,
            "parameters": count_parameters(model),
            "template": template_spec,
        }
        summary = json.loads((out / folder / "summary.json").read_text())
        row["train_steps"] = summary["steps"]
        row["train_seconds"] = round(summary["wall_seconds"], 1)
        for name, records in sets.items():
            result = answer_accuracy(
                model,
                tokenizer,
                [r.question for r in records],
                [r.answer for r in records],
                template,
                max_new_tokens=args.max_new_tokens,
            )
            row[f"{name}_accuracy"] = result["accuracy"]
            row[f"{name}_examples"] = result["examples"][:2]
        rows.append(row)
        print(
            f"{label:28s} held-out {row['test_accuracy']:.3f}  "
            f"one more digit {row['longer_accuracy']:.3f}",
            file=sys.stderr,
        )
    digits = {name: max(len(r.steps) for r in records) for name, records in sets.items()}
    task = json.loads((out / "data" / "task.json").read_text())
    generation = json.loads((out / "generated.summary.json").read_text())
    generation.pop("spec", None)
    report = {
        "task": task,
        "digits": digits,
        "test_problems": len(sets["test"]),
        "longer_problems": len(sets["longer"]),
        "generation": generation,
        "models": rows,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"| model | parameters | trained with | held-out ({digits['test']} digits) "
        f"| one more digit ({digits['longer']}) |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['parameters']:,} | {row['trained_with']} | "
            f"{row['test_accuracy']:.3f} | {row['longer_accuracy']:.3f} |"
        )
    per_question = generation["samples"] // max(1, generation["questions"])
    dropped = ", ".join(f"{k} {v}" for k, v in generation["dropped"].items()) or "none"
    lines += [
        "",
        f"Exact-match answer accuracy, greedy decoding, {len(sets['test'])} held-out problems "
        f"and {len(sets['longer'])} problems with one more digit than any in training; "
        f"numbers in base {task['base']}, training problems of {task['train_digits']} digits.",
        f"kd generate: {generation['questions']} questions x {per_question} samples, "
        f"kept {generation['kept']} (dropped: {dropped}).",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
