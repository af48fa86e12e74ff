"""A run directory belongs to one spec: a rerun of the same spec resumes, even when its job.yaml was written before
the spec gained fields; a changed spec is refused, naming what changed."""

from __future__ import annotations

import pytest
import yaml

from kdcore.errors import UserError
from kdcore.spec import JobSpec

JOB = {
    "name": "rundir",
    "teacher": {"model": {"kind": "factory", "target": "kdcore.zoo:digits_cnn"}, "taps": ["embed"]},
    "student": {"model": {"kind": "factory", "target": "kdcore.zoo:digits_cnn", "kwargs": {"width": 4}},
                "pairs": [{"name": "feat", "student": "embed", "teacher": "embed"}]},
    "losses": [{"kind": "kd"}, {"kind": "hint", "pair": "feat"}],
    "data": {"source": {"kind": "sklearn_digits"}},
}


def _drop_new_fields(d: dict) -> dict:
    """job.yaml as an older kd wrote it: without the fields multi-teacher jobs added."""
    d.pop("teachers", None)
    for p in d["student"]["pairs"]:
        p.pop("teacher_model", None)
    for loss in d["losses"]:
        loss.pop("teacher", None)
    return d


def test_an_older_job_yaml_of_the_same_spec_resumes_and_a_changed_one_is_refused(tmp_path):
    from services.trainer.driver import claim_run_dir

    job = JobSpec.from_dict(JOB)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(_drop_new_fields(yaml.safe_load(job.to_yaml()))))
    claim_run_dir(job, tmp_path)  # the same spec: no error
    changed = JobSpec.from_dict({**JOB, "train": {"optimizer": {"kind": "adam", "lr": 0.5}}})
    with pytest.raises(UserError, match=r"different spec \(changed: train\)"):
        claim_run_dir(changed, tmp_path)
