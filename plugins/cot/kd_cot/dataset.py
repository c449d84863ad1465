"""The ``rationale`` (and ``gsm8k``) dataset components.

Each record is rendered with every template in ``templates`` (one row per record and
template, rows of a record adjacent in every batch) and tokenized segment by segment, so
each label position knows its role. Batch arrays, all [B, L] unless noted:

- ``input_ids``, ``labels`` (-100 on the prompt and padding), ``mask`` (1.0 where a label
  carries loss);
- ``reasoning_mask``: loss positions outside the answer (rationale and connecting text);
- ``answer_mask``: positions whose label is a token of the answer, so that
  ``decode(labels[answer_mask == 1]) == answer``; ``reasoning_mask + answer_mask == mask``;
- ``task`` [B] int32: the index of the row's template in ``templates`` (the
  ``step_by_step`` loss reads it: with ``templates = ["predict", "explain"]`` task 0 is the
  label row and task 1 the rationale row of the same record);
- ``is_program`` [B] float32: 1.0 for program-of-thought rows.

Records that do not parse, or do not fit in ``seq_len`` tokens, are reported with their
line number (``kd data inspect``) and left out.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import attrs
import numpy as np

from kd_cot.evaluator import check_annotations
from kd_cot.records import RationaleRecord, read_records
from kd_cot.templates import Template, TemplateError, get_template
from kdcore import IGNORE_INDEX, Dataset, SpecError, validators
from kdcore.app import resolve_tokenizer


def _templates(_instance, attribute, value):
    if not value:
        raise ValueError(f"{attribute.name} needs at least one template")
    for i, spec in enumerate(value):
        try:
            get_template(spec)
        except TemplateError as exc:
            # attrs validator errors reach the user without the field's path: name it here.
            raise ValueError(f"{attribute.name}[{i}]: {exc}") from None


@attrs.define
class RationaleConfig:
    """Parameters of the ``rationale`` dataset."""

    path: str
    format: Literal["auto", "gsm8k", "generic"] = "auto"
    templates: list[str] = attrs.field(factory=lambda: ["step_by_step"], validator=_templates)
    step_format: str | None = None  # overrides the step format of every template
    program_template: str = "program"  # program-of-thought records in rationale templates
    annotations: Literal["keep", "strip"] = "keep"
    tokenizer: str = "byte"
    seq_len: int | None = attrs.field(default=None, validator=validators.positive)  # None: longest
    val_fraction: float = attrs.field(
        default=0.1, validator=[validators.number, validators.fraction]
    )
    max_records: int | None = None
    question_key: str = "question"
    rationale_key: str = "rationale"
    answer_key: str = "answer"
    program_key: str = "program"


@attrs.define
class Gsm8kConfig(RationaleConfig):
    """The ``gsm8k`` dataset: the rationale dataset reading GSM8K files."""

    format: Literal["auto", "gsm8k", "generic"] = "gsm8k"


@attrs.frozen
class Row:
    record: int  # index into dataset.records
    task: int  # template index


def encode_rows(
    tokenizer, rows: list[list[tuple[str, str]]], seq_len: int
) -> dict[str, np.ndarray]:
    """Token arrays of rendered rows (lists of (text, role)); rows must fit in seq_len + 1."""
    n = len(rows)
    ids = np.zeros((n, seq_len + 1), np.int32)
    roles = np.zeros((n, seq_len + 1), np.int8)  # 0 prompt/pad, 1 reasoning, 2 answer
    code = {"prompt": 0, "reasoning": 1, "answer": 2}
    for r, segments in enumerate(rows):
        pos = 0
        for text, role in segments:
            tokens = tokenizer.encode(text)
            ids[r, pos : pos + len(tokens)] = tokens
            roles[r, pos : pos + len(tokens)] = code[role]
            pos += len(tokens)
    target_roles = roles[:, 1:]
    carries = target_roles > 0
    return {
        "input_ids": ids[:, :-1],
        "labels": np.where(carries, ids[:, 1:], IGNORE_INDEX).astype(np.int32),
        "mask": carries.astype(np.float32),
        "reasoning_mask": (target_roles == 1).astype(np.float32),
        "answer_mask": (target_roles == 2).astype(np.float32),
    }


class RecordChecks(list):
    """Per-record answer-mask checks; prints as a one-line summary, serialises in full."""

    def __str__(self) -> str:
        bad = [c["line"] for c in self if not c["answer_mask_ok"]]
        text = f"{len(self)} records, {len(self) - len(bad)} answer masks decode to the answer"
        return text + (f"; failed at lines {bad[:20]}" if bad else "") + " (all: --json)"


class RationaleDataset(Dataset):
    """Rationale records rendered with templates; reasoning and answer masks per token."""

    def __init__(self, config: RationaleConfig, setup):
        self.config = config
        self.seed = setup.seed
        path = setup.resolve(config.path)
        keys = (config.question_key, config.rationale_key, config.answer_key, config.program_key)
        records, self.rejected, self.records_read = read_records(
            path, config.format, config.annotations, config.max_records, keys
        )
        try:
            self.templates: list[Template] = [
                get_template(t, config.step_format) for t in config.templates
            ]
            self.program_template = get_template(config.program_template)
        except TemplateError as exc:
            raise SpecError(f"{exc} @ $.data.params.templates") from None
        rendered = [[self._segments(rec, t) for t in self.templates] for rec in records]
        if setup.tokenizer is not None:
            self.tokenizer = setup.tokenizer
        else:
            text = "".join(s for rows in rendered for row in rows for s, _ in row)
            self.tokenizer = resolve_tokenizer(config.tokenizer, setup.base_dir, text or " ")
        lengths = [
            max(sum(len(self.tokenizer.encode(s)) for s, _ in row) for row in rows)
            for rows in rendered
        ]
        seq_len = config.seq_len
        if seq_len is None:
            seq_len = max(8, -(-max(lengths, default=2) // 8) * 8)  # longest, rounded up to 8
        self.seq_len = seq_len
        kept = []
        for rec, rows, length in zip(records, rendered, lengths):
            if length > seq_len + 1:
                self.rejected.append(
                    {"line": rec.line, "reason": f"needs {length} tokens; seq_len is {seq_len}"}
                )
            else:
                kept.append((rec, rows))
        self.rejected.sort(key=lambda r: r["line"])
        self.records: list[RationaleRecord] = [rec for rec, _ in kept]
        cut = int(len(kept) * (1 - config.val_fraction))
        self.record_splits = {"train": list(range(cut)), "val": list(range(cut, len(kept)))}
        self.rows: dict[str, list[Row]] = {}
        self._examples = {}
        for split, indices in self.record_splits.items():
            self.rows[split] = [Row(i, t) for i in indices for t in range(len(self.templates))]
            arrays = encode_rows(
                self.tokenizer, [kept[r.record][1][r.task] for r in self.rows[split]], seq_len
            )
            arrays["task"] = np.array([r.task for r in self.rows[split]], np.int32)
            arrays["is_program"] = np.array(
                [self.records[r.record].program is not None for r in self.rows[split]],
                np.float32,
            )
            self._examples[split] = arrays

    def _segments(self, record: RationaleRecord, template: Template):
        if record.program is not None and template.has_rationale:
            template = self.program_template
        return template.segments(record)

    # ------------------------------------------------------------ batching

    def batch(self, index: int, batch_size: int, split: str = "train") -> dict[str, np.ndarray]:
        """Batch ``index``: records drawn without replacement epoch by epoch, each record's
        rows (one per template) adjacent, so a task-pair loss sees both rows of a record."""
        per = len(self.templates)
        if per == 1:
            return super().batch(index, batch_size, split)
        n = len(self.record_splits[split])
        if n == 0:
            raise SpecError(f"the {split} split is empty: more data or a larger seq_len")
        picks = []
        for sample in range(index * batch_size, (index + 1) * batch_size):
            record_draw, task = divmod(sample, per)
            epoch, k = divmod(record_draw, n)
            if split == "train":
                order = np.random.default_rng([self.seed, epoch]).permutation(n)
                picks.append(order[k] * per + task)
            else:
                picks.append(k * per + task)
        picks = np.asarray(picks)
        batch = {key: value[picks] for key, value in self._examples[split].items()}
        batch["example_index"] = picks.astype(np.int32)
        return batch

    # ------------------------------------------------------------ inspection

    def answer_checks(self) -> list[dict]:
        """For each row with an answer: does decoding its answer-masked labels give it?"""
        checks = []
        for split in ("train", "val"):
            arrays = self._examples[split]
            for i, row in enumerate(self.rows[split]):
                if not self.templates[row.task].has_answer:
                    continue
                record = self.records[row.record]
                picked = arrays["labels"][i][arrays["answer_mask"][i] > 0]
                decoded = self.tokenizer.decode(picked.tolist())
                checks.append(
                    {
                        "line": record.line,
                        "template": self.templates[row.task].name,
                        "answer": record.answer,
                        "decoded": decoded,
                        "ok": decoded == record.answer,
                    }
                )
        return checks

    def inspect(self, limit: int = 3) -> dict:
        report = super().inspect(limit)
        checks = self.answer_checks()
        per_record: dict[int, bool] = {}
        for check in checks:
            per_record[check["line"]] = per_record.get(check["line"], True) and check["ok"]
        failed = [c for c in checks if not c["ok"]]
        annotations = Counter()
        for record in self.records:
            annotations.update(check_annotations(record.rationale))
        report.update(
            {
                "records_parsed": len(self.records),
                "records_rejected": len(self.rejected),
                "templates": [t.name if t.name != "custom" else t.text for t in self.templates],
                "seq_len": self.seq_len,
                "kinds": dict(Counter(r.kind for r in self.records)),
                "answer_mask": {
                    "rows_checked": len(checks),
                    "decode_to_answer": len(checks) - len(failed),
                    "failed": failed[:20],
                },
                "calculator_annotations": dict(annotations),
                "records": RecordChecks(
                    {"line": line, "answer_mask_ok": ok} for line, ok in per_record.items()
                ),
            }
        )
        for sample, i in zip(report["samples"], range(limit)):
            arrays = self._examples["train"]
            sample["answer_text"] = self.tokenizer.decode(
                arrays["labels"][i][arrays["answer_mask"][i] > 0].tolist()
            )
            sample["reasoning_tokens"] = int(arrays["reasoning_mask"][i].sum())
        return report
