"""kd generate: spec, the filters (one test per drop reason), sampling and decoding."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from kd_cot.generate import (
    GenerateSpec,
    Question,
    Sample,
    filter_samples,
    load_generate_spec,
    read_questions,
    sample_completions,
)
from kd_cot.templates import get_template

from kdcore import SpecError
from kdcore.app import ByteTokenizer, Transformer, TransformerConfig, generate

TEMPLATE = get_template("Q:{question}\n{rationale}\nA:{answer}\n")
TOK = ByteTokenizer()


def spec(**filters) -> GenerateSpec:
    agreement = filters.pop("agreement", "majority")
    n = filters.pop("n", 3)
    return load_generate_spec(
        {
            "teacher": "t",
            "input": "i.jsonl",
            "output": "o.jsonl",
            "sampling": {"n": n},
            "filters": {"agreement": agreement, **filters},
        }
    )


def run(completions: dict[str, list[str]], references=None, **filters) -> dict[str, list]:
    """Filter hand-written completions; returns question -> list of reasons (None = kept)."""
    s = spec(**filters)
    samples = []
    for line, (question, texts) in enumerate(completions.items(), start=1):
        ref = (references or {}).get(question)
        q = Question(line, question, ref)
        samples.extend(Sample(q, j, t) for j, t in enumerate(texts))
    filter_samples(samples, TEMPLATE, TOK, s)
    out: dict[str, list] = {}
    for x in samples:
        out.setdefault(x.question.text, []).append(x.reason)
    return out


GOOD = "1+2+0=3\nA:3\n"


def test_majority_vote_keeps_the_agreeing_samples():
    got = run({"1+2": [GOOD, "1+2+0=4\nA:4\n", "1+2+0=3 \nA:3\n"]}, dedupe=False)
    assert got["1+2"] == [None, "disagrees_with_majority", None]


def test_no_majority_drops_the_question():
    got = run({"1+2": [GOOD, "x\nA:4\n", "y\nA:5\n"]})
    assert got["1+2"] == ["no_majority"] * 3
    tie = run({"1+2": [GOOD, "x\nA:4\n"]}, n=2, min_agreement=0.5)
    assert tie["1+2"] == ["no_majority"] * 2  # a tie is no majority


def test_votes_compare_numbers_by_value():
    got = run({"q": ["a\nA:1,000\n", "b\nA:1000\n", "c\nA:999\n"]})
    assert got["q"] == [None, None, "disagrees_with_majority"]


def test_unparsed_and_length_bounds():
    got = run(
        {
            "q": [
                "1+2+0=3\nno answer line",  # cut short: unparsed
                "\nA:3\n",  # no steps
                "\n".join(["1+1+0=2"] * 2 + [f"{i}+0+0={i}" for i in range(9)]) + "\nA:3\n",
                "1+2+0=3\nA:3\n",
            ]
        },
        n=4,
        min_steps=1,
        max_steps=8,
        min_agreement=0.25,
    )
    assert got["q"] == ["unparsed", "too_few_steps", "too_many_steps", None]
    tokens = run(
        {"q": ["1\nA:3\n", "1+2+0=3\nA:3\n", "1+2+0=3+0+0+0+0=3\nA:3\n"]},
        min_tokens=3,
        max_tokens=10,
        min_agreement=0.3,
    )
    assert tokens["q"] == ["too_short", None, "too_long"]


def test_repetition_filter():
    loop = "\n".join(["7+9+0=16"] * 4) + "\nA:16\n"
    fine = "0+0+0=0\n0+0+0=0\n1+2+0=3\nA:300\n"  # one repeat in three steps is normal
    got = run(
        {"q": [loop, fine, fine.replace("1+2", "2+1")]},
        max_duplicate_step_fraction=0.5,
        min_agreement=0.3,
        agreement="none",
    )
    assert got["q"] == ["repetitive", None, None]


def test_duplicates_are_kept_once():
    got = run({"1+2": [GOOD, GOOD, GOOD]})
    assert got["1+2"] == [None, "duplicate", "duplicate"]
    assert run({"1+2": [GOOD, GOOD, GOOD]}, dedupe=False)["1+2"] == [None, None, None]


def test_reference_agreement():
    got = run(
        {"1+2": [GOOD, "z\nA:4\n"], "5+5": ["q\nA:10\n"]},
        references={"1+2": "3"},
        agreement="reference",
        n=2,
    )
    assert got["1+2"] == [None, "wrong_answer"]
    assert got["5+5"] == ["wrong_answer"]  # no reference to agree with


def test_program_of_thought_samples_are_checked_by_the_evaluator():
    s = spec(agreement="none", min_steps=0)
    s.program = True
    template = get_template("program")
    q = Question(1, "how many?", None)
    texts = ["(48 / 2) + 48\nAnswer: 72\n", "48 + 1\nAnswer: 72\n", "len('abc')\nAnswer: 3\n"]
    samples = [Sample(q, j, t) for j, t in enumerate(texts)]
    filter_samples(samples, template, TOK, s)
    assert [x.reason for x in samples] == [None, "program_mismatch", "program_rejected"]


def test_bad_calculator_annotations_are_dropped_when_asked():
    texts = ["a <<2*3=6>>6\nA:6\n", "a <<2*3=7>>7\nA:6\n"]
    got = run({"q": texts}, check_annotations=True, agreement="none", n=2, dedupe=False)
    assert got["q"] == [None, "bad_annotation"]


def test_spec_errors_are_all_reported():
    with pytest.raises(SpecError) as info:
        load_generate_spec(
            {
                "teacher": "t",
                "input": "i",
                "output": "o",
                "sampling": {"n": 0, "bogus": 1},
                "filters": {"agreement": "vibes"},
            }
        )
    text = str(info.value)
    assert "bogus" in text and "$.sampling" in text
    assert "agreement" in text
    with pytest.raises(SpecError, match="template"):
        load_generate_spec({"teacher": "t", "input": "i", "output": "o", "template": "nope"})


def test_read_questions_takes_gsm8k_and_plain_questions(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [
        {"question": "a?", "answer": "x\n#### 1,000"},
        {"question": "b?"},
        {"question": "c?", "answer": 7},
        {"prompt": "no question"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    questions, rejected = read_questions(path)
    assert [(q.text, q.reference) for q in questions] == [
        ("a?", "1,000"),
        ("b?", None),
        ("c?", "7"),
    ]
    assert [r["line"] for r in rejected] == [4]


def tiny_model(seed=0):
    mx.random.seed(seed)
    model = Transformer(TransformerConfig(vocab_size=256, dim=32, layers=2, heads=2, kv_heads=1))
    mx.eval(model.parameters())
    return model


def test_core_kv_cache_sampler_gives_the_full_recompute_tokens():
    model = tiny_model()
    prompt = mx.array(np.random.default_rng(0).integers(0, 256, (3, 5)).astype(np.int32))
    plain, _ = generate(model, prompt, 6, temperature=0.0, cache=False)
    cached, _ = generate(model, prompt, 6, temperature=0.0)
    np.testing.assert_array_equal(np.array(plain), np.array(cached))


def test_sample_completions_groups_prompts_and_is_reproducible():
    model = tiny_model(1)
    prompts = [TEMPLATE.prompt(q) for q in ["1+2", "10+20", "3+4"]]
    a = sample_completions(
        model, TOK, prompts, TEMPLATE, n=2, temperature=1.0, max_new_tokens=9, chunk=4, seed=5
    )
    b = sample_completions(
        model, TOK, prompts, TEMPLATE, n=2, temperature=1.0, max_new_tokens=9, chunk=4, seed=5
    )
    assert a == b
    assert [len(x) for x in a] == [2, 2, 2]
    # greedy completions equal a direct greedy generate of each prompt
    greedy = sample_completions(model, TOK, prompts, TEMPLATE, n=1, max_new_tokens=9, chunk=4)
    for prompt, (text,) in zip(prompts, greedy):
        ids = mx.array([TOK.encode(prompt)])
        tokens, _ = generate(model, ids, 9, temperature=0.0)
        assert TOK.decode(np.array(tokens[0, ids.shape[1] :]).tolist()) == text


def test_answers_with_thousands_of_digits_are_dropped_not_a_crash():
    """Voting once raised Python's bare 4,300-digit ValueError and lost every sample."""
    huge = "9" * 5000
    got = run({"q": [GOOD, f"1+2+0=3\nA:{huge}\n", GOOD.replace("1+2", "2+1")]}, n=3)
    assert got["q"] == [None, "answer_too_long", None]


def test_hostile_programs_are_rejected_quickly():
    import time

    s = spec(agreement="none", min_steps=0)
    s.program = True
    template = get_template("program")
    q = Question(1, "how many?", None)
    texts = ["((((1/3)**64)**64)**64)**64\nAnswer: 0\n", "(48 / 2) + 48\nAnswer: 72\n"]
    samples = [Sample(q, j, t) for j, t in enumerate(texts)]
    start = time.perf_counter()
    filter_samples(samples, template, TOK, s)
    assert time.perf_counter() - start < 2.0
    assert [x.reason for x in samples] == ["program_rejected", None]


def test_a_failing_sample_never_loses_the_others(monkeypatch):
    import kd_cot.generate as gen

    real = gen.duplicate_step_fraction

    def flaky(steps):
        if any("boom" in step.text for step in steps):
            raise RuntimeError("a check that breaks on one sample")
        return real(steps)

    monkeypatch.setattr(gen, "duplicate_step_fraction", flaky)
    s = spec(n=3, dedupe=False)
    q = Question(1, "1+2", None)
    samples = [Sample(q, j, t) for j, t in enumerate([GOOD, "boom\nA:3\n", "1+2+0=3 \nA:3\n"])]
    filter_samples(samples, TEMPLATE, TOK, s)
    assert [x.reason for x in samples] == [None, "check_failed", None]
    assert samples[1].error == "RuntimeError: a check that breaks on one sample"
    assert gen.check_errors(samples) == [
        {"line": 1, "sample": 1, "error": "RuntimeError: a check that breaks on one sample"}
    ]
