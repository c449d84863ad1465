"""A served teacher checked against a real third-party server (issue 35): llama-cpp-python's
``llama_cpp.server`` serving SmolLM2-135M-Instruct's Q4_1 GGUF, or any running OpenAI-style
server given by ``--url`` (vLLM: ``vllm_cpu.sh``) serving kdcore's float32 import of it,
against that import (README.md).

    bash examples/served/verify.sh                  # llama-cpp-python from /tmp/llamacpp-venv
    bash examples/served/verify.sh --venv DIR --mlx # another venv; mlx_lm.server probed too
    bash examples/served/verify.sh --url http://127.0.0.1:8795 --model smollm2 \
        --form echo --form prompt_logprobs         # a running server, read by kdcore's client

What it does, one model process at a time where it can:

1. the held-out chat records of ``examples/real_quality`` as rows of the run tokenizer's ids
   (kdcore's ``chat`` dataset, cut at ``--seq-len``), scored by the float32 teacher here;
2. ``llama_cpp.server --logits_all true`` started from ``--venv``; what it accepts (a prompt
   of token ids, several prompts a request, ``/tokenize``, ``/extras/tokenize``) and what
   kdcore's client (the ``server`` teacher source, ``protocol = "openai"``) makes of it;
3. each row sent as its text (the server takes no ids) with ``echo`` and ``logprobs = K``;
   every log-prob entry placed where the server put it (its pairing is rebuilt from its
   source and checked entry by entry against the echoed tokens) and compared with the local
   teacher's top-K: top-1 agreement, overlap of the top-K sets, |log-prob difference| on
   shared tokens, KL between the two top-K distributions renormalised; also a plain-text row
   read both ways, which shows where each entry belongs;
4. a short ``kd distill`` with the server as teacher (what happens is recorded), and one
   with the same teacher behind ``kd serve``'s OpenAI form for contrast;
5. ``--mlx``: ``mlx_lm.server`` asked the same question.

With ``--url`` (the server must serve the float32 import, e.g. ``vllm_cpu.sh``), for each
``--form``: the rows sent by kdcore's own request builder and read by its own parser (ids, text,
and all rows in one request), each position's top-k compared with the local teacher's (top-1
agreement, top-k overlap, |log-prob difference| at the server's ids); ``/tokenize`` against the
run tokenizer; tokens/s; what the ``server`` teacher source says at start; and a short ``kd
distill`` through the server beside the same run with the teacher loaded locally (its
``hinton`` on the same renormalised top-k).

The figures go to ``results.json`` (``--out``; ``results/server.json`` with ``--url``) and a
table to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = ROOT / "examples" / "real_quality" / "data"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PLAIN = "The quick brown fox jumps over the lazy dog, and then it runs back into the forest."


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def find_gguf(given: str | None) -> Path:
    tests = Path(os.environ.get("KD_TEST_MODELS", Path.home() / ".cache/kdcore/test-models"))
    for path in [Path(given)] if given else [ROOT / "runs/smollm2" / GGUF_NAME, tests / GGUF_NAME]:
        if path.is_file():
            if hashlib.sha256(path.read_bytes()).hexdigest() != GGUF_SHA256:
                raise SystemExit(f"{path} is not SmolLM2-135M-Instruct's Q4_1 GGUF")
            return path
    raise SystemExit(f"no {GGUF_NAME}: pass --gguf (examples/real_quality/run.py fetches it)")


# ---------------------------------------------------------------- HTTP


def call(url: str, body: dict | None = None, timeout: float = 300.0) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            text = reply.read().decode(errors="replace")
            try:
                return reply.status, json.loads(text)
            except ValueError:
                return reply.status, text
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, text


def start(cmd: list[str], url: str, logfile: Path, wait_s: float = 300.0) -> subprocess.Popen:
    log("$ " + " ".join(cmd))
    handle = open(logfile, "w", encoding="utf-8")  # noqa: SIM115
    proc = subprocess.Popen(["nice", "-n", "19", *cmd], stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); its log: {logfile}")
        try:
            call(url + "/v1/models", timeout=5)  # any HTTP answer: it is up
            return proc
        except OSError:
            pass
        time.sleep(1.0)
    proc.terminate()
    raise SystemExit(f"the server did not answer in {wait_s:.0f} s; its log: {logfile}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- rows and the local teacher


def heldout_rows(teacher: Path, count: int, seq_len: int) -> tuple[list[np.ndarray], Any]:
    """The first ``count`` held-out records as rows of ids, each cut at ``seq_len`` tokens,
    and the run tokenizer."""
    from kdcore import Setup, app  # noqa: PLC0415

    params = dict(seq_len=seq_len, val_fraction=0.0, pack=False, max_records=count)
    path = str(DATA / "heldout.jsonl.gz")
    dataset = app.build(
        "dataset", "chat", Setup(base_dir=HERE), path=path, tokenizer=str(teacher), **params
    )
    rows = []
    for batch in dataset.batches(count, "train"):
        for ids, mask in zip(batch["input_ids"], batch["mask"], strict=True):
            end = int(np.flatnonzero(mask)[-1]) + 1 if mask.any() else len(ids)
            rows.append(np.asarray(ids[:end], np.int64))
    return rows[:count], dataset.tokenizer


def local_logprobs(teacher: Path, rows: list[np.ndarray]) -> list[np.ndarray]:
    """[L, V] float32 log-probabilities of each row from the float32 teacher."""
    import mlx.core as mx  # noqa: PLC0415

    from kdcore.models.io import load_model  # noqa: PLC0415

    model = load_model(teacher)[0]
    out = []
    for row in rows:
        logits = model(mx.array(row[None].astype(np.int32))).logits[0].astype(mx.float32)
        out.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
    return out


class Pieces:
    """Each id's text as llama-cpp-python names it in ``top_logprobs``: the token's bytes
    decoded as UTF-8 with errors ignored, and "" for a special token (it detokenizes with
    ``special=False``)."""

    def __init__(self, teacher: Path):
        tok = json.loads((teacher / "tokenizer.json").read_text(encoding="utf-8"))
        table = byte_decoder()
        self.text = {}
        for token, i in tok["model"]["vocab"].items():
            raw = bytes(table[c] for c in token if c in table)
            self.text[i] = raw.decode("utf-8", errors="ignore")
        for added in tok["added_tokens"]:
            self.text[added["id"]] = "" if added["special"] else added["content"]
        owners: dict[str, list[int]] = {}
        for i, text in self.text.items():
            owners.setdefault(text, []).append(i)
        self.unique = {text: ids[0] for text, ids in owners.items() if len(ids) == 1}
        self.shared = sum(len(ids) for ids in owners.values() if len(ids) > 1)

    def top(self, logprobs: np.ndarray, k: int, actual: int) -> dict[str, float]:
        """The ``{text: log-prob}`` llama-cpp-python would build from ``logprobs``: the top
        k in descending order (a text two ids share keeps the later, lower one), then the
        scored token's own."""
        order = np.argsort(-logprobs, kind="stable")[:k]
        out = {self.text[int(i)]: float(logprobs[i]) for i in order}
        out[self.text[int(actual)]] = float(logprobs[actual])
        return out


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character to byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


# ---------------------------------------------------------------- llama-cpp-python's pairing


def llamacpp_pairing(prompt: list[int], generated: bool, bos: int) -> list[tuple[int, int]]:
    """(token, row) of each ``top_logprobs`` entry llama-cpp-python 0.3.x returns for an
    echoed prompt (``Llama._create_completion``): the tokens are the prompt without a leading
    BOS, then the generated one (when there is one); the i-th is zipped with the i-th row of
    its scores (the distribution *after* prompt token i), so the tokens run one ahead of
    their rows when a BOS was removed and level with them when not; entries whose token is
    the BOS id are left out (anywhere in the prompt)."""
    tokens = prompt[1:] if prompt and prompt[0] == bos else list(prompt)
    tokens = tokens + ([-1] if generated else [])
    pairs = list(zip(tokens, range(len(prompt)), strict=False))
    return [(t, r) for t, r in pairs if t != bos]


def compare(
    server: list[dict | None],
    pairs: list[tuple[int, int]],
    local: np.ndarray,
    pieces: Pieces,
    k: int,
) -> dict:
    """Figures over the positions of ``server``'s entries, each compared with the local
    teacher's distribution at the row its pair names (the pair's token: the one the entry
    was returned with, or -1 for the generated one). Log-probs are compared on texts that
    name one id only; the sets in the form the server builds them (``Pieces.top``)."""
    top1 = overlap = positions = 0
    diffs, kls, masses = [], [], []
    for entry, (token, r) in zip(server, pairs, strict=True):
        if entry is None or r < 0:
            continue
        lp = local[r]
        mine = pieces.top(lp, k, token if token >= 0 else int(np.argmax(lp)))
        theirs_k = sorted(entry, key=lambda key: -entry[key])[:k]
        mine_k = sorted(mine, key=lambda key: -mine[key])[:k]
        top1 += theirs_k[0] == mine_k[0]
        overlap += len(set(theirs_k) & set(mine_k)) / len(mine_k)
        diffs += [
            abs(entry[key] - mine[key]) for key in entry if key in mine and key in pieces.unique
        ]
        named = [key for key in theirs_k if key in pieces.unique]
        p = np.array([entry[key] for key in named], np.float64)
        q = np.array([lp[pieces.unique[key]] for key in named], np.float64)
        p, q = p - np.logaddexp.reduce(p), q - np.logaddexp.reduce(q)
        kls.append(float(np.sum(np.exp(p) * (p - q))))
        mass = [
            np.exp([d[key] for key in keys]).sum()
            for d, keys in ((entry, theirs_k), (mine, mine_k))
        ]
        masses.append(abs(mass[0] - mass[1]))
        positions += 1
    diffs_a = np.asarray(diffs or [np.nan])
    return {
        "positions": positions,
        "top1_agreement": top1 / max(positions, 1),
        "topk_overlap": overlap / max(positions, 1),
        "max_abs_logprob_diff": float(np.max(diffs_a)),
        "mean_abs_logprob_diff": float(np.mean(diffs_a)),
        "mean_kl_renormalised": float(np.mean(kls)) if kls else None,
        "max_kl_renormalised": float(np.max(kls)) if kls else None,
        "mean_abs_topk_mass_diff": float(np.mean(masses)) if masses else None,
    }


def score_row(url: str, text: str, k: int) -> dict:
    body = {"prompt": text, "echo": True, "logprobs": k, "max_tokens": 1, "temperature": 0.0}
    status, reply = call(url + "/v1/completions", body)
    if status != 200:
        raise SystemExit(f"the server answered {status} to an echo request: {reply}")
    return reply


def placed(reply: dict, prompt: list[int], bos: int, pieces: Pieces) -> tuple[list, list, int]:
    """The reply's entries and the local rows they belong to; how many echoed tokens differ
    from what the pairing predicts (0: the pairing is the server's)."""
    lp = reply["choices"][0]["logprobs"]
    generated = reply["usage"]["completion_tokens"] > 0
    pairs = llamacpp_pairing(prompt, generated, bos)
    if len(pairs) != len(lp["tokens"]):
        raise SystemExit(f"{len(lp['tokens'])} entries where the pairing predicts {len(pairs)}")
    wrong = sum(
        t >= 0 and pieces.text[t] != named
        for (t, _), named in zip(pairs, lp["tokens"], strict=True)
    )
    return lp["top_logprobs"], pairs, wrong


# ---------------------------------------------------------------- kdcore's client and runs


def client_outcome(url: str, teacher: Path, **params) -> str:
    """What kdcore's ``server`` teacher source says when it opens the server."""
    from kdcore import app  # noqa: PLC0415
    from kdcore.errors import KdError  # noqa: PLC0415
    from kdcore.registry.manager import get_registry  # noqa: PLC0415
    from kdcore.registry.setup import Setup  # noqa: PLC0415

    spec = app.load_spec(distill_spec(url, teacher, 1, {"retries": 1, "backoff_s": 0.2, **params}))
    ref = spec.teachers[0]
    setup = Setup(base_dir=HERE, seed=0, spec=spec, teacher=ref)
    try:
        teacher_source = get_registry().get("teacher_source", "server").factory(ref.config, setup)
    except KdError as exc:
        return f"refused: {exc}"
    teacher_source.close()
    return "accepted"


def distill_spec(url: str, teacher: Path, steps: int, params: dict) -> dict:
    """examples/real_quality's half-depth student, a few steps of 2 rows of 128 tokens."""
    return {
        "run": {"name": "served-check", "seed": 0},
        "data": {
            "name": "chat",
            "params": {
                "path": str(DATA / "train.jsonl.gz"),
                "tokenizer": str(teacher),
                "seq_len": 128,
                "val_fraction": 0.25,
                "max_records": 16,
            },
        },
        "teachers": [{"server": url, "params": {"protocol": "openai", "top_k": 20, **params}}],
        "student": {
            "model": {
                "name": "mlx-lm",
                "params": {"base": str(teacher), "config": {"num_hidden_layers": 15}},
            },
            "init": {
                "name": "from-teacher",
                "params": {"layer_map": "ends", "teacher_path": str(teacher)},
            },
        },
        "losses": [
            {"name": "ce", "weight": 0.5},
            {"name": "hinton", "weight": 0.5, "params": {"temperature": 1.0}},
        ],
        "train": {
            "steps": steps,
            "batch_size": 2,
            "optimizer": {"name": "adamw", "lr": 1e-4},
            "log_every": 1,
            "checkpoint_every": 0,
        },
        "eval": {"batches": 1},
    }


def distill(spec: dict, run_dir: Path) -> dict:
    """``kd distill`` of ``spec``: its exit code, time, load, last lines, and each step's loss
    and loss terms, the validation loss and the server's tokens/s."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    spec_file = run_dir.with_suffix(".spec.json")
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=1))
    cmd = [sys.executable, "-m", "kdcore.cli", "distill", str(spec_file), "--output", str(run_dir)]
    log("$ " + " ".join(cmd))
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(["nice", "-n", "19", *cmd], cwd=ROOT, capture_output=True, text=True)
    out = {"exit": done.returncode, "seconds": round(time.perf_counter() - started, 1)}
    out["load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # before, after
    lines = (done.stdout + done.stderr).strip().splitlines()
    out["last_lines"] = lines[-4:]
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        steps = [r for r in records if "loss" in r and "step" in r]
        out["losses"] = [r["loss"] for r in steps]
        out["loss_terms"] = [{k: v for k, v in r.items() if k.startswith("loss/")} for r in steps]
        evals = [r["eval"]["val_loss"] for r in records if "val_loss" in r.get("eval", {})]
        if evals:
            out["val_loss"] = evals[-1]
        served = [r for r in records if "server/tokens_per_s" in r]
        if served:
            out["server_tokens_per_s"] = served[-1]["server/tokens_per_s"]
    return out


# ---------------------------------------------------------------- the parts


def llamacpp(
    args: argparse.Namespace,
    teacher: Path,
    gguf: Path,
    rows: list[np.ndarray],
    tok: Any,
    local: list[np.ndarray],
    pieces: Pieces,
    work: Path,
) -> dict:
    venv_python = Path(args.venv) / "bin" / "python"
    version = subprocess.run(
        [str(venv_python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    url = f"http://127.0.0.1:{args.port}"
    cmd = [
        str(venv_python),
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--logits_all",
        "true",
        "--n_ctx",
        "2048",
        "--n_threads",
        str(args.threads),
        "--verbose",
        "false",
    ]
    out: dict = {"llama_cpp_python": version, "command": " ".join(cmd)}
    proc = start(cmd, url, work / "llamacpp-server.log")
    try:
        row0 = [int(t) for t in rows[0]]
        probe = {"echo": True, "logprobs": 2, "max_tokens": 1}
        accepts = {}
        status, reply = call(url + "/v1/completions", {**probe, "prompt": row0[:8]})
        accepts["prompt_of_ids"] = status
        status, reply = call(url + "/v1/completions", {**probe, "prompt": ["Hello", "Hi"]})
        accepts["two_prompts"] = status
        accepts["/tokenize"] = call(url + "/tokenize", {"content": "Hello"})[0]
        accepts["/extras/tokenize"] = call(url + "/extras/tokenize", {"input": "Hello"})[0]
        out["http_status"] = accepts
        from kdcore.teachers import openai  # noqa: PLC0415

        texts = [tok.decode([int(t) for t in row]) for row in rows]
        agree = []
        for text, row in zip([openai.PROBE_TEXT, *texts], [None, *rows], strict=True):
            theirs = call(url + "/extras/tokenize", {"input": text})[1]["tokens"]
            ours = tok.encode(text) if row is None else [int(t) for t in row]
            agree.append(theirs == ours)
        out["tokenize_agrees"] = {"probe_text": agree[0], "rows": f"{sum(agree[1:])}/{len(rows)}"}
        out["kdcore_client"] = {
            "ids": client_outcome(url, teacher),
            "text": client_outcome(url, teacher, prompt="text", rows_per_request=1),
        }
        for name, outcome in out["kdcore_client"].items():
            log(f"  kdcore client, prompt = {name}: {outcome}")
        bos = 1
        entries, places, wrong, replies = [], [], 0, []
        for text, row in zip(texts, rows, strict=True):
            started = time.perf_counter()
            reply = score_row(url, text, args.k)
            replies.append((time.perf_counter() - started, len(row)))
            got, where, bad = placed(reply, [int(t) for t in row], bos, pieces)
            entries.append(got)
            places.append(where)
            wrong += bad
            if len(entries) == 1:
                (work / "llamacpp_first_reply.json").write_text(json.dumps(reply))
        out["echoed_tokens_off_the_pairing"] = wrong
        out["positions_in_rows"] = int(sum(len(r) for r in rows))
        figures = [
            compare(e, w, lp, pieces, args.k)
            for e, w, lp in zip(entries, places, local, strict=True)
        ]
        out["agreement"] = pooled(figures)
        seconds = sum(s for s, _ in replies)
        out["server_tokens_per_s"] = round(sum(n for _, n in replies) / seconds, 1)
        # a row with no special token: its entries read as OpenAI's form, and as placed
        plain = tok.encode(PLAIN)
        reply = score_row(url, PLAIN, args.k)
        (work / "llamacpp_plain_reply.json").write_text(json.dumps(reply))
        plain_lp = local_logprobs(teacher, [np.asarray(plain)])[0]
        got, where, bad = placed(reply, plain, bos, pieces)
        # OpenAI's form: entry i is the distribution before echoed token i (after token i - 1)
        openai_rows = [(t, i - 1) for i, (t, _) in enumerate(where)]
        out["plain_row"] = {
            "tokens": len(plain),
            "entries": len(got),
            "as_placed": compare(got, where, plain_lp, pieces, args.k),
            "as_openai_form": compare(got, openai_rows, plain_lp, pieces, args.k),
        }
        if args.record:
            record(url, tok, Path(args.record), version)
        if not args.skip_distill:
            spec = distill_spec(url, teacher, args.steps, {"prompt": "text", "rows_per_request": 1})
            out["kd_distill"] = distill(spec, work / "run-llamacpp")
    finally:
        stop(proc)
    return out


def record(url: str, tok: Any, path: Path, version: str) -> None:
    """The replies ``tests/test_served_openai.py`` reads: a short echo request (plain text,
    and a chat turn), a prompt of ids, two prompts, ``/tokenize`` and ``/extras/tokenize``."""
    probe = {"echo": True, "logprobs": 3, "max_tokens": 1, "temperature": 0.0}
    out: dict = {"server": f"llama-cpp-python {version}", "model": GGUF_NAME}
    for name, text in (
        ("plain", "The quick brown fox"),
        ("chat", "<|im_start|>user\nHi<|im_end|>\n"),
    ):
        request = {**probe, "prompt": [text]}
        status, reply = call(url + "/v1/completions", request)
        out[name] = {"ids": tok.encode(text), "request": request, "status": status, "reply": reply}
    for name, request in (
        ("ids_prompt", {**probe, "prompt": [[504, 2365, 6354, 16438]]}),
        ("two_prompts", {**probe, "prompt": ["The quick", "Hello"]}),
    ):
        status, reply = call(url + "/v1/completions", request)
        out[name] = {"request": request, "status": status, "reply": reply}
    for name, route in (("tokenize", "/tokenize"), ("extras_tokenize", "/extras/tokenize")):
        from kdcore.teachers import openai  # noqa: PLC0415

        request = openai.tokenize_request("The quick brown fox")
        status, reply = call(url + route, request)
        out[name] = {"request": request, "status": status, "reply": reply}
    path.write_text(json.dumps(out, indent=1) + "\n")
    log(f"recorded {path}")


def pooled(figures: list[dict]) -> dict:
    total = sum(f["positions"] for f in figures)
    weight = [f["positions"] / max(total, 1) for f in figures]
    out = {"positions": total}
    for key in (
        "top1_agreement",
        "topk_overlap",
        "mean_abs_logprob_diff",
        "mean_kl_renormalised",
        "mean_abs_topk_mass_diff",
    ):
        out[key] = float(sum(w * (f[key] or 0.0) for w, f in zip(weight, figures, strict=True)))
    out["max_abs_logprob_diff"] = max(f["max_abs_logprob_diff"] for f in figures)
    out["max_kl_renormalised"] = max(f["max_kl_renormalised"] or 0.0 for f in figures)
    return out


def kd_serve(args: argparse.Namespace, teacher: Path, work: Path) -> dict:
    """The same spec against the same teacher behind ``kd serve`` (OpenAI form, ids)."""
    port = args.port + 1
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "kdcore.cli",
        "serve",
        str(teacher),
        "--port",
        str(port),
        "--top-k",
        "20",
    ]
    proc = start(cmd, url, work / "kd-serve.log")
    try:
        return {
            "command": " ".join(cmd[2:]),
            "kd_distill": distill(
                distill_spec(url, teacher, args.steps, {}), work / "run-kd-serve"
            ),
        }
    finally:
        stop(proc)


def mlx_server(args: argparse.Namespace, teacher: Path, work: Path) -> dict:
    """``mlx_lm.server``: whether it returns prompt log-probs."""
    port = args.port + 2
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(teacher), "--port", str(port)]
    proc = start(cmd, url, work / "mlx-server.log")
    try:
        import mlx_lm  # noqa: PLC0415

        out = {"mlx_lm": mlx_lm.__version__}
        body = {"prompt": PLAIN, "echo": True, "logprobs": 5, "max_tokens": 1}
        status, reply = call(url + "/v1/completions", body)
        out["echo_logprobs_5"] = {"status": status, "reply": reply}
        body = {"prompt": PLAIN, "logprobs": True, "top_logprobs": 10, "max_tokens": 1}
        status, reply = call(url + "/v1/completions", body)
        choice = reply["choices"][0] if status == 200 else {}
        out["logprobs_true"] = {"status": status, "logprobs": choice.get("logprobs")}
        status, reply = call(url + "/v1/completions", {**body, "prompt": [1, 2, 3]})
        out["prompt_of_ids"] = {"status": status, "reply": str(reply)[:300]}
        out["kdcore_client"] = {
            "ids": client_outcome(url, teacher),
            "text": client_outcome(url, teacher, prompt="text"),
        }
    finally:
        stop(proc)
    return out


# ---------------------------------------------------------------- any running server (--url)


def topk_agreement(ids: np.ndarray, lps: np.ndarray, local: np.ndarray) -> dict:
    """The server's top-k of one row (``[L, k]`` ids and log-probs, as kdcore's client parsed
    them) against the local teacher's ``[L, V]`` log-probs at the same positions; log-probs
    are compared at the server's ids."""
    k = ids.shape[-1]
    mine = np.argsort(-local, axis=-1, kind="stable")[:, :k]
    shared = np.array(
        [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, mine, strict=True)]
    )
    diffs = np.abs(lps - np.take_along_axis(local, ids.astype(np.int64), axis=-1))
    # where the sets differ: the local gap between ranks k and k + 1 (0: a tie, either set is right)
    ranked = np.sort(local, axis=-1)[:, ::-1]
    gaps = (ranked[:, k - 1] - ranked[:, k])[shared < k]
    return {
        "positions": len(ids),
        "top1_agreement": float(np.mean(ids[:, 0] == mine[:, 0])),
        "topk_overlap": float(np.mean(shared) / k),
        "same_topk_set": float(np.mean(shared == k)),
        "mean_abs_logprob_diff": float(np.mean(diffs)),
        "max_abs_logprob_diff": float(np.max(diffs)),
        "max_rank_gap_where_sets_differ": float(np.max(gaps)) if gaps.size else 0.0,
    }


def pool(figures: list[dict]) -> dict:
    """Figures of several rows as one: means weighted by positions, maxima over rows."""
    total = sum(f["positions"] for f in figures)
    out: dict = {"positions": total}
    for key in figures[0]:
        if key.startswith("max_"):
            out[key] = max(f[key] for f in figures)
        elif key != "positions":
            out[key] = sum(f[key] * f["positions"] for f in figures) / total
    return out


def served_scores(
    url: str,
    model: str | None,
    batches: list[np.ndarray],
    local: list[np.ndarray],
    k: int,
    form: str,
    tok: Any = None,
) -> dict:
    """Each ``[B, L]`` batch sent in one request as kdcore's client sends it (as text when
    ``tok`` is given), read by its parser and compared row by row with ``local`` (the local
    log-probs of the batches' rows, in order); the server's tokens/s over request time."""
    from kdcore.teachers import openai  # noqa: PLC0415

    figures, seconds, rows = [], 0.0, iter(local)
    for batch in batches:
        text = None if tok is None else [tok.decode([int(t) for t in row]) for row in batch]
        body = openai.completions_request(batch, k, model=model, form=form, text=text)
        started = time.perf_counter()
        status, reply = call(url + "/v1/completions", body)
        seconds += time.perf_counter() - started
        if status != 200:
            return {"error": f"HTTP {status}: {str(reply)[:300]}"}
        try:
            ids, lps, _ = openai.parse_completions(reply, batch, k, text=tok is not None)
        except ValueError as exc:
            return {"error": f"kdcore's parser: {exc}"}
        for b in range(len(batch)):
            figures.append(topk_agreement(ids[b], lps[b], next(rows)[: batch.shape[1]]))
    out = pool(figures)
    out["tokens_per_s"] = round(out["positions"] / seconds, 1)
    return out


def tokenize_agreement(url: str, model: str | None, rows: list[np.ndarray], tok: Any) -> dict:
    """Whether the server's ``/tokenize`` gives the run tokenizer's ids for the client's probe
    text and for each row's text."""
    from kdcore.teachers import openai  # noqa: PLC0415

    texts = [openai.PROBE_TEXT] + [tok.decode([int(t) for t in row]) for row in rows]
    wanted = [tok.encode(openai.PROBE_TEXT)] + [[int(t) for t in row] for row in rows]
    agree = []
    for text, ids in zip(texts, wanted, strict=True):
        status, reply = call(url + openai.TOKENIZE_PATH, openai.tokenize_request(text, model))
        if status != 200:
            return {"error": f"HTTP {status}: {str(reply)[:300]}"}
        agree.append(openai.parse_tokenize(reply) == list(ids))
    return {"probe_text": agree[0], "rows": f"{sum(agree[1:])}/{len(rows)}"}


def server_info(url: str) -> dict:
    """The server's version (vLLM's ``/version``) and its ``/v1/models`` entries."""
    status, version = call(url + "/version", timeout=30)
    status_m, models = call(url + "/v1/models", timeout=30)
    listed = models.get("data", []) if status_m == 200 and isinstance(models, dict) else []
    keep = ("id", "owned_by", "max_model_len")
    return {
        "version": version.get("version") if status == 200 and isinstance(version, dict) else None,
        "models": [{key: m.get(key) for key in keep} for m in listed],
    }


def local_spec(teacher: Path, steps: int, k: int) -> dict:
    """:func:`distill_spec` with the teacher loaded in the run, its ``hinton`` reading the top
    ``k`` (renormalised, as it reads a served top-k): the same loss, computed here."""
    spec = distill_spec("", teacher, steps, {})
    spec["teachers"] = [{"path": str(teacher)}]
    spec["losses"][1]["params"] = {"temperature": 1.0, "top_k": k}
    return spec


def check_url(args: argparse.Namespace, gguf: Path, teacher: Path, work: Path) -> int:
    """Check the OpenAI-style server at ``--url`` (serving the float32 teacher) with kdcore's
    own client and parser, for each ``--form``; write the JSON and print the table."""
    url, forms = args.url.rstrip("/"), args.form or ["echo"]
    info = server_info(url)
    model = args.model or (info["models"][0]["id"] if info["models"] else None)
    rows, tok = heldout_rows(teacher, args.rows, args.seq_len)
    local = local_logprobs(teacher, rows)
    from kdcore.teachers import openai  # noqa: PLC0415

    warm_up = openai.completions_request(rows[0][None, :8], args.k, model=model)
    call(url + "/v1/completions", warm_up)  # untimed: a server's first request is slower
    length = min(len(r) for r in rows)
    together = [np.stack([r[:length] for r in rows])]
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "url": url,
        "model": model,
        "server": info,
        "teacher": str(teacher),
        "gguf": gguf.name,
        "k": args.k,
        "rows": [len(r) for r in rows],
        "tokenize": tokenize_agreement(url, model, rows, tok),
        "forms": {},
    }
    for form in forms:
        log(f"form = {form}")
        single = [r[None] for r in rows]
        results["forms"][form] = {
            "ids": served_scores(url, model, single, local, args.k, form),
            "text": served_scores(url, model, single, local, args.k, form, tok),
            "ids_all_rows_one_request": served_scores(url, model, together, local, args.k, form),
            "kdcore_client": {
                "ids": client_outcome(url, teacher, model=model, form=form),
                "text": client_outcome(url, teacher, model=model, form=form, prompt="text"),
            },
        }
        log(json.dumps(results["forms"][form]))
    if not args.skip_distill:
        runs = results["kd_distill"] = {}
        for form in forms:
            spec = distill_spec(url, teacher, args.steps, {"model": model, "form": form})
            runs[f"server, form = {form}"] = distill(spec, work / f"run-url-{form}")
        runs["local teacher"] = distill(local_spec(teacher, args.steps, args.k), work / "run-local")
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out or HERE / "results" / "server.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(url_table(results))
    return 0


URL_FIGURES = (
    ("positions", "positions", "d"),
    ("top1_agreement", "top-1 agreement", ".4f"),
    ("topk_overlap", "top-k overlap", ".4f"),
    ("same_topk_set", "same top-k set", ".4f"),
    ("mean_abs_logprob_diff", "mean abs. log-prob diff", ".2e"),
    ("max_abs_logprob_diff", "max abs. log-prob diff", ".2e"),
    ("max_rank_gap_where_sets_differ", "max local rank-k/k+1 gap where sets differ", ".1e"),
    ("tokens_per_s", "server tokens/s", ".1f"),
)
PROMPTS = (("ids", "ids"), ("text", "text"), ("ids_all_rows_one_request", "ids, 1 request"))


def url_table(r: dict) -> str:
    """The ``--url`` figures as Markdown tables: agreement per form and prompt, then runs."""
    columns = [
        (f"{form}, {name}", got[key]) for form, got in r["forms"].items() for key, name in PROMPTS
    ]
    machine = r["machine"]
    lines = [
        f"{r['url']} ({r['model']}, version {r['server']['version']}) vs kdcore's float32 "
        f"teacher, top-{r['k']}, {len(r['rows'])} held-out chat rows; load "
        f"{machine['loadavg_at_start'][0]} to {machine['loadavg_at_end'][0]} on "
        f"{machine['cpus']} CPUs",
        "",
        "| | " + " | ".join(name for name, _ in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for key, name, spec in URL_FIGURES:
        cells = [format(c[key], spec) if key in c else c.get("error", "")[:60] for _, c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"/tokenize agrees: {r['tokenize']}"]
    for form, got in r["forms"].items():
        for prompt, said in got["kdcore_client"].items():
            lines.append(f"kdcore client, form = {form}, prompt = {prompt}: {said[:200]}")
    runs = r.get("kd_distill")
    if runs:
        lines += [
            "",
            "| kd distill, 2 rows x 128 tokens | exit | step losses (ce, hinton) | val loss | "
            "server tokens/s | seconds | load before, after |",
            "| --- | ---: | --- | ---: | ---: | ---: | --- |",
        ]
        for name, run in runs.items():
            steps = (
                ", ".join(
                    f"{loss:.4f} ({terms.get('loss/ce', 0):.4f}, {terms.get('loss/hinton', 0):.4f})"
                    for loss, terms in zip(
                        run.get("losses", []), run.get("loss_terms", []), strict=True
                    )
                )
                or run["last_lines"][-1][:120]
            )
            val = f"{run['val_loss']:.4f}" if "val_loss" in run else ""
            speed = f"{run['server_tokens_per_s']:.1f}" if "server_tokens_per_s" in run else ""
            lines.append(
                f"| {name} | {run['exit']} | {steps} | {val} | {speed} | {run['seconds']} | "
                f"{run['load_1min'][0]}, {run['load_1min'][1]} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--venv", default=os.environ.get("KD_LLAMACPP_VENV", "/tmp/llamacpp-venv"))
    p.add_argument("--gguf", default=None)
    p.add_argument("--port", type=int, default=8791)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-distill", action="store_true")
    p.add_argument("--mlx", action="store_true", help="probe mlx_lm.server too")
    p.add_argument("--record", default=None, help="write the test suite's recorded replies here")
    p.add_argument("--work", default=str(ROOT / "runs" / "served"))
    p.add_argument("--out", default=None, help="results.json; with --url results/server.json")
    p.add_argument("--url", default=None, help="check this running OpenAI-style server instead")
    p.add_argument("--model", default=None, help="with --url: the served model's name")
    p.add_argument(
        "--form",
        action="append",
        choices=("echo", "prompt_logprobs"),
        help="with --url: the reply form(s) asked for (repeat for both; default echo)",
    )
    p.add_argument("--print-teacher", action="store_true", help="print the float32 folder")
    args = p.parse_args(argv)
    from kdcore.gguf.convert import imported_folder  # noqa: PLC0415

    gguf = find_gguf(args.gguf)
    teacher = imported_folder(gguf, "float32").resolve()
    if args.print_teacher:
        print(teacher)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.url:
        return check_url(args, gguf, teacher, work)
    args.out = args.out or str(HERE / "results.json")
    rows, tok = heldout_rows(teacher, args.rows, args.seq_len)
    local = local_logprobs(teacher, rows)
    pieces = Pieces(teacher)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": list(os.getloadavg()),
        },
        "gguf": str(gguf),
        "teacher": str(teacher),
        "rows": len(rows),
        "k": args.k,
        "ids_sharing_a_text": pieces.shared,
        "llamacpp": llamacpp(args, teacher, gguf, rows, tok, local, pieces, work),
    }
    if not args.skip_distill:
        results["kd_serve"] = kd_serve(args, teacher, work)
    if args.mlx:
        results["mlx_lm_server"] = mlx_server(args, teacher, work)
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


FIGURES = (
    ("top1_agreement", "top-1 agreement", ".4f"),
    ("topk_overlap", "top-k overlap", ".4f"),
    ("mean_abs_logprob_diff", "mean abs. logprob diff, shared ids", ".4f"),
    ("max_abs_logprob_diff", "max abs. logprob diff, shared ids", ".4f"),
    ("mean_kl_renormalised", "mean KL, top-k renormalised", ".2e"),
    ("max_kl_renormalised", "max KL, top-k renormalised", ".2e"),
    ("mean_abs_topk_mass_diff", "mean abs. top-k mass diff", ".4f"),
)


def table(r: dict) -> str:
    """The figures as a Markdown table, then what each server and run said."""
    lc = r["llamacpp"]
    columns = [lc["agreement"], lc["plain_row"]["as_placed"], lc["plain_row"]["as_openai_form"]]
    lines = [
        f"llama-cpp-python {lc['llama_cpp_python']} serving {GGUF_NAME} vs kdcore's float32 "
        f"import, top-{r['k']}",
        "",
        f"| | {r['rows']} held-out chat rows | plain row, as the server pairs | "
        "plain row, read as OpenAI's form |",
        "| --- | ---: | ---: | ---: |",
        "| positions | " + " | ".join(str(c["positions"]) for c in columns) + " |",
    ]
    for key, name, spec in FIGURES:
        lines.append(f"| {name} | " + " | ".join(format(c[key], spec) for c in columns) + " |")
    lines += [
        "",
        f"HTTP status: {lc['http_status']}; /extras/tokenize agrees: {lc['tokenize_agrees']}; "
        f"echoed tokens off the rebuilt pairing: {lc['echoed_tokens_off_the_pairing']}; "
        f"{lc['server_tokens_per_s']} tokens/s",
    ]
    for name, outcome in lc["kdcore_client"].items():
        lines.append(f"kdcore client, prompt = {name}: {outcome[:200]}")
    for key in ("llamacpp", "kd_serve"):
        run = (r.get(key) or {}).get("kd_distill")
        if run:
            said = run.get("losses") or run["last_lines"][-1][:200]
            lines.append(f"kd distill from {key}: exit {run['exit']}, {said}")
    if "mlx_lm_server" in r:
        m = r["mlx_lm_server"]
        lines.append(
            f"mlx_lm.server {m['mlx_lm']}: echo + logprobs 5 -> {m['echo_logprobs_5']['status']} "
            f"{m['echo_logprobs_5']['reply']}; kdcore client: {m['kdcore_client']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
