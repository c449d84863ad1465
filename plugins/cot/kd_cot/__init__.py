"""kdcore plugin kd-cot: chain-of-thought and rationale distillation.

Components:

- datasets ``rationale`` (GSM8K or generic ``{question, rationale | program, answer}`` JSONL,
  rendered with templates, reasoning and answer masks) and ``gsm8k`` (the same, reading
  GSM8K files);
- losses ``cot`` (token KL on reasoning and answer positions, weighted apart, + CE) and
  ``step_by_step`` (Hsieh et al. 2023: label and rationale tasks, alpha-weighted);
- commands ``kd generate SPEC`` (sample, filter and write teacher rationales) and
  ``kd cot-eval MODEL DATA`` (greedy exact-match answer accuracy).
"""

from __future__ import annotations

import json

import kdcore
from kd_cot.dataset import Gsm8kConfig, RationaleConfig, RationaleDataset
from kd_cot.losses import CotConfig, StepByStepConfig, cot_loss, step_by_step_loss
from kdcore import app


@kdcore.hookimpl
def kd_losses():
    return [
        kdcore.Component(
            "cot",
            cot_loss,
            CotConfig,
            requires={"teacher", "reasoning_masks"},
            properties={"sparse_ok"},
            doc="T^2 (w_r KL on reasoning + w_a KL on answer tokens) + w_ce CE",
        ),
        kdcore.Component(
            "step_by_step",
            step_by_step_loss,
            StepByStepConfig,
            doc="distilling step-by-step: alpha CE(predict rows) + (1-alpha) CE(explain rows)",
        ),
    ]


@kdcore.hookimpl
def kd_datasets():
    return [
        kdcore.Component(
            "rationale",
            RationaleDataset,
            RationaleConfig,
            doc="question/rationale/answer records (GSM8K or JSONL) with reasoning+answer masks",
        ),
        kdcore.Component(
            "gsm8k",
            RationaleDataset,
            Gsm8kConfig,
            doc="GSM8K JSONL ('#### answer' lines) as rationale data with reasoning+answer masks",
        ),
    ]


def _cmd_generate(args) -> int:
    from kd_cot.generate import load_generate_spec, run_generate, summary_path

    spec = load_generate_spec(args.spec, args.set)
    summary = run_generate(spec, progress=not args.json)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "spec"}, indent=2))
        return 0
    print(f"{summary['questions']} questions, {summary['samples']} samples: kept {summary['kept']}")
    for reason, count in summary["dropped"].items():
        print(f"  dropped {count:6d}  {reason}")
    print(f"wrote {summary['output']} and {summary_path(spec.path(spec.output))}")
    return 0


def _cmd_eval(args) -> int:
    from kd_cot.generate import answer_accuracy
    from kd_cot.records import read_records
    from kd_cot.templates import get_template

    model, _, _ = app.load_model(args.model)
    tokenizer = app.load_tokenizer(args.model)
    records, rejected, _ = read_records(args.data, args.format, limit=args.max_records)
    template = get_template(args.template, args.step_format)
    result = answer_accuracy(
        model,
        tokenizer,
        [r.question for r in records],
        [r.answer for r in records],
        template,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    result["rejected"] = rejected
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"exact match {result['accuracy']:.4f} ({result['correct']}/{result['n']}; "
            f"{result['parsed']} answers parsed; {len(rejected)} records rejected)"
        )
    return 0


@kdcore.hookimpl
def kd_add_commands(subparsers):
    p = subparsers.add_parser(
        "generate", help="sample teacher rationales, filter them, write JSONL (kd-cot)"
    )
    p.add_argument("spec", help="a kd generate spec (TOML or JSON; see docs/cot.md)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set sampling.n=8",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_generate)

    p = subparsers.add_parser(
        "cot-eval", help="greedy exact-match answer accuracy of a model on rationale data (kd-cot)"
    )
    p.add_argument("model", help="a saved model directory (e.g. RUN/student)")
    p.add_argument("data", help="GSM8K or generic rationale JSONL with answers")
    p.add_argument("--template", default="step_by_step", help="template name or format string")
    p.add_argument("--step-format", default=None)
    p.add_argument("--format", default="auto", choices=["auto", "gsm8k", "generic"])
    p.add_argument("--max-records", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)
