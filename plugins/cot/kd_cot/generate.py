"""``kd generate SPEC``: data distillation, sampling rationales from an MLX teacher.

The spec is its own TOML (or JSON) file, structured with ``app.read_config`` into
:class:`GenerateSpec` (unknown keys are errors, every problem reported at once)::

    teacher = "runs/teacher/student"   # a saved model directory (config.json, weights, tokenizer)
    input = "questions.jsonl"          # GSM8K or {question, ...} records; answers optional
    output = "rationales.jsonl"        # kept samples; rationales.summary.json beside it
    template = "step_by_step"          # the prompt is the template up to {rationale}
    seed = 0

    [sampling]
    n = 4                              # samples per question
    temperature = 0.7
    top_p = 0.95
    max_new_tokens = 256

    [filters]
    min_steps = 1
    max_steps = 64
    min_tokens = 1                     # rationale length bounds, in tokens
    max_tokens = 1024
    max_duplicate_step_fraction = 0.5  # repetition: share of steps that repeat an earlier one
    dedupe = true                      # identical (question, rationale) kept once
    agreement = "majority"             # "majority" | "reference" | "none"
    min_agreement = 0.5                # the majority answer's share of the n samples

Each sample is checked in this order and dropped with the first reason that applies:
``unparsed`` (does not follow the template), ``answer_too_long`` (a number of more than
``kd_cot.evaluator.MAX_DIGITS`` digits in the answer), ``too_few_steps`` / ``too_many_steps``,
``too_short`` / ``too_long``, ``repetitive``, ``program_rejected`` / ``program_mismatch``
(program-of-thought: the restricted evaluator refuses the program or its value is not the
answer), ``bad_annotation`` (``check_annotations``: a ``<<a*b=c>>`` that is wrong), then
``no_majority`` (no answer has a strict plurality of at least ``min_agreement`` of the n
votes), ``disagrees_with_majority``, or ``wrong_answer`` (agreement = "reference"), and
``duplicate``. Votes are the answers of the samples that parsed. A check that fails
unexpectedly drops that sample alone as ``check_failed``; its error is listed under
``check_errors`` in the summary, and the other samples are filtered and written as usual.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

import attrs
import mlx.core as mx
import numpy as np

from kd_cot.evaluator import (
    EvaluationError,
    check_annotations,
    check_digits,
    evaluate,
    normalize_answer,
    numbers_equal,
    parse_number,
)
from kd_cot.records import RecordError, Step, parse_gsm8k
from kd_cot.templates import Template, TemplateError, get_template
from kdcore import SpecError, validators
from kdcore.app import (
    atomic_path,
    generate,
    load_model,
    load_tokenizer,
    read_config,
    read_jsonl,
    to_plain,
    write_json,
)

# Read once, when sampling starts: a schedule is refused.
_unit = [validators.number, validators.unit_interval]


@attrs.define
class SamplingConfig:
    n: int = attrs.field(default=4, validator=validators.positive)
    temperature: float = 0.7
    top_p: float = attrs.field(default=0.95, validator=_unit)
    max_new_tokens: int = attrs.field(default=256, validator=validators.positive)
    batch_size: int = attrs.field(default=64, validator=validators.positive)
    # tokens between "done?" checks
    chunk: int = attrs.field(default=16, validator=validators.positive)


@attrs.define
class FilterConfig:
    min_steps: int = 1
    max_steps: int = 64
    min_tokens: int = 1
    max_tokens: int = 1024
    max_duplicate_step_fraction: float = attrs.field(default=0.5, validator=_unit)
    dedupe: bool = True
    agreement: Literal["majority", "reference", "none"] = "majority"
    min_agreement: float = attrs.field(default=0.5, validator=_unit)
    check_annotations: bool = False


@attrs.define
class GenerateSpec:
    teacher: str
    input: str
    output: str
    template: str = "step_by_step"
    step_format: str | None = None
    program: bool = False  # the rationale is an arithmetic program (program of thought)
    format: Literal["auto", "gsm8k", "generic"] = "auto"
    question_key: str = "question"
    answer_key: str = "answer"
    max_records: int | None = None
    seed: int = 0
    sampling: SamplingConfig = attrs.field(factory=SamplingConfig)
    filters: FilterConfig = attrs.field(factory=FilterConfig)
    base_dir: str = attrs.field(default=".", init=False, repr=False)

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


def load_generate_spec(source: str | Path | dict, overrides: list[str] | None = None):
    """Read and structure a ``kd generate`` spec; SpecError lists every problem."""
    if isinstance(source, dict):
        base, where = ".", "<spec>"
    else:
        base, where = str(Path(source).parent), str(source)
    spec = read_config(source, GenerateSpec, overrides)
    try:
        get_template(spec.template, spec.step_format)
    except TemplateError as exc:
        raise SpecError(f"{exc} @ $.template", source=where) from None
    spec.base_dir = base
    return spec


# ---------------------------------------------------------------- inputs


@attrs.frozen
class Question:
    line: int
    text: str
    reference: str | None  # the input's own answer, when it has one


def read_questions(
    path: Path,
    fmt: str = "auto",
    question_key: str = "question",
    answer_key: str = "answer",
    limit: int | None = None,
) -> tuple[list[Question], list[dict]]:
    """Questions (with their reference answers where the file has them) and rejected lines."""
    raw, rejected = read_jsonl(path, limit)
    out = []
    for line, record in raw:
        question = record.get(question_key)
        if not isinstance(question, str) or not question.strip():
            rejected.append({"line": line, "reason": f"no string field {question_key!r}"})
            continue
        reference = None
        answer = record.get(answer_key)
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            reference = str(answer)
        elif isinstance(answer, str):
            if fmt == "gsm8k" or (fmt == "auto" and "####" in answer):
                try:
                    reference = parse_gsm8k(record, line).answer
                except RecordError as exc:
                    rejected.append({"line": line, "reason": str(exc)})
                    continue
            else:
                reference = answer.strip() or None
        out.append(Question(line, question.strip(), reference))
    return out, rejected


# ---------------------------------------------------------------- sampling


def sample_completions(
    model,
    tokenizer,
    prompts: list[str],
    template: Template,
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    chunk: int = 16,
    seed: int = 0,
) -> list[list[str]]:
    """``n`` completions of each prompt (temperature 0: greedy), as text after the prompt.

    Prompts are grouped by token length (a batch holds no pads); each group is sampled
    with ``app.generate`` (KV-cached for the built-in and mlx-lm models), which asks
    after every ``chunk`` tokens whether every row holds a complete answer and stops then.
    """
    mx.random.seed(seed)
    encoded = [tokenizer.encode(p) for p in prompts]
    rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
    by_length: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i, j in rows:
        by_length[len(encoded[i])].append((i, j))
    out: list[list[str]] = [[""] * n for _ in prompts]

    def texts_of(tokens: mx.array, length: int) -> list[str]:
        return [tokenizer.decode(row.tolist()) for row in np.array(tokens[:, length:])]

    for length in sorted(by_length):
        group = by_length[length]
        for start in range(0, len(group), batch_size):
            part = group[start : start + batch_size]
            ids = mx.array(np.array([encoded[i] for i, _ in part], dtype=np.int32))
            tokens, _ = generate(
                model,
                ids,
                max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                until=lambda t, _m, at=length: all(map(template.is_complete, texts_of(t, at))),
                check_every=chunk,
            )
            texts = texts_of(tokens, length)
            for (i, j), text in zip(part, texts):
                out[i][j] = text
    return out


# ---------------------------------------------------------------- filters


@attrs.define
class Sample:
    question: Question
    index: int
    completion: str
    parsed: dict | None = None
    reason: str | None = None  # why it was dropped; None: kept
    error: str | None = None  # reason "check_failed": the exception the check raised

    @property
    def answer(self) -> str | None:
        return None if self.parsed is None else self.parsed["answer"]


def duplicate_step_fraction(steps: tuple[Step, ...]) -> float:
    """Share of steps that repeat an earlier step exactly (0 for one step or none)."""
    if len(steps) < 2:
        return 0.0
    seen, repeats = set(), 0
    for step in steps:
        key = (step.sub, step.text)
        repeats += key in seen
        seen.add(key)
    return repeats / len(steps)


def _check_sample(sample: Sample, template: Template, tokenizer, spec: GenerateSpec) -> str | None:
    f = spec.filters
    parsed = template.parse_completion(sample.completion)
    sample.parsed = parsed
    if parsed is None or parsed["answer"] is None:
        return "unparsed"
    try:
        check_digits(parsed["answer"])
    except EvaluationError:
        return "answer_too_long"
    rationale = parsed["rationale"] or ""
    steps = parsed["steps"] or ()
    if not spec.program:
        if len(steps) < f.min_steps:
            return "too_few_steps"
        if len(steps) > f.max_steps:
            return "too_many_steps"
    length = len(tokenizer.encode(rationale))
    if length < f.min_tokens:
        return "too_short"
    if length > f.max_tokens:
        return "too_long"
    if duplicate_step_fraction(steps) > f.max_duplicate_step_fraction:
        return "repetitive"
    if spec.program:
        try:
            value = evaluate(rationale.strip())
        except EvaluationError:
            return "program_rejected"
        if not numbers_equal(value, parse_number(parsed["answer"])):
            return "program_mismatch"
    if f.check_annotations:
        counts = check_annotations(rationale)
        if counts["wrong"] or counts["unsafe"]:
            return "bad_annotation"
    return None


def filter_samples(samples: list[Sample], template: Template, tokenizer, spec: GenerateSpec):
    """Set ``reason`` on every dropped sample (see the module doc for the order)."""
    f = spec.filters
    n = spec.sampling.n
    by_question: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        try:
            sample.reason = _check_sample(sample, template, tokenizer, spec)
        except Exception as exc:  # one sample's failure must never lose the others
            sample.reason = "check_failed"
            sample.error = f"{type(exc).__name__}: {exc}"
        by_question[sample.question.line].append(sample)
    for group in by_question.values():
        votes = Counter(normalize_answer(s.answer) for s in group if s.answer is not None)
        ranked = votes.most_common()
        majority = None
        if ranked:
            top, count = ranked[0]
            unique = len(ranked) == 1 or ranked[1][1] < count
            if unique and count / n >= f.min_agreement:
                majority = top
        for s in group:
            if s.reason is not None:
                continue
            if f.agreement == "majority":
                if majority is None:
                    s.reason = "no_majority"
                elif normalize_answer(s.answer) != majority:
                    s.reason = "disagrees_with_majority"
            elif f.agreement == "reference":
                ref = s.question.reference
                if ref is None or normalize_answer(s.answer) != normalize_answer(ref):
                    s.reason = "wrong_answer"
    if f.dedupe:
        seen = set()
        for s in samples:
            if s.reason is None:
                key = (s.question.text, s.parsed["rationale"].strip())
                if key in seen:
                    s.reason = "duplicate"
                seen.add(key)
    return samples


def check_errors(samples: list[Sample], limit: int = 20) -> list[dict]:
    """The first ``limit`` samples dropped as ``check_failed``, with their errors."""
    failed = [s for s in samples if s.reason == "check_failed"]
    return [{"line": s.question.line, "sample": s.index, "error": s.error} for s in failed[:limit]]


def kept_record(sample: Sample, program: bool) -> dict:
    parsed = sample.parsed
    out = {"question": sample.question.text, "answer": parsed["answer"]}
    if program:
        out["program"] = parsed["rationale"].strip()
    else:
        out["rationale"] = [
            s.text if s.sub is None else f"{s.sub} ** {s.text}" for s in parsed["steps"]
        ]
    out["source_line"] = sample.question.line
    out["sample"] = sample.index
    return out


def run_generate(spec: GenerateSpec, progress: bool = True) -> dict:
    """Sample, filter and write; returns the summary (also written beside the output)."""
    started = time.perf_counter()
    template = get_template(spec.template, spec.step_format)
    if not template.has_answer:
        raise SpecError(f"template {spec.template!r} has no {{answer}} to parse @ $.template")
    model, _, _ = load_model(spec.path(spec.teacher))
    model.eval()
    tokenizer = load_tokenizer(spec.path(spec.teacher))
    questions, rejected = read_questions(
        spec.path(spec.input), spec.format, spec.question_key, spec.answer_key, spec.max_records
    )
    s = spec.sampling
    samples: list[Sample] = []
    batch_questions = max(1, s.batch_size // s.n) * 8
    for start in range(0, len(questions), batch_questions):
        part = questions[start : start + batch_questions]
        completions = sample_completions(
            model,
            tokenizer,
            [template.prompt(q.text) for q in part],
            template,
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            max_new_tokens=s.max_new_tokens,
            batch_size=s.batch_size,
            chunk=s.chunk,
            seed=spec.seed + start,
        )
        for q, texts in zip(part, completions):
            samples.extend(Sample(q, j, t) for j, t in enumerate(texts))
        if progress:
            done = min(start + batch_questions, len(questions))
            print(f"\rgenerate: {done}/{len(questions)} questions", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    filter_samples(samples, template, tokenizer, spec)
    output = spec.path(spec.output)
    kept = [x for x in samples if x.reason is None]
    with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for sample in kept:
            handle.write(json.dumps(kept_record(sample, spec.program)) + "\n")
    dropped = Counter(x.reason for x in samples if x.reason is not None)
    summary = {
        "input": str(spec.path(spec.input)),
        "output": str(output),
        "teacher": str(spec.path(spec.teacher)),
        "questions": len(questions),
        "input_rejected": rejected,
        "samples": len(samples),
        "kept": len(kept),
        "dropped": dict(sorted(dropped.items())),
        "check_errors": check_errors(samples),
        "questions_with_kept_samples": len({x.question.line for x in kept}),
        "seconds": round(time.perf_counter() - started, 2),
        "spec": to_plain(spec),
    }
    with_reference = [x for x in kept if x.question.reference is not None]
    if with_reference:
        right = sum(
            normalize_answer(x.answer) == normalize_answer(x.question.reference)
            for x in with_reference
        )
        summary["kept_matching_reference"] = right / len(with_reference)
    write_json(summary_path(output), summary)
    return summary


def summary_path(output: Path) -> Path:
    return output.with_name(output.stem + ".summary.json")


# ---------------------------------------------------------------- exact-match accuracy


def answer_accuracy(
    model,
    tokenizer,
    questions: list[str],
    answers: list[str],
    template: Template,
    max_new_tokens: int = 256,
    batch_size: int = 256,
) -> dict:
    """Greedy-decoded exact-match accuracy: the parsed answer equals the reference
    (numbers compared by value, so "1,000" matches "1000")."""
    completions = sample_completions(
        model,
        tokenizer,
        [template.prompt(q) for q in questions],
        template,
        n=1,
        temperature=0.0,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    correct, parsed = 0, 0
    examples = []
    for q, ref, (text,) in zip(questions, answers, completions):
        got = template.parse_completion(text)
        answer = None if got is None else got["answer"]
        parsed += answer is not None
        ok = answer is not None and normalize_answer(answer) == normalize_answer(ref)
        correct += ok
        if len(examples) < 5:
            examples.append({"question": q, "reference": ref, "completion": text, "ok": ok})
    total = max(1, len(questions))
    return {
        "accuracy": correct / total,
        "correct": correct,
        "parsed": parsed,
        "n": len(questions),
        "examples": examples,
    }
