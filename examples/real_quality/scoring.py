"""Held-out scoring of a model folder against the teacher, per record and per prompt, so
that every comparison can be a paired bootstrap over records (``report.py``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from common import HELDOUT_DATA, HERE, MANIFEST, Budget, digest, read_json

RECORD_BATCH = 8  # held-out records run through a model together (sorted by length)
PROMPT_BATCH = 16  # held-out prompts answered together (left-padded, KV-cached)


class Scorer:
    """Held-out figures of a model folder against the teacher, per record.

    Each held-out record is rendered with the teacher's chat template (one record a row, cut
    at ``seq_len + 1`` tokens like the training rows, then after its last assistant token).
    Records of similar length run through the model and the teacher a batch at a time
    (right-padded: causal attention keeps a row blind to the pads after it); then kdcore's
    loss positions of each row are scored alone from those outputs (`record_figures`), so
    every figure exists per record: ``nll`` and ``kl`` are sums over the record's assistant
    tokens, ``top1`` a count. A quantized folder is scored as the float32 model of its
    dequantized weights (kdcore's CPU dtype policy): the same function, to float rounding.

    The teacher's side of every record is the same for every model scored: its final hidden
    states (before the head) are computed once, kept in ``cache_dir`` as safetensors
    (~0.2 GB for the 400 records), and every later score reads them back instead of running
    the 30-layer teacher again (half of a score's forward work).

    Greedy answers: each of the first ``greedy_per_source`` held-out prompts of each source
    (the turns before the first assistant reply) is continued greedily by the model (up to
    ``greedy_new`` tokens, ending at ``<|im_end|>``) and the teacher's NLL of those tokens,
    the end-of-turn token included, is kept per prompt."""

    def __init__(self, teacher: Path, budget: Budget, cache_dir: Path | None = None):
        from kdcore import Setup, app
        from kdcore.engine import onpolicy
        from kdcore.kernels.native import install_registered_kernels

        install_registered_kernels()  # the models' layer kernels (attention, SwiGLU)
        self.budget = budget
        self.teacher_path, self.cache_dir = teacher, cache_dir
        self._teacher_rows: dict[int, Any] | None = None
        self.teacher, _, _ = app.load_model(teacher)
        self.teacher.eval()
        self.teacher_parameters = app.count_parameters(self.teacher)
        self.dataset = app.build(
            "dataset",
            "chat",
            Setup(base_dir=HERE, seed=0),
            path=str(HELDOUT_DATA),
            tokenizer=str(teacher),
            seq_len=budget.seq_len,
            val_fraction=0.0,
            pack=False,
        )
        self.stops = onpolicy.default_stops(self.dataset.tokenizer, self.dataset)
        scored = heldout_records(self.dataset.records, budget.heldout_per_source)
        rows = {r: self.row(r) for r in scored}
        self.rows = {r: row for r, row in rows.items() if row is not None}
        # similar lengths together: little padding in a batch
        by_length = sorted(self.rows, key=lambda r: len(self.rows[r][0]))
        step = RECORD_BATCH
        self.batches = [by_length[i : i + step] for i in range(0, len(by_length), step)]
        chosen = heldout_records(self.dataset.records, budget.greedy_per_source)
        self.prompted = [r for r in chosen if self.dataset.prompt(r) is not None]

    def row(self, record: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Record ``record`` as (input ids, labels, mask), cut after its last loss token;
        None when no assistant token is left in its first ``seq_len + 1`` tokens."""
        enc = self.dataset.encode(record, limit=self.budget.seq_len + 1)
        ids, carries = enc.ids[: self.budget.seq_len + 1], enc.carries[: self.budget.seq_len + 1]
        mask = carries[1:]
        if not mask.any():
            return None
        end = int(np.flatnonzero(mask)[-1]) + 1
        labels = np.where(mask, ids[1:], -100)[:end]
        return ids[:end].astype(np.int32), labels.astype(np.int32), mask[:end].astype(np.float32)

    def score(self, model_dir: Path, greedy: bool) -> dict:
        from kdcore import app

        model, _, _ = app.load_model(model_dir)
        model.eval()
        started = time.perf_counter()
        per_record = self.per_record(model)
        result = {"heldout": summarize(per_record), "per_record": per_record}
        result["score_s"] = time.perf_counter() - started
        if greedy:
            started = time.perf_counter()
            result["greedy"] = self.greedy(model)
            result["greedy_s"] = time.perf_counter() - started
        return result

    def per_record(self, model) -> dict[str, list]:
        import mlx.core as mx

        teacher_rows = self.teacher_rows()
        found: dict[int, tuple[float, float, float, float]] = {}
        for batch in self.batches:
            s_out = model(mx.array(self.padded(batch)))
            mx.eval(*hidden_of(s_out))
            for b, record in enumerate(batch):
                _, labels, mask = self.rows[record]
                s_row = row_of(s_out, b, len(labels))
                found[record] = record_figures(s_row, teacher_rows[record], labels, mask)
        out: dict[str, list] = {"record": sorted(found)}
        for i, key in enumerate(("tokens", "nll", "kl", "top1")):
            out[key] = [found[r][i] for r in out["record"]]
        return out

    def padded(self, batch: list[int]) -> np.ndarray:
        rows = [self.rows[r][0] for r in batch]
        ids = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)
        for b, row_ids in enumerate(rows):
            ids[b, : len(row_ids)] = row_ids
        return ids

    def teacher_rows(self) -> dict[int, Any]:
        """Each scored record's teacher output (one row), from ``cache_dir`` when it holds
        them for this teacher and these records, else computed and kept there."""
        import mlx.core as mx

        from kdcore.models.output import ModelOutput

        if self._teacher_rows is not None:
            return self._teacher_rows
        key = digest({"teacher": str(self.teacher_path), "rows": sorted(self.rows)})
        name = f"teacher-hidden-{key}.safetensors"
        path = self.cache_dir / name if self.cache_dir else None
        probe = self.teacher(mx.array([[0]]))
        if probe.has_logits or probe.final_hidden is None:
            raise SystemExit("the teacher gives no hidden states before its head: no cache")
        names = sorted(f"r{r}" for r in self.rows)
        hidden = mx.load(str(path)) if path is not None and path.exists() else {}
        if sorted(hidden) != names:
            hidden = {}
            for batch in self.batches:
                t_out = self.teacher(mx.array(self.padded(batch)))
                for b, record in enumerate(batch):
                    n = len(self.rows[record][0])
                    hidden[f"r{record}"] = t_out.final_hidden[b : b + 1, :n]
                mx.eval(list(hidden.values()))
            if path is not None:
                partial = path.with_name("partial-" + name)
                mx.save_safetensors(str(partial), hidden)
                partial.replace(path)
        self._teacher_rows = {
            int(key[1:]): ModelOutput(final_hidden=value, head=probe.head)
            for key, value in hidden.items()
        }
        return self._teacher_rows

    def greedy(self, model) -> dict:
        from kdcore.engine import onpolicy

        prompts = [np.asarray(self.dataset.prompt(r), np.int32) for r in self.prompted]
        replies: list[np.ndarray] = []
        nll: list[float] = []
        for start in range(0, len(prompts), PROMPT_BATCH):
            chunk = prompts[start : start + PROMPT_BATCH]
            made = onpolicy.continue_prompts(
                model, chunk, self.budget.greedy_new, 0.0, 1.0, self.stops
            )
            replies += made
            nll += self.teacher_nll(chunk, made)
        tokens = [len(r) for r in replies]
        stopped = [bool(len(r) and int(r[-1]) in self.stops) for r in replies]
        return {
            "record": list(self.prompted),
            "nll": nll,
            "tokens": tokens,
            "stopped": stopped,
            "teacher_nll": sum(nll) / max(sum(tokens), 1),
            "mean_length": sum(tokens) / max(len(tokens), 1),
            "stopped_share": sum(stopped) / max(len(stopped), 1),
            "samples": [self.dataset.tokenizer.decode(r.tolist()) for r in replies[:3]],
        }

    def teacher_nll(self, prompts: list[np.ndarray], replies: list[np.ndarray]) -> list[float]:
        """The teacher's summed NLL of each reply after its prompt: one right-padded batch,
        then each row's reply positions alone through the head."""
        import mlx.core as mx

        from kdcore.engine import onpolicy
        from kdcore.losses.tokens import log_softmax

        built = onpolicy.assemble(prompts, replies)
        out = self.teacher(mx.array(built["input_ids"]))
        sums = []
        for b, (prompt, reply) in enumerate(zip(prompts, replies)):
            if len(reply) == 0:
                sums.append(0.0)
                continue
            at = slice(len(prompt) - 1, len(prompt) - 1 + len(reply))  # predicting the reply
            if out.has_logits or out.final_hidden is None:
                logits = out.logits[b, at]
            else:  # only these rows through the head, never [batch, width, vocab]
                logits = out.logits_of(out.final_hidden[b, at])
            lp = log_softmax(logits.astype(mx.float32))
            picked = mx.take_along_axis(lp, mx.array(reply)[:, None], axis=-1)
            sums.append(-float(picked.sum().item()))
        return sums


def record_figures(
    student: Any, teacher: Any, labels: np.ndarray, mask: np.ndarray
) -> tuple[float, float, float, float]:
    """One record's (assistant tokens, summed NLL, summed KL(teacher || student), top-1
    agreements), from one row of each model's output, at the loss positions only.

    Exact float32 MLX, as ``kdcore.engine.evaluate`` computes these three (its JS and top-5
    are left out: MLX's CPU backend runs every exp over ``[positions, 49,152]`` as scalar
    code, and those two cost as much again). kd-kernels' native rows would be ~2x faster
    again but differ by ~5e-5 relative (their exp is a fast approximation): visible in a
    held-out loss's fourth decimal, so not used here."""
    import mlx.core as mx

    from kdcore.losses.tokens import stable_log_softmax

    keep = np.flatnonzero(mask)
    at = mx.array(keep)
    s_logits, t_logits = logits_at(student, at), logits_at(teacher, at)
    s_lp, t_lp = stable_log_softmax(s_logits), stable_log_softmax(t_logits)
    picked = mx.take_along_axis(s_lp, mx.array(labels[keep])[:, None], axis=-1)
    kl = (mx.exp(t_lp) * (t_lp - s_lp)).sum(-1).sum()  # by row first: float32 sums
    agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).sum().astype(mx.float32)
    nll_sum, kl_sum, top1 = mx.stack([-picked.sum(), kl, agree]).tolist()
    return float(mask[keep].sum()), nll_sum, kl_sum, top1


def logits_at(out: Any, keep: Any) -> Any:
    """Float32 logits of one output row at the positions ``keep``: only those through the
    head."""
    import mlx.core as mx

    if out.has_logits or out.final_hidden is None:
        return out.logits[0][keep].astype(mx.float32)
    return out.head(out.final_hidden[0][keep]).astype(mx.float32)


def hidden_of(out: Any) -> list:
    """What a model output holds before its head: evaluated once for the whole batch."""
    return [out.logits] if out.has_logits or out.final_hidden is None else [out.final_hidden]


def row_of(out: Any, b: int, n: int) -> Any:
    """Row ``b``'s first ``n`` positions of a batched model output, as a model output."""
    from kdcore.models.output import ModelOutput

    if out.has_logits or out.final_hidden is None:
        return ModelOutput(logits=out.logits[b : b + 1, :n])
    return ModelOutput(final_hidden=out.final_hidden[b : b + 1, :n], head=out.head)


def heldout_records(total: int, per_source: int | None) -> list[int]:
    """The held-out record ids scored: all, or the first ``per_source`` of each source
    (``manifest.json``: GSM8K first, then HH)."""
    if per_source is None:
        return list(range(total))
    gsm = read_json(MANIFEST)["heldout"]["gsm8k"]
    return [*range(min(per_source, gsm)), *range(gsm, min(gsm + per_source, total))]


def summarize(per_record: dict[str, list]) -> dict:
    tokens = max(sum(per_record["tokens"]), 1)
    return {
        "loss": sum(per_record["nll"]) / tokens,
        "kl": sum(per_record["kl"]) / tokens,
        "top1": sum(per_record["top1"]) / tokens,
        "tokens": sum(per_record["tokens"]),
        "records": len(per_record["tokens"]),
    }
