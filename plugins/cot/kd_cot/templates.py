"""Templates: how a rationale record becomes training text, and how a completion is read back.

A template is a format string over ``{question}``, ``{rationale}`` and ``{answer}`` (``{{`` and
``}}`` for literal braces) plus a step format over ``{n}`` (1-based step number), ``{step}``
and ``{sub}`` (the socratic sub-question). Everything before the first ``{rationale}`` or
``{answer}`` is the prompt (no loss); the rest carries loss. Each token of the rendered text
gets a role:

- ``prompt``: the question and the text around it, up to the first answer-side field;
- ``answer``: exactly the characters of the answer (the answer mask decodes to it);
- ``reasoning``: every other loss-carrying token, i.e. the rationale and the template's
  connecting text ("The answer is", the closing newline).

Named templates: ``step_by_step``, ``structured``, ``socratic``, ``answer`` (answer only),
``program`` (program of thought), ``predict`` and ``explain`` (the two task rows of
distilling step-by-step, Hsieh et al. 2023).
"""

from __future__ import annotations

import functools
import re
import string

import attrs

from kd_cot.records import RationaleRecord, Step

FIELDS = ("question", "rationale", "answer")
ROLES = ("prompt", "reasoning", "answer")


class TemplateError(ValueError):
    """A template string that cannot be used."""


@attrs.frozen
class Template:
    name: str
    text: str
    step: str = "{step}"
    step_without_sub: str | None = None  # for steps that have no sub-question

    def __attrs_post_init__(self) -> None:
        pieces = _pieces(self.text)
        fields = [f for _, f in pieces if f is not None]
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise TemplateError(
                f"template {self.name!r}: unknown field(s) {unknown}; use {{question}}, "
                "{rationale} and {answer}"
            )
        if "question" not in fields:
            raise TemplateError(f"template {self.name!r} has no {{question}}")
        if not ({"rationale", "answer"} & set(fields)):
            raise TemplateError(f"template {self.name!r} needs {{rationale}} or {{answer}}")
        for field in FIELDS:
            if fields.count(field) > 1:
                raise TemplateError(f"template {self.name!r} uses {{{field}}} twice")
        first_target = min(fields.index(f) for f in ("rationale", "answer") if f in fields)
        if fields.index("question") > first_target:
            raise TemplateError(f"template {self.name!r}: {{question}} must come first")
        for fmt in (self.step, self.step_without_sub):
            if fmt is not None:
                bad = {f for _, f in _pieces(fmt) if f is not None} - {"n", "step", "sub"}
                if bad:
                    raise TemplateError(f"step format {fmt!r}: unknown field(s) {sorted(bad)}")

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for _, f in _pieces(self.text) if f is not None)

    @property
    def has_answer(self) -> bool:
        return "answer" in self.fields

    @property
    def has_rationale(self) -> bool:
        return "rationale" in self.fields

    def render_steps(self, steps: tuple[Step, ...]) -> str:
        out = []
        for n, step in enumerate(steps, start=1):
            fmt = self.step
            if step.sub is None and self.step_without_sub is not None:
                fmt = self.step_without_sub
            out.append(fmt.format(n=n, step=step.text, sub=step.sub or ""))
        return "\n".join(out)

    def segments(self, record: RationaleRecord) -> list[tuple[str, str]]:
        """(text, role) pieces of the rendered record, in order; roles from ``ROLES``."""
        rationale = (
            record.program if record.program is not None else self.render_steps(record.steps)
        )
        values = {"question": record.question, "rationale": rationale, "answer": record.answer}
        out: list[tuple[str, str]] = []
        in_prompt = True
        for literal, field in _pieces(self.text):
            if literal:
                out.append((literal, "prompt" if in_prompt else "reasoning"))
            if field in ("rationale", "answer"):
                in_prompt = False
            if field is None:
                continue
            role = "prompt" if in_prompt else ("answer" if field == "answer" else "reasoning")
            out.append((values[field], role))
        return out

    def render(self, record: RationaleRecord) -> str:
        return "".join(text for text, _ in self.segments(record))

    def prompt(self, question: str) -> str:
        """The text the model is given; it continues with the rationale and/or answer."""
        out = []
        for literal, field in _pieces(self.text):
            if field in ("rationale", "answer"):
                out.append(literal)
                break
            out.append(literal + (question if field == "question" else ""))
        return "".join(out)

    def completion_pattern(self, final: bool = False) -> re.Pattern:
        """Regex for what follows the prompt, with groups ``rationale`` and ``answer``.

        A template that ends with ``{answer}`` has nothing that closes the answer: the strict
        pattern wants a newline after it; ``final=True`` (the generation has ended) takes
        the answer up to the end of the text.
        """
        return _completion_pattern(self, final)

    def _build_completion_pattern(self, final: bool) -> re.Pattern:
        if not self.has_answer:
            # Nothing marks where a rationale-only completion ends: only the end of the
            # generation does.
            if not final:
                return re.compile(r"(?!)")
            tail = "".join(
                lit for lit, f in _pieces(self.text)[self.fields.index("rationale") + 1 :]
            )
            return re.compile(r"(?P<rationale>.*)" + re.escape(tail) + r"\Z", re.DOTALL)
        parts, started = [], False
        pieces = _pieces(self.text)
        for i, (literal, field) in enumerate(pieces):
            if not started and field not in ("rationale", "answer"):
                continue
            if started:
                parts.append(re.escape(literal))
            started = True
            if field == "rationale":
                parts.append(r"(?P<rationale>.*?)")
            elif field == "answer":
                last = all(f is None and not lit for lit, f in pieces[i + 1 :])
                if not last:
                    parts.append(r"(?P<answer>[^\n]*?)")
                else:
                    parts.append(r"(?P<answer>[^\n]+)\Z" if final else r"(?P<answer>[^\n]+?)\n")
        return re.compile("".join(parts), re.DOTALL)

    def is_complete(self, completion: str) -> bool:
        """Whether a generated continuation already holds everything the template asks."""
        return self.completion_pattern().match(completion) is not None

    def parse_completion(self, completion: str) -> dict | None:
        """``{"rationale", "steps", "answer"}`` from a generated continuation of the prompt,
        or None when it does not follow the template (cut short, wrong shape)."""
        match = self.completion_pattern().match(completion)
        if match is None:
            match = self.completion_pattern(final=True).match(completion)
        if match is None:
            return None
        groups = match.groupdict()
        rationale = groups.get("rationale")
        answer = groups.get("answer")
        if answer is not None:
            answer = answer.strip()
            if not answer:
                return None
        steps = None
        if rationale is not None:
            steps = self.parse_steps(rationale)
            if steps is None:
                return None
        return {"rationale": rationale, "steps": steps, "answer": answer}

    def parse_steps(self, text: str) -> tuple[Step, ...] | None:
        """Steps from rendered rationale text (inverse of :meth:`render_steps`)."""
        formats = [self.step] + ([self.step_without_sub] if self.step_without_sub else [])
        patterns = [_step_pattern(f) for f in formats]
        steps, pos = [], 0
        text = text.strip("\n")
        if not text:
            return ()
        while pos <= len(text):
            for pattern in patterns:
                m = pattern.match(text, pos)
                if m is not None:
                    break
            else:
                return None
            sub = m.groupdict().get("sub")
            steps.append(Step(m.group("step").strip(), sub.strip() if sub else None))
            pos = m.end()
            if pos == len(text):
                break
            if text[pos] != "\n":
                return None
            pos += 1
        return tuple(steps)


@functools.cache
def _completion_pattern(template: Template, final: bool) -> re.Pattern:
    # Sampling asks "is this row complete?" for every row at every chunk: build once.
    return template._build_completion_pattern(final)


def _pieces(text: str) -> list[tuple[str, str | None]]:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise TemplateError(f"template {text!r}: {exc}") from None
    out = []
    for literal, field, spec, conversion in parsed:
        if spec or conversion:
            raise TemplateError(f"template {text!r}: format specs are not supported ({field})")
        out.append((literal, field))
    return out


def _step_pattern(fmt: str) -> re.Pattern:
    parts = []
    for literal, field in _pieces(fmt):
        parts.append(re.escape(literal))
        if field == "n":
            parts.append(r"\d+")
        elif field == "step":
            parts.append(r"(?P<step>[^\n]*)")
        elif field == "sub":
            parts.append(r"(?P<sub>[^\n]*)")
    # A step ends at a newline or the end of the text; steps of one line match greedily.
    return re.compile("".join(parts) + r"(?=\n|\Z)")


NAMED: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "step_by_step",
            "Question: {question}\nAnswer: Let's think step by step.\n{rationale}\n"
            "The answer is {answer}.\n",
        ),
        Template(
            "structured",
            "Question: {question}\nReasoning:\n{rationale}\nAnswer: {answer}\n",
            step="Step {n}: {step}",
        ),
        Template(
            "socratic",
            "Question: {question}\n{rationale}\nSo the answer is {answer}.\n",
            step="Q{n}: {sub}\nA{n}: {step}",
            step_without_sub="A{n}: {step}",
        ),
        Template("answer", "Question: {question}\nAnswer: {answer}\n"),
        Template("program", "Question: {question}\nProgram: {rationale}\nAnswer: {answer}\n"),
        Template("predict", "predict: {question}\n{answer}\n"),
        Template("explain", "explain: {question}\n{rationale}\n"),
    )
}


def get_template(spec: str, step_format: str | None = None) -> Template:
    """A named template, or a format string with {question}, {rationale}, {answer}."""
    if spec in NAMED:
        template = NAMED[spec]
        return attrs.evolve(template, step=step_format) if step_format else template
    if "{" not in spec:
        raise TemplateError(
            f"unknown template {spec!r}: one of {', '.join(NAMED)}, or a format string with "
            "{question}, {rationale} and {answer}"
        )
    return Template("custom", spec, step=step_format or "{step}")
