"""Multi-teacher job specs: teacher xor teachers, names, pairs and logit losses checked against the right teacher."""

from __future__ import annotations

import copy

import pytest
from mt_jobs import two_teacher_job

from kdcore.errors import SpecError
from kdcore.spec import JobSpec


def _problems(data) -> list:
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict(data)
    return e.value.problems


def _at(problems, path: str):
    match = [p for p in problems if p.path == path]
    assert match, f"no problem at {path!r}; got {[str(p) for p in problems]}"
    return str(match[0])


def test_two_teachers_load_with_names_weights_and_per_teacher_caches(tmp_path):
    job = JobSpec.from_dict(two_teacher_job(tmp_path, mode="cache"))
    assert job.multi_teacher and job.teacher is None
    assert job.teacher_names() == ["cnn", "mlp"]
    assert job.teacher_weights() == {"cnn": 1.0, "mlp": 0.5}
    assert job.teacher_cache_uri("cnn") == str(tmp_path / "cache" / "cnn")
    assert [job.pair_teacher(p) for p in job.student.pairs] == ["cnn", "mlp"]  # teacher_model, default the first
    assert [job.loss_teacher(loss) for loss in job.losses] == [None, "mean", "mlp", None, None]


def test_single_teacher_specs_are_unchanged(digits_job):
    job = JobSpec.from_dict(digits_job)
    assert not job.multi_teacher and job.teacher_names() == ["teacher"]
    assert job.for_teacher("teacher") is job and job.view_of is None
    assert job.loss_teacher(job.losses[1]) == "teacher" and job.pair_teacher(job.student.pairs[0]) == "teacher"
    # a single teacher may be named by its implicit name, nothing else
    digits_job["losses"][1]["teacher"] = "teacher"
    digits_job["student"]["pairs"][0]["teacher_model"] = "teacher"
    JobSpec.from_dict(digits_job)


def test_for_teacher_is_a_valid_single_teacher_job_of_what_that_teacher_feeds(tmp_path):
    job = JobSpec.from_dict(two_teacher_job(tmp_path, mode="cache"))
    mlp = job.for_teacher("mlp")
    assert mlp.view_of == "mlp" and not mlp.multi_teacher
    assert mlp.teacher.model.target == "kdcore.zoo:mlp" and mlp.teacher.taps == ["hidden"]
    assert not hasattr(mlp.teacher, "weight")  # a plain TeacherSpec
    assert mlp.features.cache.uri == str(tmp_path / "cache" / "mlp")
    assert [p.name for p in mlp.student.pairs] == ["hid"] and mlp.student.pairs[0].teacher_model is None
    # ce, the averaged kd (mlp feeds it), mlp's own dkd (teacher cleared), the pair on mlp
    assert [(loss.kind, getattr(loss, "teacher", None)) for loss in mlp.losses] == \
        [("ce", None), ("kd", None), ("dkd", None), ("cosine", None)]
    cnn = job.for_teacher("cnn")
    assert [loss.kind for loss in cnn.losses] == ["ce", "kd", "hint"]
    # the view survives making its paths absolute (what the cache build does first)
    from kdcore.spec.paths import resolve_paths

    assert resolve_paths(mlp).view_of == "mlp"
    with pytest.raises(KeyError):
        job.for_teacher("nope")


def test_a_teacher_cache_uri_overrides_the_default(tmp_path):
    d = two_teacher_job(tmp_path, mode="cache")
    d["teachers"][1]["cache_uri"] = str(tmp_path / "elsewhere")
    job = JobSpec.from_dict(d)
    assert job.teacher_cache_uri("mlp") == str(tmp_path / "elsewhere")
    assert job.for_teacher("mlp").features.cache.uri == str(tmp_path / "elsewhere")
    # every teacher with its own cache_uri: features.cache.uri is not needed
    d["teachers"][0]["cache_uri"] = str(tmp_path / "c0")
    del d["features"]["cache"]["uri"]
    JobSpec.from_dict(d)


BAD = [
    # (id, change, path, words the message or fix must contain)
    ("both", lambda d: d.update(teacher={"model": d["teachers"][0]["model"], "taps": ["embed"]}), "teachers",
     ["either teacher", "not both"]),
    ("neither", lambda d: d.pop("teachers"), "teacher", ["teacher", "teachers"]),
    ("empty-list", lambda d: d.update(teachers=[]), "teachers", ["at least 1"]),
    ("duplicate-name", lambda d: d["teachers"][1].update(name="cnn"), "teachers.1.name", ["duplicate"]),
    ("reserved-name", lambda d: d["teachers"][1].update(name="mean"), "teachers.1.name", ["reserved"]),
    ("bad-name", lambda d: d["teachers"][1].update(name="a/b"), "teachers.1.name", ["pattern"]),
    ("negative-weight", lambda d: d["teachers"][1].update(weight=-1), "teachers.1.weight", ["greater than or equal"]),
    ("unknown-key", lambda d: d["teachers"][1].update(wieght=1), "teachers.1.wieght", ["weight"]),
    ("pair-unknown-teacher", lambda d: d["student"]["pairs"][1].update(teacher_model="mpl"),
     "student.pairs.1.teacher_model", ["no teacher", "'mlp'"]),
    ("pair-tap-of-other-teacher", lambda d: d["student"]["pairs"][1].update(teacher_model="cnn"),
     "student.pairs.1.teacher", ["not tapped by teacher 'cnn'", "teachers.0.taps"]),
    ("pair-default-is-the-first", lambda d: d["student"]["pairs"][1].pop("teacher_model"),
     "student.pairs.1.teacher", ["teachers.0.taps"]),
    ("pair-tap-typo", lambda d: d["student"]["pairs"][1].update(teacher="hiden"), "student.pairs.1.teacher",
     ["teachers.1.taps", "'hidden'"]),
    ("loss-unknown-teacher", lambda d: d["losses"][2].update(teacher="mpl"), "losses.2.teacher",
     ["no teacher", "'mlp'"]),
    ("loss-duplicate-on-one-teacher", lambda d: d["losses"].append({"kind": "kd", "teacher": "mean"}), "losses.5",
     ["duplicate kd"]),
    ("mean-needs-a-weight", lambda d: [t.update(weight=0) for t in d["teachers"]], "losses.1.teacher",
     ["weight > 0"]),
    ("cache-needs-a-uri", lambda d: d["features"].update(mode="cache", cache={}), "features.cache.uri",
     ["'cnn'", "cache_uri"]),
    ("shared-cache", lambda d: [t.update(cache_uri="/tmp/one") for t in d["teachers"]], "teachers.1.cache_uri",
     ["share one cache"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_multi_teacher_spec_names_field_and_fix(tmp_path, case):
    _, change, path, words = case
    d = two_teacher_job(tmp_path, mode="cache")
    change(d)
    text = _at(_problems(d), path)
    for word in words:
        assert word in text, text


def test_single_teacher_spec_refuses_other_teacher_names(digits_job):
    bad = copy.deepcopy(digits_job)
    bad["losses"][1]["teacher"] = "cnn"
    assert "one teacher, called 'teacher'" in _at(_problems(bad), "losses.1.teacher")
    bad = copy.deepcopy(digits_job)
    bad["losses"][1]["teacher"] = "mean"
    _at(_problems(bad), "losses.1.teacher")
    bad = copy.deepcopy(digits_job)
    bad["student"]["pairs"][0]["teacher_model"] = "cnn"
    assert "remove teacher_model" in _at(_problems(bad), "student.pairs.0.teacher_model")


def test_every_problem_of_a_multi_teacher_spec_is_reported_at_once(tmp_path):
    d = two_teacher_job(tmp_path)
    d["student"]["pairs"][1]["teacher_model"] = "mpl"
    d["losses"][2]["teacher"] = "cn"
    d["features"]["mode"] = "cache"
    for t in d["teachers"]:
        t["cache_uri"] = str(tmp_path / "one")
    paths = {p.path for p in _problems(d)}
    assert {"student.pairs.1.teacher_model", "losses.2.teacher", "teachers.1.cache_uri"} <= paths


def test_term_names_name_the_teacher_of_a_logit_term(tmp_path):
    from kdcore.losses.registry import term_name

    job = JobSpec.from_dict(two_teacher_job(tmp_path))
    assert [term_name(loss) for loss in job.losses] == ["ce", "kd", "dkd@mlp", "hint/feat", "cosine/hid"]


def test_schema_documents_the_multi_teacher_fields():
    schema = JobSpec.model_json_schema()
    props = schema["$defs"]["NamedTeacherSpec"]["properties"]
    assert {"name", "weight", "cache_uri", "model", "taps"} <= set(props)
    assert all("description" in p for p in props.values())
    assert "teacher_model" in schema["$defs"]["PairSpec"]["properties"]
    assert "teacher" in schema["$defs"]["KDLossSpec"]["properties"]
    assert "teachers" in schema["properties"] and "teacher" not in schema.get("required", [])
