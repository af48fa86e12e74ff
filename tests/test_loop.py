"""The distiller, the export and the plain local training loop (no Ray)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kdcore.distiller import Distiller, probe_shapes
from kdcore.export import load_student
from kdcore.loop import build_session, load_split, train_local
from kdcore.teacher_train import train_teacher_local
from kdcore.spec import JobSpec
from kdcore.teacher import TeacherRunner
from kdcore.zoo import digits_cnn


def _job(d, **changes):
    d = copy.deepcopy(d)
    for k, v in changes.items():
        d[k] = v
    return JobSpec.from_dict(d)


def _distiller(job, n_data=100):
    torch.manual_seed(0)
    student, teacher = digits_cnn(4), digits_cnn(8)
    x = torch.randn(2, 1, 8, 8)
    s_shapes = probe_shapes(student, job.student.tapped_layers(), x)
    t_shapes = probe_shapes(teacher, job.teacher.taps, x)
    return Distiller(student, job.student.pairs, job.losses, s_shapes, t_shapes, n_data=n_data), \
        TeacherRunner(teacher, job.teacher.taps)


def test_total_is_weighted_sum_and_ce_uses_labeled_rows_only(digits_job):
    digits_job["losses"] = [{"kind": "ce", "weight": 0.5}, {"kind": "kd", "weight": 2.0},
                            {"kind": "hint", "pair": "feat", "weight": 3.0}]
    d, teacher = _distiller(JobSpec.from_dict(digits_job))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    labeled = torch.tensor([True, False] * 4)
    total, parts, logits = d(x, teacher(x), y, labeled, torch.arange(8))
    assert set(parts) == {"ce", "kd", "hint/feat"}
    expected = 0.5 * parts["ce"] + 2.0 * parts["kd"] + 3.0 * parts["hint/feat"]
    assert torch.allclose(total, expected, atol=1e-6)
    assert torch.allclose(parts["ce"], F.cross_entropy(logits[labeled], y[labeled]).detach(), atol=1e-6)
    # a batch without labels has no task term at all
    _, parts, _ = d(x, teacher(x), y, torch.zeros(8, dtype=torch.bool), torch.arange(8))
    assert "ce" not in parts


def test_every_loss_kind_runs_through_the_distiller(digits_job):
    digits_job["student"]["pairs"] = [
        {"name": "feat", "student": "embed", "teacher": "embed"},
        {"name": "both", "student": "embed", "teacher": "embed", "projector": {"kind": "mlp", "sides": "both"}},
        {"name": "map", "student": "block3", "teacher": "block3", "projector": {"kind": "conv"}},
    ]
    digits_job["losses"] = [{"kind": "ce"}, {"kind": "kd"}, {"kind": "hint", "pair": "map"},
                            {"kind": "cosine", "pair": "feat"}, {"kind": "pkt", "pair": "feat"},
                            {"kind": "sp", "pair": "map"}, {"kind": "rkd", "pair": "both"},
                            {"kind": "at", "pair": "map"}, {"kind": "infonce", "pair": "both"},
                            {"kind": "crd", "pair": "feat", "params": {"nce_k": 16}}]
    d, teacher = _distiller(JobSpec.from_dict(digits_job), n_data=32)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    total, parts, _ = d(x, teacher(x), y, torch.ones(8, dtype=torch.bool), torch.arange(8))
    assert len(parts) == 10 and all(torch.isfinite(v) for v in parts.values())
    total.backward()
    assert all(p.grad is not None for p in d.student.parameters() if p.requires_grad)
    assert "heads_t.both" in dict(d.named_modules()) and "crd.feat" in dict(d.named_modules())


def test_export_has_no_heads_and_reloads_to_identical_logits(tmp_path, digits_job):
    digits_job["losses"].append({"kind": "crd", "pair": "feat", "params": {"nce_k": 16}})
    job = JobSpec.from_dict(digits_job)
    result = train_local(job, out_dir=tmp_path / "run", progress=False, log=None)
    keys = load_file(f"{result['student_dir']}/student.safetensors").keys()
    assert keys and not any(k.startswith(("heads", "crd", "student.")) for k in keys)
    assert set(keys) == set(digits_cnn(4).state_dict().keys())
    model, meta = load_student(result["student_dir"])
    split = load_split(job)
    x = torch.from_numpy(split.x_val[:32])
    session = build_session(job, split, {"embed": (32,), "block3": (32, 4, 4), "logits": (10,)})
    from kdcore.checkpoints import load_checkpoint_file

    load_checkpoint_file(session, tmp_path / "run" / "checkpoints" / "state.pt")
    assert torch.equal(model(x), session.student.eval()(x))
    assert meta["val_acc"] == pytest.approx(result["final"]["val/acc"])


def test_local_loop_reports_each_epoch_and_resumes_bit_exact(tmp_path, digits_job):
    digits_job["train"]["epochs"] = 2
    job = JobSpec.from_dict(digits_job)
    full = train_local(job, out_dir=tmp_path / "full", progress=False, log=None)
    assert [h["epoch"] for h in full["history"]] == [1, 2]
    assert all("val/acc" in h and "loss/total" in h and "loss/kd" in h for h in full["history"])
    # interrupted after epoch 1, then rerun with the same directory: resumes at epoch 2
    one = job.model_copy(update={"train": job.train.model_copy(update={"epochs": 1})})
    train_local(one, out_dir=tmp_path / "part", progress=False, log=None)
    logs = []
    resumed = train_local(job, out_dir=tmp_path / "part", progress=False, log=logs.append)
    assert any("resumed" in line and "epoch 1" in line for line in logs)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    a = load_file(f"{full['student_dir']}/student.safetensors")
    b = load_file(f"{resumed['student_dir']}/student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_training_learns_digits(tmp_path, digits_job):
    job = _job(digits_job, train={"epochs": 3, "num_workers": 0, "optimizer": {"kind": "adam", "lr": 0.01}})
    r = train_teacher_local(job, out_path=tmp_path / "t.safetensors", progress=False, log=None)
    assert r["final"]["val/acc"] > 0.8
    job2 = _job(digits_job, teacher={**digits_job["teacher"], "checkpoint": str(tmp_path / "t.safetensors")})
    from kdcore.loop import build_teacher

    runner = build_teacher(job2, device="cpu")
    split = load_split(job2)
    pred = runner(torch.from_numpy(split.x_val))["logits"].argmax(1).numpy()
    assert np.mean(pred == split.y_val) == pytest.approx(r["final"]["val/acc"])
