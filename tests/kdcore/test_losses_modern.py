"""The 2021-2024 losses against their authors' reference code on fixed inputs (tests/data/loss_refs).

Each ``.pt`` file holds seeded float32 inputs, the authors' loss and its input gradients (see
tests/data/loss_refs/README.md for the source commits). Outputs and gradients must agree within 1e-5
relative: ``|ours - ref| <= 1e-5 * (|ref| + max|ref|)`` element-wise (the scale term keeps entries
that are ~0 from demanding more than float32 gives).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdcore.losses import (
    MGDGenerator, ReviewFusion, SRDMap, dist_loss, dkd_loss, hcl_loss, kd_kl, mgd_loss, nkd_loss, srd_loss,
    standardize_logits,
)

REFS = Path(__file__).resolve().parents[1] / "data" / "loss_refs"
RTOL = 1e-5


def _ref(name: str) -> dict:
    return torch.load(REFS / f"{name}.pt", weights_only=True)


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    ours, ref = ours.detach().float(), ref.float()
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    tol = RTOL * (ref.abs() + ref.abs().max())
    bad = (ours - ref).abs() > tol
    assert not bool(bad.any()), f"{what}: max abs diff {float((ours - ref).abs().max()):.3g}, ref scale " \
                                f"{float(ref.abs().max()):.3g}"


def _logit_case(d: dict, tag: str, fn) -> None:
    s = d[f"{tag}_student"].clone().requires_grad_(True)
    loss = fn(s, d[f"{tag}_teacher"])
    loss.backward()
    _close(loss, d[f"{tag}_loss"], f"{tag} loss")
    _close(s.grad, d[f"{tag}_grad_student"], f"{tag} grad")


@pytest.mark.parametrize("T", [4, 2])
def test_kd_with_logit_standardisation_matches_reference(T):
    d = _ref("kd_logit_stand")
    _logit_case(d, f"T{T}", lambda s, t: kd_kl(standardize_logits(s), standardize_logits(t), float(T)))


@pytest.mark.parametrize("tag,stand", [("plain", False), ("stand", True)])
def test_dkd_matches_mdistiller(tag, stand):
    d = _ref("dkd")
    f = standardize_logits if stand else (lambda z: z)
    _logit_case(d, tag, lambda s, t: dkd_loss(f(s), f(t), d["labels"], alpha=1.0, beta=8.0, temperature=4.0))


@pytest.mark.parametrize("tag,beta,gamma,tau", [("default", 1.0, 1.0, 1.0), ("tau4", 1.0, 2.0, 4.0)])
def test_dist_matches_reference(tag, beta, gamma, tau):
    _logit_case(_ref("dist"), tag, lambda s, t: dist_loss(s, t, beta=beta, gamma=gamma, tau=tau))


@pytest.mark.parametrize("tag,temp,gamma", [("imagenet", 1.0, 1.5), ("cifar", 3.0, 3.5)])
def test_nkd_matches_reference(tag, temp, gamma):
    d = _ref("nkd")
    _logit_case(d, tag, lambda s, t: nkd_loss(s, t, d["labels"], temperature=temp, gamma=gamma))


def test_mgd_matches_reference():
    d = _ref("mgd")
    gen = MGDGenerator(d["student"].shape[1], d["teacher"].shape[1])
    with torch.no_grad():
        gen.align.weight.copy_(d["align_w"]), gen.align.bias.copy_(d["align_b"])
        gen.block[0].weight.copy_(d["gen1_w"]), gen.block[0].bias.copy_(d["gen1_b"])
        gen.block[2].weight.copy_(d["gen2_w"]), gen.block[2].bias.copy_(d["gen2_b"])
    s = d["student"].clone().requires_grad_(True)
    loss = mgd_loss(s, d["teacher"], gen, alpha_mgd=float(d["alpha_mgd"]), keep=d["keep"])
    loss.backward()
    _close(loss, d["loss"], "mgd loss")
    _close(s.grad, d["grad_student"], "mgd grad student")
    _close(gen.align.weight.grad, d["grad_align_w"], "mgd grad align")
    _close(gen.block[0].weight.grad, d["grad_gen1_w"], "mgd grad conv1")
    _close(gen.block[2].weight.grad, d["grad_gen2_w"], "mgd grad conv2")


def test_mgd_mask_ratio_is_the_share_of_zeroed_channels():
    from kdcore.losses.mgd import random_keep

    keep = random_keep(torch.zeros(4000, 1, 2, 2), 16, 0.15, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (4000, 16, 1, 1) and abs(float(1 - keep.mean()) - 0.15) < 0.01


def test_srd_matches_reference():
    d = _ref("srd")
    m = SRDMap(d["student"].shape[1], d["teacher"].shape[1])
    with torch.no_grad():
        m.linear.weight.copy_(d["w"]), m.linear.bias.copy_(d["b"])
    s = d["student"].clone().requires_grad_(True)
    loss = srd_loss(m(s), d["teacher"], power=4.0, bn_eps=1e-4)
    loss.backward()
    _close(loss, d["loss"], "srd loss")
    _close(s.grad, d["grad_student"], "srd grad student")
    _close(m.linear.weight.grad, d["grad_w"], "srd grad W")
    # batch norm removes the per-feature mean, so the bias has no effect: both gradients are float32 noise ~1e-8
    scale = float(d["grad_w"].abs().max())
    assert float(m.linear.bias.grad.abs().max()) <= RTOL * scale >= float(d["grad_b"].abs().max())


_ABF_NAMES = {"conv1.0": "reduce.0", "conv1.1": "reduce.1", "conv2.0": "out.0", "conv2.1": "out.1", "att_conv.0": "att.0"}


def test_reviewkd_matches_mdistiller():
    d = _ref("reviewkd")
    s = [d[f"student{i}"].clone().requires_grad_(True) for i in range(3)]
    t = [d[f"teacher{i}"] for i in range(3)]
    fusion = ReviewFusion([tuple(x.shape[1:]) for x in s], [tuple(x.shape[1:]) for x in t])
    state = {}
    for key, value in d.items():
        if key.startswith("param.abf"):
            block, rest = key[len("param.abf"):].split(".", 1)
            prefix, leaf = rest.rsplit(".", 1)
            state[f"blocks.{block}.{_ABF_NAMES[prefix]}.{leaf}"] = value
    fusion.load_state_dict(state)
    loss = hcl_loss(fusion(s), t)
    loss.backward()
    _close(loss, d["loss"], "reviewkd loss")
    for i in range(3):
        _close(s[i].grad, d[f"grad_student{i}"], f"reviewkd grad student {i}")
        _close(fusion.blocks[i].reduce[0].weight.grad, d[f"grad_conv1_w{i}"], f"reviewkd grad reduce {i}")
        _close(fusion.blocks[i].out[0].weight.grad, d[f"grad_conv2_w{i}"], f"reviewkd grad out {i}")


def test_dkd_is_kd_split_in_two_when_alpha_equals_beta_and_targets_are_the_teachers():
    # alpha = beta = 1 and a teacher that is certain of its target: DKD reduces to KD (TCKD + NCKD weighted by
    # the target mass); check the simpler identity that NCKD alone ignores the target logit entirely.
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    target = torch.randint(0, 5, (8,), generator=g)
    s2 = s.clone()
    s2[torch.arange(8), target] += 3.0  # moves only the target logit
    n1 = dkd_loss(s, t, target, alpha=0.0, beta=1.0)
    n2 = dkd_loss(s2, t, target, alpha=0.0, beta=1.0)
    assert torch.allclose(n1, n2, atol=1e-6)


# -- through the spec and the distiller ------------------------------------------------------------------
def _new_kinds_job(digits_job):
    digits_job["teacher"]["taps"] = ["embed", "block1", "block2", "block3"]
    digits_job["student"]["pairs"] = [
        {"name": "feat", "student": "embed", "teacher": "embed", "projector": {"kind": "linear", "ensemble": 3}},
        {"name": "b1", "student": "block1", "teacher": "block1"},
        {"name": "b2", "student": "block2", "teacher": "block2"},
        {"name": "b3", "student": "block3", "teacher": "block3"},
    ]
    digits_job["losses"] = [
        {"kind": "ce"}, {"kind": "kd", "params": {"logit_stand": True, "temperature": 2.0}},
        {"kind": "dkd", "params": {"warmup_epochs": 4}}, {"kind": "dist", "params": {"tau": 2.0}},
        {"kind": "nkd", "params": {"logit_stand": True}}, {"kind": "cosine", "pair": "feat"},
        {"kind": "mgd", "pair": "b3", "params": {"alpha_mgd": 1e-3}}, {"kind": "srd", "pair": "b3"},
        {"kind": "reviewkd", "pairs": ["b1", "b2", "b3"]},
    ]
    return digits_job


def _distiller(job):
    from kdcore.distiller import Distiller, probe_shapes
    from kdcore.teacher import TeacherRunner
    from kdcore.zoo import digits_cnn

    torch.manual_seed(0)
    student, teacher = digits_cnn(4), digits_cnn(8)
    x = torch.randn(2, 1, 8, 8)
    d = Distiller(student, job.student.pairs, job.losses, probe_shapes(student, job.student.tapped_layers(), x),
                  probe_shapes(teacher, job.teacher.taps, x), n_data=64)
    return d, TeacherRunner(teacher, job.teacher.taps)


def test_every_new_kind_runs_through_the_distiller_and_its_modules_are_training_only(digits_job):
    from kdcore.projectors import ProjectorEnsemble
    from kdcore.spec import JobSpec

    job = JobSpec.from_dict(_new_kinds_job(digits_job))
    d, teacher = _distiller(job)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    labeled = torch.tensor([True, False] * 8)
    d.set_epoch(0)
    total, parts, _ = d(x, teacher(x), y, labeled, torch.arange(16))
    assert set(parts) == {"ce", "kd", "dkd", "dist", "nkd", "cosine/feat", "mgd/b3", "srd/b3", "reviewkd/b1+b2+b3"}
    assert all(torch.isfinite(v) for v in parts.values())
    total.backward()
    assert all(p.grad is not None for p in d.student.parameters())
    assert set(d.aux) == {"mgd__b3", "srd__b3", "reviewkd__b1_b2_b3"}
    assert all(p.grad is not None for p in d.aux.parameters())
    assert isinstance(d.heads_s["feat"], ProjectorEnsemble) and len(d.heads_s["feat"].body) == 3
    head_ids = {id(p) for p in d.head_parameters()}
    assert all(id(p) in head_ids for p in d.aux.parameters())
    assert not any(id(p) in head_ids for p in d.student.parameters())


def test_warmup_scales_the_term_from_the_epoch_the_loop_sets(digits_job):
    from kdcore.spec import JobSpec

    digits_job["losses"] = [{"kind": "dkd", "params": {"warmup_epochs": 4}}]
    d, teacher = _distiller(JobSpec.from_dict(digits_job))
    d.eval()
    x = torch.randn(8, 1, 8, 8)
    t = teacher(x)
    with pytest.raises(RuntimeError, match="set_epoch"):
        d(x, t)
    values = []
    for epoch in (0, 1, 3, 10):
        d.set_epoch(epoch)
        values.append(float(d(x, t)[1]["dkd"]))
    full = values[-1]
    assert values == pytest.approx([full / 4, full / 2, full, full], rel=1e-6)


def test_dkd_and_nkd_use_labels_where_labeled_and_the_teachers_argmax_elsewhere():
    from kdcore.losses import target_classes

    t = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    y = torch.tensor([0, 2, 1])
    assert target_classes(t, y, torch.tensor([True, False, True])).tolist() == [0, 0, 1]
    assert target_classes(t, None, None).tolist() == [1, 0, 2]
    assert target_classes(t, y, None, source="teacher").tolist() == [1, 0, 2]


def test_logit_stand_is_invariant_to_shifting_and_scaling_each_rows_logits():
    from kdcore.losses.kd import term
    from kdcore.losses.registry import TermInputs
    from kdcore.spec.losses import KDLossSpec

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    spec = KDLossSpec(kind="kd", params={"logit_stand": True, "temperature": 2.0})
    a = term(TermInputs(spec, student=s, teacher=t))
    b = term(TermInputs(spec, student=3.0 * s + 7.0, teacher=0.5 * t - 2.0))
    assert torch.allclose(a, b, atol=1e-5)
    plain = KDLossSpec(kind="kd", params={"temperature": 2.0})
    assert not torch.allclose(term(TermInputs(plain, student=s, teacher=t)),
                              term(TermInputs(plain, student=3.0 * s, teacher=t)))


def test_projector_ensemble_averages_independent_heads():
    from kdcore.projectors import build_projector
    from kdcore.spec import ProjectorSpec

    torch.manual_seed(0)
    ens = build_projector(ProjectorSpec(kind="mlp", ensemble=3), 8, 5)
    x = torch.randn(4, 8)
    heads = list(ens.body)
    assert not torch.equal(heads[0](x), heads[1](x))
    assert torch.allclose(ens(x), sum(h(x) for h in heads) / 3, atol=1e-6)
    assert ProjectorSpec().ensemble == 1
    from kdcore.errors import SpecError

    from kdcore.spec.loading import validate_model

    with pytest.raises(SpecError) as e:
        validate_model(ProjectorSpec, {"kind": "identity", "ensemble": 2})
    assert [p.path for p in e.value.problems] == ["ensemble"]


def test_new_kinds_train_with_kd_train_local(tmp_path, digits_job):
    from kdcore.loop import train_local
    from kdcore.spec import JobSpec

    data = _new_kinds_job(digits_job)
    data["losses"][2]["params"] = {}  # no warm-up: the local loop does not call set_epoch yet
    result = train_local(JobSpec.from_dict(data), out_dir=tmp_path / "run", progress=False, log=None)
    last = result["history"][-1]
    for name in ("loss/dkd", "loss/dist", "loss/nkd", "loss/mgd/b3", "loss/srd/b3", "loss/reviewkd/b1+b2+b3"):
        assert name in last and last[name] == last[name]  # present and not NaN


def test_bench_times_every_new_term_next_to_kd():
    from services.bench.losses import run_terms, term_lines

    r = run_terms(batch=8, classes=10, steps=1, warmup=0, threads=1)
    assert set(r["terms"]) == {"kd", "kd_logit_stand", "dkd", "dist", "nkd", "mgd", "srd", "reviewkd"}
    assert r["terms"]["kd"]["ratio_to_kd"] == 1.0 and len(term_lines(r)) == 9
