"""``kd cache`` from a served teacher, and where a cache came from (its manifest's
provenance) checked against the run's spec."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import served_helpers as S

from kdcore import app
from kdcore.cache.format import map_safetensors
from kdcore.cache.provenance import chat_template_hash
from kdcore.cache.write import teacher_identity, write_cache
from kdcore.cli.main import main as kd_main
from kdcore.errors import SpecError
from kdcore.models.mlxlm import create_mlxlm_dir
from kdcore.spec.tomlwrite import dumps as toml_dumps

pytestmark = pytest.mark.usefixtures("server_token")  # the served teacher's token, in its env var


def shards(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a teacher cache, its shards concatenated."""
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = [map_safetensors(folder / s["file"]) for s in manifest["shards"]]
    return {k: np.concatenate([p[k][0] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def caches(world, corpus, tmp_path_factory):
    """float32 caches of the teacher: through ``kd cache`` of a spec whose teacher is the
    server, and from the local folder with the same batch shapes."""
    import os

    os.environ[S.ENV] = S.TOKEN
    root = tmp_path_factory.mktemp("caches")
    spec_path = root / "served.toml"
    spec_path.write_text(toml_dumps(S.spec_dict(world, corpus, S.served_entry(world))))
    served = root / "served"
    command = ["cache", str(spec_path), "--output", str(served), "--dtype", "float32"]
    assert kd_main([*command, "--batch-size", "4", "--shard-tokens", "2048"]) == 0
    local = root / "local"
    spec = app.load_spec(S.spec_dict(world, corpus, {"path": str(world["teacher"])}))
    write_cache(
        spec, local, top_k=S.K, dtype="float32", batch_size=4, shard_tokens=2048, progress=False
    )
    return {"served": served, "local": local, "root": root}


def test_a_cache_built_through_kd_serve_equals_one_from_the_local_folder(world, corpus, caches):
    served, local = shards(caches["served"] / "teacher-0"), shards(caches["local"] / "teacher-0")
    np.testing.assert_array_equal(served["topk_ids"], local["topk_ids"])
    for name in ("topk_logprobs", "tail_logmass"):
        np.testing.assert_allclose(served[name], local[name], atol=1e-5, rtol=0, err_msg=name)
    assert served["topk_ids"].shape[-1] == S.K  # the spec's top_k, no --top-k given
    # the same provenance but for where it came from; never the token
    m = {
        n: json.loads((caches[n] / "teacher-0" / "manifest.json").read_text())
        for n in ("served", "local")
    }
    got, want = m["served"]["provenance"], m["local"]["provenance"]
    assert got == {
        "source": "server",
        "server": world["url"],
        "protocol": "kd",
        "model": "teacher",
        "chat_template_hash": want["chat_template_hash"],
        "unknown": [],
    }
    assert want["source"] == "model" and want["model"] == str(world["teacher"])
    assert m["served"]["teacher"]["identity"] == teacher_identity(world["teacher"])
    for key in ("tokenizer_hash", "k", "capture_temperature", "vocab_size", "data"):
        assert m["served"][key] == m["local"][key], key
    files = [p for p in caches["served"].rglob("*") if p.is_file()]
    assert files and not [p for p in files if S.TOKEN.encode() in p.read_bytes()]
    # a run from each has the same losses
    runs = {}
    for name in ("served", "local"):
        out = caches["root"] / f"run-{name}"
        entry = {"cache": str(caches[name])}
        app.distill(S.spec_dict(world, corpus, entry), output=out, progress=False)
        runs[name] = S.losses_by_step(out)
    assert sorted(runs["served"]) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [runs["served"][s] for s in runs["served"]],
        [runs["local"][s] for s in runs["served"]],
        rtol=1e-5,
    )


def test_a_run_refuses_a_cache_whose_provenance_is_not_its_spec(world, corpus, caches, tmp_path):
    served = str(caches["served"])

    runs = iter(range(100))

    def build(entry: dict, **params):
        spec = S.spec_dict(world, corpus, {**entry, "params": params}, steps=1)
        return app.distill(spec, output=tmp_path / f"run{next(runs)}", progress=False)

    cases = [
        ({"cache": served, "server": "http://elsewhere:8765"}, {}, "the teacher server", ".server"),
        ({"cache": served}, {"model": "qwen"}, "model 'teacher'", ".params.model"),
        ({"cache": served}, {"top_k": 20}, f"top_k = {S.K}", ".params.top_k"),
        ({"cache": served}, {"temperature": 2.0}, "capture temperature 1.0", ".params.temperature"),
        ({"cache": served}, {"protocol": "openai"}, "protocol 'kd'", ".params.protocol"),
        ({"cache": served, "path": str(world["teacher"])}, {}, "a teacher from 'server'", ".path"),
    ]
    for entry, params, words, field in cases:
        with pytest.raises(SpecError) as refused:
            build(entry, **params)
        message = str(refused.value)
        assert f"cache {served}/teacher-0 was made with {words}" in message, message
        assert f"@ $.teachers[0]{field}" in message, message
    # another teacher folder than the one a local cache was made from
    other = create_mlxlm_dir(tmp_path / "other", S.TINY, seed=2)
    local = str(caches["local"])
    with pytest.raises(SpecError, match=r"a teacher of identity \(config and weights\) '\w+', "):
        build({"cache": local, "path": str(other)})
    # the spec agrees: the run goes ahead
    build({"cache": served, "server": world["url"]}, model="teacher", top_k=S.K, protocol="kd")
    build({"cache": local, "path": str(world["teacher"])}, top_k=S.K, temperature=1.0)


def test_a_cache_written_before_provenance_is_read_with_a_warning(
    world, corpus, caches, tmp_path, capsys
):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(caches["local"], old)
    path = old / "teacher-0" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["provenance"]
    path.write_text(json.dumps(manifest))
    spec = S.spec_dict(world, corpus, {"cache": str(old), "server": world["url"]}, steps=1)
    app.distill(spec, output=tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert (
        f"warning: cache {old}/teacher-0 was written before kd cache recorded provenance: its "
        "teacher's source, server, model and chat template are unknown; the spec's "
        "$.teachers[0].server cannot be checked"
    ) in err


def test_a_cache_from_an_openai_server_records_what_it_cannot_tell(world, corpus, tmp_path):
    entry = S.served_entry(world, "openai")
    spec = app.load_spec(S.spec_dict(world, corpus, entry))
    write_cache(spec, tmp_path / "c", dtype="float32", batch_size=4, progress=False)
    manifest = json.loads((tmp_path / "c" / "teacher-0" / "manifest.json").read_text())
    assert manifest["provenance"] == {
        "source": "server",
        "server": world["url"],
        "protocol": "openai",
        "model": "teacher",  # from the completions' replies
        "chat_template_hash": None,
        "unknown": ["identity", "chat_template_hash"],
    }
    assert manifest["teacher"]["identity"] is None and manifest["k"] == S.K
    entry = {"cache": str(tmp_path / "c"), "server": world["url"]}
    entry["params"] = {"protocol": "openai", "model": "teacher"}
    app.distill(S.spec_dict(world, corpus, entry, steps=1), output=tmp_path / "r", progress=False)


def test_kd_cache_of_a_server_refuses_another_temperature(world, corpus, tmp_path):
    spec = app.load_spec(S.spec_dict(world, corpus, S.served_entry(world)))
    with pytest.raises(SpecError, match="a served teacher gives log-probs at temperature 1 only"):
        write_cache(spec, tmp_path / "c", temperature=2.0, progress=False)


def test_a_chat_template_other_than_the_caches_is_refused(world, corpus, caches, tmp_path):
    import shutil

    templated = tmp_path / "templated"
    shutil.copytree(world["teacher"], templated)
    config = json.loads((templated / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (templated / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat_template_hash(world["teacher"]) is None
    assert len(chat_template_hash(templated)) == 16
    assert teacher_identity(templated) == teacher_identity(world["teacher"])  # weights alike
    spec = S.spec_dict(world, corpus, {"cache": str(caches["local"]), "path": str(templated)})
    with pytest.raises(
        SpecError,
        match=r"made with a chat template of hash none, and the spec "
        r"asks for '[0-9a-f]{16}' @ \$\.teachers\[0\]\.path",
    ):
        app.distill(spec, output=tmp_path / "run", progress=False)
