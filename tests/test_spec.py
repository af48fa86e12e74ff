"""Job specs: examples validate, every kind of mistake is reported with its path and a fix, all at once."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import yaml

from kdcore.errors import SpecError
from kdcore.spec import JobSpec
from kdcore.spec.sweep import SweepSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

GOOD = {
    "name": "t",
    "teacher": {"model": {"kind": "factory", "target": "kdcore.zoo:digits_cnn"}, "taps": ["embed", "block3"]},
    "student": {
        "model": {"kind": "factory", "target": "kdcore.zoo:digits_cnn", "kwargs": {"width": 4}},
        "pairs": [{"name": "feat", "student": "embed", "teacher": "embed"}],
    },
    "losses": [{"kind": "ce"}, {"kind": "kd"}, {"kind": "hint", "pair": "feat"}],
    "data": {"source": {"kind": "sklearn_digits"}},
}


def _with(path: str, value, base=GOOD):
    d = copy.deepcopy(base)
    keys = path.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur[int(k)] if isinstance(cur, list) else cur.setdefault(k, {})
    if value is _DELETE:
        del cur[keys[-1]]
    elif isinstance(cur, list):
        cur[int(keys[-1])] = value
    else:
        cur[keys[-1]] = value
    return d


_DELETE = object()


def _problems(data) -> list:
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict(data)
    return e.value.problems


def test_good_spec_loads_with_defaults():
    job = JobSpec.from_dict(GOOD)
    assert job.features.mode == "online"
    assert job.student.pairs[0].projector.kind == "linear"
    assert job.pair("feat").projector.resolved_out_dim(128) == 128
    assert job.student.tapped_layers() == ["embed"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_and_name_their_command(path):
    text = path.read_text()
    assert text.startswith("#") and "kd " in text.splitlines()[0] + text.splitlines()[1], "examples open with the command"
    data = yaml.safe_load(text)
    if "variants" in data:
        SweepSpec.from_yaml(path).jobs()
    else:
        JobSpec.from_yaml(path)


BAD = [
    # (id, data, expected path, a word the message or fix must contain)
    ("unknown-top-key", _with("epochz", 3), "epochz", "unknown key"),
    ("unknown-nested-key-suggests", _with("train.optimiser", {"kind": "sgd"}), "train.optimiser", "optimizer"),
    ("wrong-type", _with("data.batch_size", "many"), "data.batch_size", "integer"),
    ("bad-enum", _with("features.mode", "fast"), "features.mode", "online"),
    ("bad-model-kind", _with("teacher.model.kind", "hub"), "teacher.model.kind", "factory"),
    ("bad-loss-kind", _with("losses.1", {"kind": "mlkd"}), "losses.1.kind", "crd"),
    ("bad-target-form", _with("teacher.model.target", "no_colon"), "teacher.model.target", "package.module:function"),
    ("missing-required", _with("data", _DELETE), "data", "required"),
    ("missing-pair-layer", _with("student.pairs.0.teacher", "embedd"), "student.pairs.0.teacher", "embed"),
    ("unknown-loss-pair", _with("losses.2.pair", "fet"), "losses.2.pair", "feat"),
    ("negative-weight", _with("losses.0.weight", -1.0), "losses.0.weight", "greater than or equal"),
    ("bad-dims", _with("student.pairs.0.projector.out_dim", 0), "student.pairs.0.projector.out_dim", "greater than 0"),
    ("crd-nce-k-too-big", _with("losses.2", {"kind": "crd", "pair": "feat", "params": {"nce_k": 5000}}),
     "losses.2.params.nce_k", "smaller than"),
    ("projected-stream-crd", _with("losses.2", {"kind": "crd", "pair": "feat", "params": {"nce_k": 100}},
                                   _with("features", {"mode": "stream", "stream": {"payload": "projected"}})),
     "losses.2.kind", "payload: raw"),
    ("cache-needs-uri", _with("features", {"mode": "cache"}), "features.cache.uri", "s3://"),
    ("labeled-fraction-range", _with("data.labeled_fraction", 1.5), "data.labeled_fraction", "less than or equal"),
    ("views-without-augment", _with("data.views", 4), "data.views", "augment"),
    ("all-weights-zero", _with("losses", [{"kind": "ce", "weight": 0}]), "losses", "weight > 0"),
    ("duplicate-pair", _with("student.pairs", [{"name": "feat", "student": "embed", "teacher": "embed"}] * 2),
     "student.pairs.1.name", "duplicate"),
    ("bad-job-name", _with("name", "My Job"), "name", "lowercase"),
    ("serve-starves-batching", _with("teacher.serve", {"max_batch_size": 64, "max_ongoing_requests": 5}),
     "teacher.serve.max_ongoing_requests", "at least 64"),
    ("autoscaling-order", _with("teacher.serve", {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}),
     "teacher.serve.autoscaling.max_replicas", "at least 3"),
    ("labeled-rows-range", _with("data.labeled_rows", [0, 5000]), "data.labeled_rows", "beyond"),
    ("duplicate-term", _with("losses", [{"kind": "kd"}, {"kind": "kd"}]), "losses.1", "merge"),
    ("bad-activation", _with("student.pairs.0.projector.activation", "tanh"), "student.pairs.0.projector.activation",
     "gelu"),
    ("not-a-mapping", ["a", "list"], "", "mapping"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_spec_names_field_and_fix(case):
    _, data, path, word = case
    problems = _problems(data)
    match = [p for p in problems if p.path == path]
    assert match, f"no problem at {path!r}; got {[str(p) for p in problems]}"
    assert word.lower() in str(match[0]).lower(), str(match[0])


def test_every_problem_is_reported_at_once():
    data = _with("data.batch_size", "x", _with("train.epochs", 0, _with("features.mode", "fast")))
    paths = {p.path for p in _problems(data)}
    assert {"data.batch_size", "train.epochs", "features.mode"} <= paths


def test_every_cross_field_problem_is_reported_at_once():
    data = _with("losses.2.pair", "nope", _with("student.pairs.0.teacher", "block2", _with("features", {"mode": "cache"})))
    paths = {p.path for p in _problems(data)}
    assert {"losses.2.pair", "student.pairs.0.teacher", "features.cache.uri"} <= paths


def test_yaml_syntax_error_is_a_spec_error(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("name: [unclosed\n")
    with pytest.raises(SpecError) as e:
        JobSpec.from_yaml(f)
    assert "line" in str(e.value.lines()[0])


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        JobSpec.from_yaml(tmp_path / "nope.yaml")


def test_every_field_has_a_description():
    schema = JobSpec.model_json_schema()
    missing = []
    for name, model in schema["$defs"].items():
        for field, prop in model.get("properties", {}).items():
            if "description" not in prop:
                missing.append(f"{name}.{field}")
    for field, prop in schema["properties"].items():
        if "description" not in prop:
            missing.append(f"JobSpec.{field}")
    assert not missing, missing


def test_spec_error_pickles_with_its_problems():
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict(_with("losses.2.pair", "fet"))
    clone = pickle.loads(pickle.dumps(e.value))
    assert type(clone) is SpecError and clone.problems == e.value.problems and clone.exit_code == 2


def test_roundtrip_yaml(tmp_path):
    job = JobSpec.from_dict(GOOD)
    f = tmp_path / "job.yaml"
    f.write_text(job.to_yaml())
    assert JobSpec.from_yaml(f) == job


def test_sweep_expands_variants_and_seeds(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(GOOD))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "seeds": [0, 1],
        "variants": [{"name": "vanilla", "losses": [{"kind": "ce"}]}, {"name": "kd"}],
    }))
    runs = SweepSpec.from_yaml(tmp_path / "sweep.yaml").jobs()
    assert [(v, s) for v, s, _ in runs] == [("vanilla", 0), ("vanilla", 1), ("kd", 0), ("kd", 1)]
    assert runs[0][2].loss_kinds() == ["ce"] and runs[3][2].train.seed == 1
    assert len({j.name for _, _, j in runs}) == 4


def test_sweep_variant_problems_name_the_variant(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(GOOD))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "variants": [{"name": "broken", "losses": [{"kind": "hint", "pair": "nope"}]}]}))
    with pytest.raises(SpecError) as e:
        SweepSpec.from_yaml(tmp_path / "sweep.yaml").jobs()
    assert any("broken" in p.path and p.path.endswith("losses.0.pair") for p in e.value.problems)
