"""``kd sample SPEC``: a teacher's answers to the prompts of a run's dataset, written as a
chat-format JSONL dataset: sequence-level KD (Kim & Rush, 2016; GKD's ``seq_kd``) is a
student trained with ``ce`` on it.

Why a command of its own and not ``kd generate``: that name is the kd-cot plugin's, whose
spec samples rationales and filters them by their answers; this one is the core's, for the
prompts of any dataset component, and reads everything from the run spec the student will
be trained with: the prompts from ``[data]`` (the ``chat`` dataset's records before their
first assistant turn; otherwise each row's tokens before its first loss-carrying token, or
its first ``train.on_policy.prompt_length`` tokens), the teacher from ``[[teachers]]`` (the
first with a ``path``; ``--teacher`` overrides) and the sampling settings from
``[train.on_policy]`` (``max_new_tokens``, ``temperature``, ``top_p``, ``stop_tokens``; each
has a flag).

Records: ``{"prompt": ..., "completion": ...}`` or ``{"messages": [..., {"role":
"assistant", "content": ...}]}`` (``--format``; a ``chat`` dataset's records keep their
conversation, system and earlier turns included, so ``messages`` is its default). Both are
mlx-lm formats the ``chat`` dataset reads; the ``jsonl`` dataset reads the first with
``response_key = "completion"``. A prompt of a non-chat dataset is written as the tokens
decode (a ``jsonl`` dataset's ``separator`` included: read it back with ``separator = ""``).
An answer ends at its first stop token; the tokenizer's end-of-sequence token is left out
of the text (a chat template writes its own end of turn), any other stop token (a newline)
is kept. The file is written atomically (``.gz``: gzip without a timestamp, so one seed
gives the same bytes), and the summary says how many answers stopped before
``max_new_tokens``.

The output file: an existing one is replaced only with ``--force``; one of the command's
own inputs (the spec, a file or folder ``[data]`` names, the teacher's files; paths compared
resolved, links followed) never is. While it runs, the answers go to ``OUTPUT.partial``
(locked; one JSON line per prompt answered, after a header line holding what the answers
depend on: the spec file's hash, ``--set``, the teacher's folder and its files' sizes and
times, every sampling flag, the batch size, seed and limit), a chunk at a time, flushed
to disk; the output is written from it at the end and it is removed. A run that was
killed or interrupted leaves it: the same command continues it (each prompt it skips must
hash as the one answered, else the data changed), from its last whole chunk, so the output
has the bytes an uninterrupted run writes. A partial file of other arguments or prompts is
refused, naming it, unless ``--force`` discards it. On an error the partial file stays only
when it holds answers (the command says so); no ``.tmp`` is left: a killed run's are
removed by the next run of the same output.

An answer that reaches ``max_new_tokens`` without a stop token was cut, not finished: written
as a turn, a chat template would close it with an end of turn, and a student trained on it
would learn to stop mid-sentence. ``--truncated`` says what to do with them: ``drop`` (the
default: the file holds finished answers only), ``mark`` (written, with ``"truncated":
true`` in the record, for a reader that filters them) or ``keep`` (written as they are, what
``kd sample`` did before it had the option). The summary counts them either way.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from kdcore.cli.output import _print_json
from kdcore.cli.outputs import check_output
from kdcore.cli.sample_journal import PARTIAL, Journal, StalePartial, prompt_hash, teacher_stamps
from kdcore.engine import onpolicy
from kdcore.errors import SpecError
from kdcore.hub import local_path
from kdcore.io import temporaries_of
from kdcore.models.io import load_model
from kdcore.registry.manager import get_registry
from kdcore.registry.setup import Setup
from kdcore.spec.load import load_spec
from kdcore.spec.schedules import value_at
from kdcore.tokenizers.simple import fingerprint, load_tokenizer

FORMATS = ("completion", "messages")
TRUNCATED = ("drop", "mark", "keep")  # what becomes of an answer cut at max_new_tokens


def _teacher_dir(spec, teacher: str | None) -> tuple[Path, str, str | None]:
    """(model folder, where it was named, its params.dtype) for the teacher that answers;
    a .gguf file or hub name becomes its local folder."""
    from kdcore.models.mlxlm import locate_model

    if teacher:
        return locate_model(teacher, Path.cwd(), "--teacher"), "--teacher", None
    for i, ref in enumerate(spec.teachers):
        if ref.path:
            where = f"$.teachers[{i}].path"
            folder = locate_model(ref.path, Path(spec.base_dir), where)
            return folder, where, (ref.params or {}).get("dtype")
    raise SpecError(
        "kd sample needs a teacher model: pass --teacher MODEL_DIR or give the spec a teacher "
        'with path = "MODEL_DIR" @ $.teachers'
    )


def _is_chat(dataset: Any) -> bool:
    return all(hasattr(dataset, name) for name in ("prompt", "prompted_records", "prompt_turns"))


def _chat_items(dataset: Any, split: str) -> Iterator[tuple[np.ndarray, dict]]:
    """(prompt tokens, {"messages", "tools"}) of each record of the split that has a
    prompt, in file order: the conversation before its first assistant turn."""
    for record in dataset.prompted_records(split):
        tokens = dataset.prompt(int(record))
        if tokens is None:  # the template refuses it
            continue
        messages, tools = dataset.prompt_turns(int(record))
        yield np.asarray(tokens, np.int32), {"messages": messages, "tools": tools}


def _row_items(
    dataset: Any, split: str, batch_size: int, fallback: int
) -> Iterator[tuple[np.ndarray, None]]:
    for rows in dataset.batches(batch_size, split):
        width = np.asarray(rows["input_ids"]).shape[1]
        for prompt in onpolicy.rows_prompts(rows, fallback, width):
            yield prompt, None


def _record(fmt: str, prompt_text: str, turns: dict | None, answer: str, where: str) -> dict:
    if turns is None:
        if fmt == "completion":
            return {"prompt": prompt_text, "completion": answer}
        messages = [{"role": "user", "content": prompt_text}]
        return {"messages": [*messages, {"role": "assistant", "content": answer}]}
    messages, tools = turns["messages"], turns["tools"]
    if fmt == "completion":
        if len(messages) != 1 or messages[0].get("role") != "user":
            raise SpecError(
                f"{where}: a record whose prompt is more than one user turn cannot be written "
                "as prompt/completion: use --format messages"
            )
        return {"prompt": messages[0]["content"], "completion": answer}
    record: dict = {"messages": [*messages, {"role": "assistant", "content": answer}]}
    if tools:
        record["tools"] = tools
    return record


def sample_dataset(args) -> dict:
    """Write the teacher's answers (see the module docstring); the summary."""
    _check_counts(args)
    spec = load_spec(args.spec, args.set)
    section = spec.train.on_policy
    registry = get_registry()
    setup = Setup(base_dir=Path(spec.base_dir), seed=spec.run.seed, spec=spec)
    folder, named, dtype = _teacher_dir(spec, args.teacher)
    if not (folder / "config.json").is_file():
        raise SpecError(f"no saved model in {folder} (config.json missing) @ {named}")
    output = Path(args.output)
    partial = output.with_name(output.name + PARTIAL)
    inputs = _inputs(spec, args, folder)
    check_output(
        output, inputs, args.force, "kd sample", also=(partial,)
    )  # before anything slow loads
    dataset = registry.get("dataset", spec.data.name).factory(spec.data.config, setup)
    if isinstance(getattr(dataset, "path", None), (str, Path)):  # a hub dataset's local file
        inputs.append((Path(dataset.path), "the dataset's file"))
        check_output(output, inputs, args.force, "kd sample", also=(partial,))
    model, _arch, config = load_model(folder, dtype, named.replace(".path", ".params.dtype"))
    model.eval()
    tokenizer = load_tokenizer(folder)
    if fingerprint(tokenizer) != fingerprint(dataset.tokenizer):
        raise SpecError(
            f"the teacher in {folder} has another vocabulary than the dataset's tokenizer: its "
            f"answers would be other tokens @ {named}"
        )
    chat = _is_chat(dataset)
    fmt = args.format or ("messages" if chat else "completion")
    # None is "not given"; a 0 given was refused by _check_counts, never replaced
    max_new = args.max_new_tokens if args.max_new_tokens is not None else section.max_new_tokens
    temperature = (
        args.temperature if args.temperature is not None else value_at(section.temperature, 0, 1)
    )
    top_p = args.top_p if args.top_p is not None else value_at(section.top_p, 0, 1)
    if max_new < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise SpecError(
            "kd sample needs --max-new-tokens >= 1, --temperature >= 0 (0: greedy) and "
            f"--top-p in (0, 1]; got {max_new}, {temperature:g}, {top_p:g}"
        )
    eos = onpolicy.default_stops(tokenizer, dataset)
    stops = (
        args.stop_token if args.stop_token else onpolicy.stop_tokens(section, tokenizer, dataset)
    )
    context = getattr(config, "max_seq_len", None)
    room = context - max_new if context else None
    if room is not None and room < 1:
        raise SpecError(
            f"--max-new-tokens {max_new} leaves no room for a prompt in the teacher's context "
            f"of {context} tokens @ {named}"
        )
    batch_size = args.batch_size if args.batch_size is not None else spec.train.batch_size

    def items() -> Iterator[tuple[np.ndarray, dict | None]]:
        return (
            _chat_items(dataset, args.split)
            if chat
            else _row_items(dataset, args.split, batch_size, section.prompt_length)
        )

    seed = spec.run.seed if args.seed is None else args.seed
    writer = _Answers(
        model=model,
        tokenizer=tokenizer,
        max_new=max_new,
        temperature=temperature,
        top_p=top_p,
        stops=list(stops),
        eos=eos,
        room=room,
        fmt=fmt,
        seed=seed,
        where=str(args.spec),
        truncated=args.truncated,
    )
    identity = {
        "spec": hashlib.sha256(Path(args.spec).read_bytes()).hexdigest(),
        "set": list(args.set),
        "base_dir": str(Path(spec.base_dir).resolve()),
        "teacher": str(folder.resolve()),
        "teacher_files": teacher_stamps(folder),
        "split": args.split,
        "format": fmt,
        "max_new_tokens": max_new,
        "temperature": temperature,
        "top_p": top_p,
        "stop_tokens": [int(t) for t in stops],
        "truncated": args.truncated,
        "batch_size": batch_size,
        "seed": seed,
        "limit": args.limit,
    }
    start = time.perf_counter()
    journal = Journal.open(partial, identity, batch_size, args.force)
    try:
        for stale in temporaries_of(output):  # a killed run's, this output's: we hold its lock
            stale.unlink(missing_ok=True)
        resumed = _answer(journal, writer, items, batch_size, args.limit, args.force)
        journal.write_output(output)
    except BaseException as exc:
        journal.abandon(exc)
        raise
    finally:
        journal.close()
    return {
        "output": str(output),
        "records": writer.written,
        "answered": writer.answered,
        "resumed": resumed,  # answers read back from OUTPUT.partial, not sampled again
        "stopped": writer.stopped,
        "truncated": writer.cut,  # answers that reached max_new_tokens unstopped
        "truncated_policy": args.truncated,
        "split": args.split,
        "format": fmt,
        "teacher": str(folder),
        "max_new_tokens": max_new,
        "temperature": temperature,
        "top_p": top_p,
        "stop_tokens": list(stops),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _check_counts(args) -> None:
    """A count flag given as 0 or less is an error, as -1 always was: never the spec's
    default (``args.x or default`` read 0 as not given)."""
    for flag, value in (
        ("--max-new-tokens", args.max_new_tokens),
        ("--batch-size", args.batch_size),
        ("--limit", args.limit),
    ):
        if value is not None and value < 1:
            raise SpecError(f"{flag} {value} is not a count: give at least 1")


def _inputs(spec, args, folder: Path) -> list[tuple[Path, str]]:
    """(path, what it is) of what this command reads: the spec, the teacher (as named and
    its folder) and every existing path a string of ``[data]``'s params names."""
    base = Path(spec.base_dir)
    found = [(Path(args.spec), "the spec"), (folder, "the teacher's folder")]
    named = args.teacher or next((t.path for t in spec.teachers if t.path), None)
    if named:  # a .gguf file is read, its imported folder too
        found.append((local_path(named, Path.cwd() if args.teacher else base), "the teacher"))

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")
        elif isinstance(value, str) and value.strip():
            try:
                path = local_path(value, base)
                if path.exists():
                    found.append((path, where))
            except (OSError, ValueError):  # not a path: a name too long, a NUL
                pass

    walk(spec.data.params, "$.data.params")
    return found


def _answer(
    journal: Journal,
    writer: _Answers,
    items: Callable[[], Iterator[tuple[np.ndarray, dict | None]]],
    batch_size: int,
    limit: int | None,
    force: bool,
) -> int:
    """Answer the prompts ``journal`` lacks, a chunk at a time; the prompts it has are
    skipped, each checked to be the one it answered. How many it had."""
    writer.resume(journal)
    resumed = journal.answered
    matched = 0  # the partial file's prompts found again, in order
    chunk: list[tuple[np.ndarray, dict | None]] = []
    for n, item in enumerate(items()):
        if limit is not None and n >= limit:
            break
        if n < resumed:
            if prompt_hash(*item) != journal.prompts[n]:
                break  # before any prompt was sampled: refused or started over below
            matched += 1
            continue
        chunk.append(item)
        if len(chunk) == batch_size:
            journal.append(writer.answer(chunk))
            chunk = []
    if matched < resumed:  # a prompt changed, or the data holds fewer now
        if not force:
            raise StalePartial(
                f"{journal.path}: prompt {matched} is not the one answered there (the data or "
                f"its tokenizer changed since): pass --force to discard its {resumed} answers "
                "and start over"
            )
        journal.reset()
        return _answer(journal, writer, items, batch_size, limit, force)
    if chunk:
        journal.append(writer.answer(chunk))
    return resumed


@attrs.define
class _Answers:
    """Answers chunks of prompts as partial-file entries, counting them."""

    model: Any
    tokenizer: Any
    max_new: int
    temperature: float
    top_p: float
    stops: list[int]
    eos: list[int]
    room: int | None
    fmt: str
    seed: int
    where: str
    truncated: str = "drop"  # one of TRUNCATED
    written: int = 0  # records in the file
    answered: int = 0  # prompts answered, cut answers included
    stopped: int = 0  # answers that ended at a stop token
    cut: int = 0  # answers that reached max_new unstopped

    def resume(self, journal: Journal) -> None:
        """Start from the answers ``journal`` holds (counted, not sampled again)."""
        self.written = self.answered = self.stopped = self.cut = 0
        for entry in journal.entries():
            self._count(entry)

    def _count(self, entry: dict) -> None:
        self.answered += 1
        self.stopped += int(entry["stopped"])
        self.cut += int(not entry["stopped"])
        self.written += int(entry["record"] is not None)

    def answer(self, chunk: list[tuple[np.ndarray, dict | None]]) -> list[dict]:
        prompts = [p if self.room is None else p[-self.room :] for p, _ in chunk]
        # One seed per chunk, from the prompts answered before it (written or dropped): a
        # --limit run's records are the first ones of the run without it, whatever
        # --truncated keeps, and a resumed run's are the uninterrupted run's.
        mx.random.seed(self.seed * 1_000_003 + self.answered)
        answers = onpolicy.continue_prompts(
            self.model, prompts, self.max_new, self.temperature, self.top_p, self.stops
        )
        entries = []
        for (prompt, turns), answer in zip(chunk, answers):
            ended = len(answer) > 0 and int(answer[-1]) in self.stops
            cut = not ended  # it reached max_new (prompts leave it room in the context)
            record = None
            if not (cut and self.truncated == "drop"):
                if ended and int(answer[-1]) in self.eos:
                    answer = answer[:-1]
                text = self.tokenizer.decode(answer.tolist())
                prompt_text = self.tokenizer.decode(prompt.tolist()) if turns is None else ""
                record = _record(self.fmt, prompt_text, turns, text, self.where)
                if cut and self.truncated == "mark":
                    record["truncated"] = True
            entry = {"prompt": prompt_hash(prompt, turns), "stopped": ended, "record": record}
            entries.append(entry)
        for entry in entries:  # counted once the chunk is whole: a failed record counts none
            self._count(entry)
        return entries


def cmd_sample(args) -> int:
    summary = sample_dataset(args)
    if args.json:
        _print_json(summary)
    else:
        done = {"drop": "dropped", "mark": 'written with "truncated": true', "keep": "kept"}
        print(
            f"{summary['answered']} answers ({summary['stopped']} stopped before "
            f"{summary['max_new_tokens']} tokens; {summary['truncated']} cut at that limit, "
            f"{done[summary['truncated_policy']]}) in {summary['seconds']:.1f}s: "
            f"wrote {summary['records']} records to {summary['output']}"
            + (f" ({summary['resumed']} answers resumed)" if summary["resumed"] else "")
        )
        if summary["answered"] and not summary["records"]:
            print(
                "warning: every answer was cut at --max-new-tokens and dropped: raise it, or "
                "pass --truncated mark|keep",
                file=sys.stderr,
            )
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="a teacher's answers to a dataset's prompts, as chat-format JSONL (sequence-level KD)",
    )
    p.add_argument("spec", help="a run spec: its [data] gives the prompts, its teacher answers")
    p.add_argument(
        "--output",
        "-o",
        required=True,
        help="the JSONL file to write (.gz allowed); never one of the command's inputs. An "
        "interrupted run leaves OUTPUT.partial, which the same command continues",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace OUTPUT if it exists, and discard an OUTPUT.partial of other arguments",
    )
    p.add_argument("--teacher", help="a saved model folder (default: the spec's first teacher)")
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="records as prompt/completion or messages (default: messages for a chat "
        "dataset, else prompt/completion)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, help="at least 1; default: train.on_policy.max_new_tokens"
    )
    p.add_argument("--temperature", type=float, help="0: greedy; default: train.on_policy's")
    p.add_argument("--top-p", type=float, help="default: train.on_policy.top_p")
    p.add_argument(
        "--stop-token",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="a token id that ends an answer (repeatable; default: train.on_policy.stop_tokens, "
        "else the tokenizer's end-of-sequence)",
    )
    p.add_argument(
        "--truncated",
        choices=TRUNCATED,
        default="drop",
        help="an answer cut at --max-new-tokens (no stop token): drop it (default: the file "
        'holds finished answers only), mark it ("truncated": true in its record) or keep it '
        "as if finished",
    )
    p.add_argument(
        "--batch-size", type=int, help="prompts per batch, at least 1 (default: train.batch_size)"
    )
    p.add_argument("--limit", type=int, help="answer at most this many prompts (at least 1)")
    p.add_argument("--seed", type=int, help="default: run.seed")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set data.params.seq_len=128",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_sample)
