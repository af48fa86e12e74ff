"""The distiller with several teachers: pairs read their teacher's layer, logit terms the named or averaged logits."""

from __future__ import annotations

import pytest
import torch
from mt_jobs import two_teacher_job

from kdcore.distiller import Distiller, probe_shapes
from kdcore.losses.dkd import dkd_loss
from kdcore.losses.hint import hint_mse
from kdcore.losses.kd import kd_kl
from kdcore.spec import JobSpec
from kdcore.teacher import TeacherRunner, TeacherSet, mean_logits
from kdcore.zoo import digits_cnn, mlp


def _logits(seed: int, b: int = 6, c: int = 10) -> torch.Tensor:
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed)) * 3


def test_mean_logits_is_the_weight_normalised_average():
    za, zb, zc = _logits(1), _logits(2), _logits(3)
    feats = {"a/logits": za, "b/logits": zb, "c/logits": zc}
    got = mean_logits(feats, {"a": 1.0, "b": 3.0, "c": 0.0})  # a weight-0 teacher takes no part
    assert torch.allclose(got, (1.0 * za + 3.0 * zb) / 4.0, atol=1e-6)
    assert torch.allclose(mean_logits(feats, {"a": 2.0}), za, atol=1e-6)
    with pytest.raises(ValueError, match="weight > 0"):
        mean_logits(feats, {"a": 0.0})
    with pytest.raises(ValueError, match="class count"):
        mean_logits({"a/logits": za, "b/logits": za[:, :5]}, {"a": 1.0, "b": 1.0})


def _two_teacher_distiller(d: dict, weights: dict[str, float]):
    job = JobSpec.from_dict(d)
    torch.manual_seed(0)
    student = digits_cnn(4)
    x = torch.randn(2, 1, 8, 8)
    teachers = TeacherSet({"cnn": TeacherRunner(digits_cnn(8), ["embed", "block3"], device="cpu"),
                           "mlp": TeacherRunner(mlp(hidden=48), ["hidden"], device="cpu")})
    s_shapes = probe_shapes(student, job.student.tapped_layers(), x)
    t_shapes = teachers.shapes(x)
    assert set(t_shapes) == {"cnn/embed", "cnn/block3", "cnn/logits", "mlp/hidden", "mlp/logits"}
    assert t_shapes["mlp/hidden"] == (48,) and t_shapes["cnn/embed"] == (32,)
    return job, Distiller(student, job.student.pairs, job.losses, s_shapes, t_shapes, n_data=64, teachers=weights)


def test_averaged_named_logits_and_per_teacher_pairs_on_fixed_tensors():
    d = two_teacher_job(losses=[{"kind": "kd", "weight": 1.0, "params": {"temperature": 2.0}},
                                {"kind": "kd", "weight": 2.0, "teacher": "mlp", "params": {"temperature": 2.0}},
                                {"kind": "dkd", "teacher": "cnn"},
                                {"kind": "hint", "weight": 1.0, "pair": "feat"},
                                {"kind": "hint", "weight": 1.0, "pair": "hid"}])
    d["teachers"][1]["weight"] = 3.0
    job, dist = _two_teacher_distiller(d, {"cnn": 1.0, "mlp": 3.0})
    # heads are sized from each teacher's shapes: feat -> cnn's embed (32), hid -> mlp's hidden (48)
    assert dist.heads_s["feat"].out_dim == 32 and dist.heads_s["hid"].out_dim == 48
    b = 6
    x = torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 10, (b,), generator=torch.Generator().manual_seed(6))
    z_cnn, z_mlp = _logits(7, b), _logits(8, b)
    f_cnn, f_mlp = torch.randn(b, 32), torch.randn(b, 48)
    teacher = {"cnn/logits": z_cnn, "mlp/logits": z_mlp, "cnn/embed": f_cnn, "cnn/block3": torch.randn(b, 32, 4, 4),
               "mlp/hidden": f_mlp}
    dist.eval()
    total, parts, s_logits = dist(x, teacher, y, torch.ones(b, dtype=torch.bool), torch.arange(b))
    assert set(parts) == {"kd", "kd@mlp", "dkd@cnn", "hint/feat", "hint/hid"}
    mean = (1.0 * z_cnn + 3.0 * z_mlp) / 4.0
    assert torch.allclose(parts["kd"], kd_kl(s_logits.detach(), mean, 2.0), atol=1e-6)
    assert torch.allclose(parts["kd@mlp"], kd_kl(s_logits.detach(), z_mlp, 2.0), atol=1e-6)
    p = job.losses[2].params
    assert torch.allclose(parts["dkd@cnn"], dkd_loss(s_logits.detach(), z_cnn, y, p.alpha, p.beta, p.temperature),
                          atol=1e-5)
    with torch.no_grad(), dist._taps as taps:
        dist.student(x)
        s_embed = taps.features["embed"]
        assert torch.allclose(parts["hint/feat"], hint_mse(dist.heads_s["feat"](s_embed), f_cnn), atol=1e-6)
        assert torch.allclose(parts["hint/hid"], hint_mse(dist.heads_s["hid"](s_embed), f_mlp), atol=1e-6)
    expected = parts["kd"] + 2.0 * parts["kd@mlp"] + parts["dkd@cnn"] + parts["hint/feat"] + parts["hint/hid"]
    assert torch.allclose(total, expected, atol=1e-5)


def test_averaging_teachers_with_different_class_counts_is_refused():
    d = two_teacher_job(losses=[{"kind": "kd"}])
    d["teachers"][1]["model"]["kwargs"]["num_classes"] = 7
    job = JobSpec.from_dict(d)
    x = torch.randn(2, 1, 8, 8)
    teachers = TeacherSet({"cnn": TeacherRunner(digits_cnn(8), ["embed"], device="cpu"),
                           "mlp": TeacherRunner(mlp(hidden=48, num_classes=7), ["hidden"], device="cpu")})
    student = digits_cnn(4)
    with pytest.raises(ValueError, match="one class count"):
        Distiller(student, job.student.pairs, job.losses, probe_shapes(student, ["embed"], x), teachers.shapes(x),
                  n_data=8, teachers=job.teacher_weights())


def test_teacher_set_merges_every_teacher_under_its_name():
    cnn, m = digits_cnn(8), mlp(hidden=48)
    runners = {"cnn": TeacherRunner(cnn, ["embed"], device="cpu"), "mlp": TeacherRunner(m, ["hidden"], device="cpu")}
    both = TeacherSet(runners)
    x = torch.randn(5, 1, 8, 8)
    out = both(x)
    assert set(out) == {"cnn/embed", "cnn/logits", "mlp/hidden", "mlp/logits"}
    with torch.no_grad():
        assert torch.allclose(out["cnn/logits"], cnn(x)) and torch.allclose(out["mlp/logits"], m(x))
    assert both.forwards == 2 and both.rows == 10
    both.shapes(x[:2])
    assert both.forwards == 2  # a probe is not counted
