"""The teacher deployment when the teacher cannot load: a bad checkpoint or layer fails the build with the kdcore
error (nothing deployed), and a replica that cannot load surfaces its error and leaves no app behind. (A replica
killed in the middle of a stream: tests/onray/test_teacher_serve.py.)"""

from __future__ import annotations

import time

import pytest

from kdcore.errors import LayerNotFoundError, ModelLoadError
from kdcore.spec import JobSpec

pytestmark = pytest.mark.ray


def _job(model: dict, **teacher) -> JobSpec:
    return JobSpec.from_dict({
        "name": "fail",
        "teacher": {"model": model, "taps": ["embed", "block3"], **teacher},
        "student": {"model": {"kind": "factory", "target": "kdcore.zoo:digits_cnn", "kwargs": {"width": 4}},
                    "pairs": [{"name": "feat", "student": "embed", "teacher": "embed"}]},
        "losses": [{"kind": "ce"}, {"kind": "kd"}, {"kind": "hint", "pair": "feat"}],
        "data": {"source": {"kind": "sklearn_digits"}, "batch_size": 64},
        "features": {"mode": "stream", "stream": {"payload": "raw", "dtype": "fp32", "prefetch": 4}},
        "train": {"epochs": 1, "num_workers": 0, "seed": 5},
        "ray": {"namespace": "kd-test"},
    })


DIGITS = {"kind": "factory", "target": "kdcore.zoo:digits_cnn", "kwargs": {"width": 8}}


def _leftovers(name: str) -> tuple[list[str], list[str]]:
    import ray
    from ray import serve

    apps = [a for a in serve.status().applications if a == name]
    actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["name"].startswith(f"kd-projector-{name}-") or a["name"].startswith(f"SERVE_REPLICA::{name}#")]
    return apps, actors


def test_bad_checkpoint_or_layer_fails_the_build_with_the_kdcore_error(ray_clean, tmp_path):
    from services.teacher.app import build_teacher_app, run_teacher_app

    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ModelLoadError, match="checkpoint not found"):
        build_teacher_app(_job(DIGITS, checkpoint=missing))
    with pytest.raises(ModelLoadError, match="checkpoint not found"):
        run_teacher_app(_job(DIGITS, checkpoint=missing), name="kd-teacher-bad")
    assert _leftovers("kd-teacher-bad") == ([], [])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        build_teacher_app(_job(DIGITS, checkpoint=str(garbage)))
    job = _job(DIGITS)
    bad_tap = job.model_copy(update={"teacher": job.teacher.model_copy(update={"taps": ["embed", "blok3"]})})
    with pytest.raises(LayerNotFoundError, match="blok3") as e:
        run_teacher_app(bad_tap, name="kd-teacher-bad")
    assert "block3" in e.value.candidates
    assert _leftovers("kd-teacher-bad") == ([], [])


def test_replica_that_cannot_load_surfaces_its_error_and_leaves_no_app(ray_clean, tmp_path):
    """Validation skipped (as when the checkpoint is only on the worker nodes): the replica's own error comes
    back from run_teacher_app, quickly, and the app is gone."""
    from services.teacher.app import run_teacher_app

    job = _job(DIGITS, checkpoint=str(tmp_path / "only-on-workers.safetensors"))
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"teacher replica failed to start: checkpoint not found: .*only-on-workers"):
        run_teacher_app(job, name="kd-teacher-bad-replica", validate=False, timeout_s=180, constructor_retries=1)
    assert time.perf_counter() - t0 < 120
    assert _leftovers("kd-teacher-bad-replica") == ([], [])
