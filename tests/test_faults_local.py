"""Bad inputs and a diverging loss, without Ray: refused with a clear line, never a NaN model that exits 0."""

from __future__ import annotations

import copy

import numpy as np
import torch
import yaml

from services.cli.main import main


def _write(tmp_path, job):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_non_finite_rows_in_the_dataset_are_refused_naming_them(tmp_path, digits_job, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 1, 8, 8)).astype(np.float32)
    x[7, 0, 3, 3] = np.nan
    x[42, 0, 0, 1] = np.inf
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 10, 120))
    job = copy.deepcopy(digits_job)
    job["data"]["source"] = {"kind": "npz", "path": str(tmp_path / "d.npz")}
    job["output"] = {"dir": str(tmp_path / "runs")}
    assert main(["train", "--local", "--quiet", str(_write(tmp_path, job))]) == 2
    err = capsys.readouterr().err
    assert "2 row(s) hold NaN or Inf" in err and "rows 7, 42" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "t" / "student").exists()


def test_a_loss_that_turns_nan_stops_with_exit_1_and_keeps_the_last_good_checkpoint(tmp_path, digits_job, capsys):
    job = copy.deepcopy(digits_job)
    # 1438 training rows / 128 = 12 steps an epoch: epoch 1 and 2 are clean, epoch 3 turns NaN at its step 4
    job["student"]["model"] = {"kind": "factory", "target": "tests.faulty_models:nan_after",
                               "kwargs": {"width": 4, "after": 28}}
    job["train"]["epochs"] = 5
    job["output"] = {"dir": str(tmp_path / "runs")}
    assert main(["train", "--local", "--quiet", str(_write(tmp_path, job))]) == 1
    err = capsys.readouterr().err
    assert "the loss is not finite at epoch 3, step 4" in err and "loss" in err, err
    assert "ce=nan" in err and "Traceback" not in err
    state = torch.load(tmp_path / "runs" / "t" / "checkpoints" / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 24
    assert all(torch.isfinite(v).all() for v in state["distiller"].values() if v.is_floating_point())
    assert not (tmp_path / "runs" / "t" / "student").exists()


def test_kd_run_refuses_student_mistakes_before_starting_ray(tmp_path, digits_job, capsys):
    import time

    job = copy.deepcopy(digits_job)
    job["output"] = {"dir": str(tmp_path / "runs")}
    bad_kwarg, bad_tap = copy.deepcopy(job), copy.deepcopy(job)
    bad_kwarg["student"]["model"]["kwargs"] = {"width": 4, "depth": 3}
    bad_tap["student"]["pairs"][0]["student"] = "embedd"
    t0 = time.perf_counter()
    assert main(["run", str(_write(tmp_path, bad_kwarg))]) == 2
    assert main(["run", str(_write(tmp_path, bad_tap))]) == 2
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    err, out = captured.err, captured.out
    assert "student.model.kwargs.depth" in err and "did you mean 'width'" in err, err
    assert "student.pairs.0.student" in err and "'embed'" in err, err
    assert seconds < 20, f"the checks took {seconds:.1f} s"
    assert "stage: check the job" in out and "Ray" not in out  # nothing was started
