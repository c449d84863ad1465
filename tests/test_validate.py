"""``kd validate``: everything that can be checked without training is checked, each problem
one ``message @ $.path`` line (issue 20, points 6 and 11)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

import kdcore
from kdcore import app
from kdcore.cli.main import main as kd_main
from kdcore.spec.tomlwrite import dumps as toml_dumps


@pytest.fixture
def validate(tmp_path, capsys):
    """``validate(spec_dict, *sets)`` -> (exit code, stderr lines) of ``kd validate``."""

    def run(spec: dict | str, *sets: str) -> tuple[int, list[str]]:
        path = tmp_path / "spec.toml"
        path.write_text(spec if isinstance(spec, str) else toml_dumps(spec))
        argv = ["validate", str(path)]
        for item in sets:
            argv += ["--set", item]
        capsys.readouterr()
        code = kd_main(argv)
        return code, capsys.readouterr().err.strip().splitlines()

    return run


def _problem(lines: list[str], path: str, *words: str) -> bool:
    return any(path in ln and all(w in ln for w in words) for ln in lines)


def test_the_tiny_spec_validates(validate, make_spec):
    assert validate(make_spec()) == (0, [])


def _with(spec: dict, dotted: str, value) -> dict:
    node = spec
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[keys[-1]] = value
    return spec


RANGES = [
    ("train.batch_size", 0),
    ("train.grad_accum", 0),
    ("train.log_every", 0),
    ("train.steps", 0),
    ("train.keep_checkpoints", 0),
    ("train.checkpoint_every", -1),
    ("train.grad_clip", -1.0),
    ("train.optimizer.lr", -1.0),
    ("train.optimizer.weight_decay", -0.1),
    ("eval.batches", 0),
    ("eval.every", -1),
    ("run.seed", -1),
    ("run.seed", 2**64),
    ("student.model.params.dim", 0),
    ("student.model.params.layers", 0),
    ("student.model.params.heads", 0),
    ("student.model.params.kv_heads", 0),
    ("student.model.params.hidden_dim", -16),
    ("student.model.params.max_seq_len", 0),
    ("student.model.params.vocab_size", 0),
]


@pytest.mark.parametrize("dotted, value", RANGES)
def test_out_of_range_numbers_are_refused_at_their_path(validate, make_spec, dotted, value):
    code, lines = validate(_with(make_spec(), dotted, value))
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert _problem(lines, "$." + dotted), lines


def test_stage_steps_must_be_positive(validate, make_spec):
    code, lines = validate(_with(make_spec(), "train.stages", [{"steps": 0}]))
    assert code == 2 and _problem(lines, "$.train.stages[0].steps"), lines


def test_a_spec_without_losses_is_refused(validate, make_spec):
    code, lines = validate(make_spec(losses=[]))
    assert code == 2 and _problem(lines, "$.losses", "at least one loss"), lines


@pytest.mark.parametrize("literal", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "key",
    ["train.optimizer.lr", "losses.0.weight", "train.grad_clip", "data.params.val_fraction"],
)
def test_nan_and_inf_are_not_numbers_a_spec_can_hold(validate, make_spec, key, literal):
    code, lines = validate(make_spec(), f"{key}={literal}")
    dotted = "$." + key.replace(".0.", "[0].")
    assert code == 2 and _problem(lines, dotted, "finite"), lines


def test_a_nan_temperature_no_longer_passes_the_positive_check(validate, make_spec, teacher_dir):
    spec = make_spec(
        losses=[{"name": "hinton", "params": {"temperature": 1.0}}],
        teachers=[{"path": str(teacher_dir)}],
    )
    assert validate(spec)[0] == 0
    code, lines = validate(spec, "losses.0.params.temperature=nan")
    assert code == 2 and _problem(lines, "$.losses[0].params.temperature", "finite"), lines


def test_a_schedule_inside_a_schedule_is_refused(validate, make_spec):
    inner = {"schedule": "cosine", "start": 1.0, "end": 0.0}
    weight = {"schedule": "linear", "start": inner, "end": 0.0}
    code, lines = validate(make_spec(losses=[{"name": "ce", "weight": weight}]))
    assert code == 2 and _problem(lines, "$.losses[0].weight.start", "schedule"), lines


def test_unknown_keys_get_a_did_you_mean(validate, make_spec):
    spec = make_spec()
    spec["train"]["stepz"] = 3
    spec["losses"] = [{"name": "ce", "params": {"label_smoothin": 0.1}}]
    code, lines = validate(spec)
    assert code == 2, lines
    assert _problem(lines, "$.train.stepz", "unknown key", "did you mean 'steps'"), lines
    assert _problem(lines, "$.losses[0].params.label_smoothin", "did you mean 'label_smoothing'"), (
        lines
    )


def test_an_error_from_set_says_so(validate, make_spec):
    code, lines = validate(make_spec(), "train.batch_size=0")
    assert code == 2 and _problem(lines, "$.train.batch_size", "--set train.batch_size=0"), lines
    code, lines = validate(make_spec(), "train.stepz=3")
    assert code == 2 and _problem(lines, "$.train.stepz", "--set train.stepz=3"), lines
    # a problem the file itself holds does not blame --set
    spec = _with(make_spec(), "train.batch_size", 0)
    code, lines = validate(spec, "train.steps=3")
    assert code == 2 and "--set" not in lines[0], lines
    code, lines = validate(make_spec(), "data.params.path=missing.txt")
    assert code == 2 and _problem(lines, "$.data.params.path", "--set data.params.path"), lines


# ---------------------------------------------------------------- paths


def test_missing_data_teacher_and_cache_paths_are_named(validate, make_spec, tmp_path):
    spec = make_spec(
        losses=[{"name": "ce"}],
        teachers=[{"path": "no-such-teacher"}, {"cache": str(tmp_path / "no-such-cache")}],
    )
    spec["data"]["params"]["path"] = "no-such-data.txt"
    code, lines = validate(spec)
    assert code == 2, lines
    assert _problem(lines, "$.data.params.path", "no-such-data.txt", "not found"), lines
    assert _problem(lines, "$.teachers[0].path", "no-such-teacher", "not found"), lines
    assert _problem(lines, "$.teachers[1].cache", "no-such-cache", "not found"), lines


def test_a_path_beside_a_cache_names_its_origin_and_must_exist(
    validate, make_spec, teacher_dir, tmp_path
):
    # the run reads the cache and checks it was made from that folder (test_cache_provenance)
    spec = make_spec(teachers=[{"path": str(teacher_dir), "cache": str(tmp_path)}])
    code, lines = validate(spec)
    assert code == 0, lines
    spec = make_spec(teachers=[{"path": "no-such-teacher", "cache": str(tmp_path)}])
    code, lines = validate(spec)
    assert code == 2, lines
    assert _problem(lines, "$.teachers[0].path", "no-such-teacher", "not found"), lines


def test_distill_refuses_a_missing_data_file_before_writing(make_spec, tmp_path):
    spec = make_spec()
    spec["data"]["params"]["path"] = str(tmp_path / "gone.txt")
    with pytest.raises(kdcore.SpecError, match=r"\$\.data\.params\.path"):
        app.distill(app.load_spec(spec), output=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- parameter groups


def test_a_parameter_group_that_matches_nothing_is_refused(validate, make_spec):
    spec = make_spec()
    spec["train"]["param_groups"] = [
        {"pattern": r"student\.blocks\.0\.", "lr_mult": 0.5},
        {"pattern": "atention", "lr_mult": 0.0},
    ]
    code, lines = validate(spec)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert _problem(lines, "$.train.param_groups[1].pattern", "atention", "matches no"), lines


def test_a_stage_parameter_group_is_checked_too(validate, make_spec):
    spec = make_spec()
    spec["train"]["stages"] = [
        {"steps": 2, "param_groups": [{"pattern": "embed"}]},
        {"steps": 2, "param_groups": [{"pattern": "^blocks"}]},  # paths start with student.
    ]
    code, lines = validate(spec)
    assert code == 2 and len(lines) == 1, lines
    assert _problem(lines, "$.train.stages[1].param_groups[0].pattern", "^blocks"), lines


def test_a_bad_regex_is_refused_at_validate(validate, make_spec):
    spec = make_spec()
    spec["train"]["param_groups"] = [{"pattern": "blocks.(0"}]
    code, lines = validate(spec)
    assert code == 2 and _problem(lines, "$.train.param_groups[0].pattern", "regex"), lines


# ---------------------------------------------------------------- tail-bucket temperature


SEQ = 16


@pytest.fixture(scope="module")
def cache_world(tmp_path_factory):
    """A random byte-level teacher and its k=8 cache captured at Tc=1."""
    from kdcore.cache.write import write_cache
    from kdcore.models.io import save_model
    from kdcore.models.transformer import Transformer, TransformerConfig
    from kdcore.tokenizers.simple import ByteTokenizer, save_tokenizer

    root = tmp_path_factory.mktemp("validate-cache")
    corpus = Path(__file__).resolve().parents[1] / "examples/shakespeare/data/tinyshakespeare.txt"
    data = root / "data.txt"
    data.write_text(corpus.read_text(encoding="utf-8")[:2000], encoding="utf-8")
    mx.random.seed(0)
    config = TransformerConfig(vocab_size=256, dim=16, layers=1, heads=2, max_seq_len=SEQ)
    save_model(Transformer(config), root / "teacher", "transformer", config)
    save_tokenizer(ByteTokenizer(), root / "teacher")
    base = cache_spec(data, [{"path": str(root / "teacher")}])
    for k, tc in ((8, 1.0), (256, 1.0)):
        out = root / f"cache-k{k}"
        write_cache(app.load_spec(base), out, top_k=k, temperature=tc, progress=False)
    return {"data": data, "root": root}


def cache_spec(data: Path, teachers: list[dict], losses: list[dict] | None = None) -> dict:
    return {
        "data": {"name": "text", "params": {"path": str(data), "seq_len": SEQ}},
        "student": {
            "model": {
                "name": "transformer",
                "params": {"dim": 16, "layers": 1, "heads": 2, "max_seq_len": SEQ},
            }
        },
        "teachers": teachers,
        "losses": losses or [{"name": "ce"}],
        "train": {"steps": 4, "batch_size": 2},
        "eval": {"batches": 1},
    }


def _hinton(temperature, tail: str = "tail-bucket") -> list[dict]:
    return [{"name": "hinton", "params": {"temperature": temperature, "tail": tail}}]


def test_tail_bucket_at_another_temperature_than_the_capture_is_refused(validate, cache_world):
    cache = str(cache_world["root"] / "cache-k8")
    spec = cache_spec(cache_world["data"], [{"cache": cache}], _hinton(2.0))
    code, lines = validate(spec)
    assert code == 2, lines
    assert _problem(lines, "$.losses[0].params.temperature", "tail-bucket", "1", "2"), lines
    with pytest.raises(kdcore.SpecError, match="tail-bucket"):
        app.distill(app.load_spec(spec), output=cache_world["root"] / "r", progress=False)
    assert not (cache_world["root"] / "r").exists()


def test_a_scheduled_temperature_that_leaves_the_capture_temperature_is_refused(
    validate, cache_world
):
    cache = str(cache_world["root"] / "cache-k8")
    moving = {"schedule": "linear", "start": 1.0, "end": 2.0}
    code, lines = validate(cache_spec(cache_world["data"], [{"cache": cache}], _hinton(moving)))
    assert code == 2 and _problem(lines, "$.losses[0].params.temperature", "schedule"), lines


@pytest.mark.parametrize(
    "cache, losses",
    [
        ("cache-k8", _hinton(1.0)),  # at the capture temperature
        ("cache-k8", _hinton(2.0, "renormalize")),  # exact at every temperature
        ("cache-k8", _hinton({"schedule": "constant", "value": 1.0})),
        ("cache-k256", _hinton(2.0)),  # k = V: no tail, exact
    ],
)
def test_tail_bucket_combinations_that_are_exact_validate(validate, cache_world, cache, losses):
    spec = cache_spec(cache_world["data"], [{"cache": str(cache_world["root"] / cache)}], losses)
    assert validate(spec) == (0, [])


def test_a_mixture_of_caches_reads_each_with_a_tail_bucket(validate, cache_world):
    """The sparse mixture re-tempers every member's tail as one class, whatever ``tail``."""
    cache = str(cache_world["root"] / "cache-k8")
    teachers = [{"cache": cache}, {"cache": cache}]
    losses = _hinton(2.0, "renormalize")
    code, lines = validate(cache_spec(cache_world["data"], teachers, losses))
    assert code == 2 and _problem(lines, "$.losses[0].params.temperature", "mixture"), lines
    ok = cache_spec(cache_world["data"], teachers, _hinton(1.0, "renormalize"))
    assert validate(ok) == (0, [])


# ---------------------------------------------------------------- validate == distill (issue 30)


def _bare(lines: list[str]) -> list[str]:
    """``kd validate``'s stderr lines without the ``error: SPEC: `` its first one starts with."""
    return [ln.split(".toml: ", 1)[1] if ln.startswith("error: ") else ln for ln in lines]


def _distill_problems(spec: dict, out: Path) -> list[str]:
    """The problem lines ``kd distill`` refuses ``spec`` with (it must write nothing)."""
    with pytest.raises(kdcore.SpecError) as err:
        app.distill(app.load_spec(spec), output=out, progress=False)
    assert not out.exists()
    return err.value.problems


def _cache_run(cache_world, init: dict, **model_params) -> dict:
    cache = str(cache_world["root"] / "cache-k8")
    spec = cache_spec(cache_world["data"], [{"cache": cache}], _hinton(1.0))
    spec["student"]["init"] = init
    spec["student"]["model"]["params"].update(model_params)
    return spec


REFUSED_AT_BUILD = {
    # a top-k cache holds no weights to copy
    "from-teacher beside a cache": ({"name": "from-teacher"}, "$.student.init.params.teacher"),
    "quantize from a cached teacher": (
        {"name": "quantize", "params": {"start": "teacher"}},
        "$.student.init.params.teacher",
    ),
    # auto quantizes the teacher's copy when the student is fresh: none to copy here
    "quantize auto, fresh student, cached teacher": (
        {"name": "quantize"},
        "$.student.init.params.teacher",
    ),
    # was an IndexError inside the build
    "from-teacher of a teacher the spec lacks": (
        {"name": "from-teacher", "params": {"teacher": 3}},
        "$.student.init.params.teacher",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_AT_BUILD))
def test_validate_refuses_what_distill_refuses_while_building(
    validate, cache_world, tmp_path, case
):
    init, path = REFUSED_AT_BUILD[case]
    spec = _cache_run(cache_world, init)
    code, lines = validate(spec)
    assert code == 2 and _problem(lines, path, "teachers["), lines
    # the same words from both commands: one check, shared
    refused = _distill_problems(spec, tmp_path / "run")
    assert [line for line in refused if path in line] == [ln for ln in _bare(lines) if path in ln]


def test_the_refusal_names_the_folder_the_cache_was_made_from(validate, cache_world):
    code, lines = validate(_cache_run(cache_world, {"name": "from-teacher"}))
    teacher = str(cache_world["root"] / "teacher")
    assert code == 2 and _problem(lines, "$.student.init.params.teacher", "teacher_path", teacher)


def test_a_student_the_model_component_refuses_is_refused_by_validate_too(
    validate, cache_world, tmp_path
):
    pytest.importorskip("mlx_lm")
    spec = cache_spec(cache_world["data"], [], None)
    spec["student"]["model"] = {"name": "mlx-lm", "params": {}}  # neither path nor config
    code, lines = validate(spec)
    assert code == 2 and _problem(lines, "$.student.model.params", "path", "config"), lines
    assert any("$.student.model.params" in ln for ln in _distill_problems(spec, tmp_path / "r"))


def test_checkpoint_layers_on_a_model_without_them_is_refused_by_both(
    validate, make_spec, tmp_path
):
    import attrs
    import mlx.nn as nn

    from kdcore import testing

    @attrs.define
    class PlainConfig:
        vocab_size: int = 256

    class Plain(nn.Module):  # no checkpoint_layers attribute
        def __init__(self, config):
            super().__init__()
            self.embed = nn.Embedding(config.vocab_size, 8)

    class Plugin:
        @kdcore.hookimpl
        def kd_models(self):
            return [kdcore.Component("plain", lambda c, s: Plain(c), PlainConfig, doc="plain")]

    spec = make_spec()
    spec["student"]["model"] = {"name": "plain"}
    spec["train"]["checkpoint_layers"] = True
    with testing.plugins(Plugin()):
        code, lines = validate(spec)
        assert code == 2 and _problem(lines, "$.train.checkpoint_layers", "plain"), lines
        assert _distill_problems(spec, tmp_path / "r") == _bare(lines)


def test_from_teacher_beside_a_cache_trains_from_the_named_folder(validate, cache_world, tmp_path):
    from mlx.utils import tree_flatten

    from kdcore.models.io import load_model

    teacher = cache_world["root"] / "teacher"
    init = {"name": "from-teacher", "params": {"teacher_path": str(teacher)}}
    spec = _cache_run(cache_world, init)
    assert validate(spec) == (0, [])
    run = kdcore.testing.build_run(spec)
    # the student starts as the teacher (same shapes here): every tensor copied
    taught = dict(tree_flatten(load_model(teacher)[0].parameters()))
    for name, value in tree_flatten(run.student.parameters()):
        assert mx.array_equal(value, taught[name]).item(), name
    summary = app.distill(app.load_spec(spec), output=tmp_path / "run", progress=False)
    assert summary["steps"] == 4 and summary["eval"]["val_loss"] > 0
    assert summary["init"]["from"] == "teacher"
    assert summary["init"]["teacher_path"] == str(teacher)
    assert summary["init"]["initialised_tensors"] == len(taught)
    # a folder that is not there is named at its path, by validate as by distill
    spec["student"]["init"]["params"]["teacher_path"] = str(tmp_path / "nowhere")
    code, lines = validate(spec)
    assert code == 2 and _problem(lines, "$.student.init.params.teacher_path", "nowhere"), lines
    assert _distill_problems(spec, tmp_path / "r2") == _bare(lines)
