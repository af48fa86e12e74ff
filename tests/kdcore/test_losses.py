"""Each loss against an independent float64 re-derivation (explicit python loops / closed forms)."""

from __future__ import annotations

import math

import pytest
import torch

from kdcore.losses import (
    attention_transfer,
    cosine_distance,
    hint_mse,
    info_nce,
    kd_kl,
    pkt,
    rkd,
    similarity_preserving,
)


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _rows(x: torch.Tensor) -> list[list[float]]:
    return x.reshape(x.shape[0], -1).tolist()


def _norm(v):
    return math.sqrt(sum(a * a for a in v))


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


# -- kd ----------------------------------------------------------------------------------------

def _kd_loops(s, t, temp):
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        zs = sum(math.exp(a / temp) for a in srow)
        zt = sum(math.exp(a / temp) for a in trow)
        for a, b in zip(srow, trow):
            ps, pt = math.exp(a / temp) / zs, math.exp(b / temp) / zt
            total += pt * math.log(pt / ps)
    return total / s.shape[0] * temp * temp


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_matches_loops(temp):
    s, t = _rand(3, 5, seed=1), _rand(3, 5, seed=2)
    assert kd_kl(s, t, temp).item() == pytest.approx(_kd_loops(s, t, temp), rel=1e-10)


def test_kd_closed_form_two_classes():
    # teacher (0, 0) -> p_t = (1/2, 1/2); student (log 3, 0) at T=1 -> p_s = (3/4, 1/4)
    s = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    t = torch.zeros(1, 2, dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kd_kl(s, t, 1.0).item() == pytest.approx(expected, rel=1e-12)
    # T = 2 with logits doubled gives the same distributions, times T^2 = 4
    assert kd_kl(2 * s, t, 2.0).item() == pytest.approx(4 * expected, rel=1e-12)


def test_kd_zero_for_identical_and_positive_otherwise():
    s = _rand(4, 7)
    assert kd_kl(s, s.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-12)
    assert kd_kl(s, _rand(4, 7, seed=5), 3.0).item() > 0


def test_kd_gradcheck():
    s = _rand(2, 4).requires_grad_()
    t = _rand(2, 4, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kd_kl(a, b, 2.0), (s, t))


def test_kd_mixed_dtypes_promote():
    s, t = _rand(2, 3).float(), _rand(2, 3, seed=4).half()
    out = kd_kl(s, t, 2.0)
    assert out.dtype == torch.float32 and out.dim() == 0


def test_kd_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"student 2x3 and teacher 2x4"):
        kd_kl(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="B x C"):
        kd_kl(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_kl(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="floating"):
        kd_kl(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), 1.0)


# -- hint --------------------------------------------------------------------------------------

def test_hint_mean_and_half_closed_form():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0], [3.0, 2.0]], dtype=torch.float64)
    # squared errors 1, 4, 0, 4 -> sum 9
    assert hint_mse(s, t).item() == pytest.approx(9 / 4)
    assert hint_mse(s, t, half=True).item() == pytest.approx(0.5 * 9 / 2)


def test_hint_on_maps_and_gradcheck():
    s, t = _rand(2, 3, 2, 2), _rand(2, 3, 2, 2, seed=9)
    sq = sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist()))
    assert hint_mse(s, t).item() == pytest.approx(sq / 24)
    assert hint_mse(s, t, half=True).item() == pytest.approx(sq / 4)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: hint_mse(a, t, half=True), (s,))


def test_hint_shape_error():
    with pytest.raises(ValueError, match=r"student 4x8 and teacher 4x16"):
        hint_mse(torch.zeros(4, 8), torch.zeros(4, 16))


# -- cosine ------------------------------------------------------------------------------------

def test_cosine_closed_forms():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]], dtype=torch.float64)
    # cosines: 0, 1, -1 -> mean 0 -> distance 1
    assert cosine_distance(s, t).item() == pytest.approx(1.0)
    assert cosine_distance(s, 5 * s).item() == pytest.approx(0.0, abs=1e-12)
    assert cosine_distance(s, -s).item() == pytest.approx(2.0)


def test_cosine_matches_loops_on_maps():
    s, t = _rand(3, 2, 2, 2), _rand(3, 2, 2, 2, seed=7)
    cos = [_dot(a, b) / (_norm(a) * _norm(b)) for a, b in zip(_rows(s), _rows(t))]
    assert cosine_distance(s, t).item() == pytest.approx(1 - sum(cos) / 3, rel=1e-10)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: cosine_distance(a, t), (s,))


def test_cosine_shape_error():
    with pytest.raises(ValueError, match=r"student 2x3 and teacher 3x3"):
        cosine_distance(torch.zeros(2, 3), torch.zeros(3, 3))


# -- pkt ---------------------------------------------------------------------------------------

def _pkt_loops(s, t, eps):
    def probs(x):
        rows = [[a / (_norm(r) + eps) for a in r] for r in _rows(x)]
        b = len(rows)
        k = [[(_dot(rows[i], rows[j]) + 1) / 2 for j in range(b)] for i in range(b)]
        return [[k[i][j] / sum(k[i]) for j in range(b)] for i in range(b)]

    ps, pt = probs(s), probs(t)
    b = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)) / b**2


def test_pkt_matches_loops_with_different_dims():
    s, t = _rand(4, 3), _rand(4, 6, seed=11)
    assert pkt(s, t).item() == pytest.approx(_pkt_loops(s, t, 1e-7), rel=1e-9)


def test_pkt_closed_form_two_samples():
    # orthogonal student rows: kernel [[1, .5], [.5, 1]] -> rows (2/3, 1/3);
    # parallel teacher rows: kernel all ones -> rows (1/2, 1/2).
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    expected = (2 * (0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3)))) / 4
    assert pkt(s, t, eps=0.0).item() == pytest.approx(expected, rel=1e-9)
    assert pkt(s, s, eps=0.0).item() == pytest.approx(0.0, abs=1e-12)


def test_pkt_gradcheck():
    s, t = _rand(3, 4).requires_grad_(), _rand(3, 5, seed=2)
    assert torch.autograd.gradcheck(lambda a: pkt(a, t), (s,))


def test_pkt_batch_error():
    with pytest.raises(ValueError, match=r"student 3x4 and teacher 2x4"):
        pkt(torch.zeros(3, 4), torch.zeros(2, 4))


# -- sp ----------------------------------------------------------------------------------------

def _sp_loops(s, t):
    def gram(x):
        r = _rows(x)
        g = [[_dot(a, b) for b in r] for a in r]
        return [[v / _norm(row) for v in row] for row in g]

    gs, gt = gram(s), gram(t)
    b = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_matches_loops():
    s, t = _rand(4, 2, 3), _rand(4, 5, seed=12)
    assert similarity_preserving(s, t).item() == pytest.approx(_sp_loops(s, t), rel=1e-10)


def test_sp_closed_form_and_scale_invariance():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # G = I
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # G = ones -> rows (1/sqrt2, 1/sqrt2)
    r = 1 / math.sqrt(2)
    expected = (2 * (1 - r) ** 2 + 2 * r**2) / 4
    assert similarity_preserving(s, t).item() == pytest.approx(expected, rel=1e-12)
    assert similarity_preserving(3 * s, t).item() == pytest.approx(expected, rel=1e-12)


def test_sp_gradcheck_and_errors():
    s, t = _rand(3, 4).requires_grad_(), _rand(3, 2, seed=1)
    assert torch.autograd.gradcheck(lambda a: similarity_preserving(a, t), (s,))
    with pytest.raises(ValueError, match=r"student 3x4 and teacher 5x4"):
        similarity_preserving(torch.zeros(3, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        similarity_preserving(torch.zeros(3), torch.zeros(3))


# -- rkd ---------------------------------------------------------------------------------------

def _huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _rkd_loops(s, t, wd, wa):
    def dists(x):
        r = _rows(x)
        b = len(r)
        d = [[0.0 if i == j else _norm([p - q for p, q in zip(r[i], r[j])]) for j in range(b)] for i in range(b)]
        pos = [v for row in d for v in row if v > 0]
        mean = sum(pos) / len(pos)
        return [v / mean for row in d for v in row]

    def angles(x):
        r = _rows(x)
        b = len(r)
        out = []
        for i in range(b):
            units = []
            for j in range(b):
                v = [p - q for p, q in zip(r[j], r[i])]
                n = _norm(v)
                units.append([c / n for c in v] if n > 0 else [0.0] * len(v))
            for j in range(b):
                for k in range(b):
                    out.append(_dot(units[j], units[k]))
        return out

    ld = [_huber(a, b) for a, b in zip(dists(s), dists(t))]
    la = [_huber(a, b) for a, b in zip(angles(s), angles(t))]
    return wd * sum(ld) / len(ld) + wa * sum(la) / len(la)


def test_rkd_matches_loops():
    s, t = _rand(4, 3), 3 * _rand(4, 5, seed=13)  # large teacher distances -> both Huber branches
    assert rkd(s, t).item() == pytest.approx(_rkd_loops(s, t, 25.0, 50.0), rel=1e-9)
    assert rkd(s, t, 1.0, 0.0).item() == pytest.approx(_rkd_loops(s, t, 1.0, 0.0), rel=1e-9)


def test_rkd_closed_form_scaled_copy_is_zero():
    # distances are mean-normalised and angles scale-free: a scaled copy matches exactly
    t = _rand(5, 3)
    assert rkd(2.5 * t, t).item() == pytest.approx(0.0, abs=1e-10)


def test_rkd_teacher_is_constant_and_student_gradcheck():
    s = _rand(4, 3).requires_grad_()
    t = _rand(4, 3, seed=2).requires_grad_()
    loss = rkd(s, t)
    loss.backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    t2 = t.detach()
    assert torch.autograd.gradcheck(lambda a: rkd(a, t2), (s.detach().clone().requires_grad_(),))


def test_rkd_errors():
    with pytest.raises(ValueError, match=r"student 4x3 and teacher 5x3"):
        rkd(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        rkd(torch.zeros(1, 3), torch.zeros(1, 3))


# -- at ----------------------------------------------------------------------------------------

def _at_loops(s, t, p):
    def amap(f):
        b, c, h, w = f.shape
        out = []
        for bi in range(b):
            v = [sum(f[bi, ci, y, x].item() ** p for ci in range(c)) / c for y in range(h) for x in range(w)]
            n = _norm(v)
            out.append([a / n for a in v])
        return out

    a, b = amap(s), amap(t)
    vals = [(x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(vals) / len(vals)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_at_matches_loops_same_size(p):
    s, t = _rand(2, 3, 2, 3), _rand(2, 5, 2, 3, seed=14)
    assert attention_transfer(s, t, p=p).item() == pytest.approx(_at_loops(s, t, p), rel=1e-10)


def test_at_pools_larger_map():
    s, t = _rand(2, 3, 4, 4), _rand(2, 2, 2, 2, seed=15)
    # 4x4 -> 2x2 adaptive average pooling = mean of each 2x2 block, written out by hand
    pooled = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    for y in range(2):
        for x in range(2):
            pooled[:, :, y, x] = s[:, :, 2 * y:2 * y + 2, 2 * x:2 * x + 2].mean(dim=(2, 3))
    expected = _at_loops(pooled, t, 2)
    assert attention_transfer(s, t).item() == pytest.approx(expected, rel=1e-10)
    assert attention_transfer(t, s).item() == pytest.approx(expected, rel=1e-10)


def test_at_gradcheck_and_errors():
    s, t = _rand(2, 2, 3, 3).requires_grad_(), _rand(2, 2, 3, 3, seed=3)
    assert torch.autograd.gradcheck(lambda a: attention_transfer(a, t), (s,))
    with pytest.raises(ValueError, match=r"B x C x H x W"):
        attention_transfer(torch.zeros(2, 3, 4, 4, 1), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"student 2x3x4x4 and teacher 3x3x4x4"):
        attention_transfer(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))


# -- infonce -----------------------------------------------------------------------------------

def _infonce_loops(s, t, temp, normalize):
    rs, rt = _rows(s), _rows(t)
    if normalize:
        rs = [[a / _norm(r) for a in r] for r in rs]
        rt = [[a / _norm(r) for a in r] for r in rt]
    total = 0.0
    for i, a in enumerate(rs):
        logits = [_dot(a, b) / temp for b in rt]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return total / len(rs)


@pytest.mark.parametrize("normalize", [True, False])
def test_infonce_matches_loops(normalize):
    s, t = _rand(4, 3), _rand(4, 3, seed=16)
    temp = 0.5
    assert info_nce(s, t, temp, normalize).item() == pytest.approx(_infonce_loops(s, t, temp, normalize), rel=1e-10)


def test_infonce_closed_form():
    # orthonormal rows matched exactly: logits = I / T, loss = -log(e^{1/T} / (e^{1/T} + 1))
    e = torch.eye(2, dtype=torch.float64)
    temp = 0.5
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    assert info_nce(e, e, temp).item() == pytest.approx(expected, rel=1e-12)
    # normalisation matters: scaling the rows changes only the unnormalised loss
    assert info_nce(3 * e, e, temp, normalize=True).item() == pytest.approx(expected, rel=1e-12)
    assert info_nce(3 * e, e, temp, normalize=False).item() != pytest.approx(expected, rel=1e-3)


def test_infonce_gradcheck_and_errors():
    s, t = _rand(3, 4).requires_grad_(), _rand(3, 4, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, 0.3), (s, t))
    with pytest.raises(ValueError, match=r"student 3x4 and teacher 3x5"):
        info_nce(torch.zeros(3, 4), torch.zeros(3, 5))


def test_every_loss_returns_0d():
    s, t = _rand(4, 2, 3, 3), _rand(4, 2, 3, 3, seed=1)
    for out in (kd_kl(s[:, :, 0, 0], t[:, :, 0, 0], 2.0), hint_mse(s, t), cosine_distance(s, t), pkt(s, t),
                similarity_preserving(s, t), rkd(s, t), attention_transfer(s, t), info_nce(s, t)):
        assert out.dim() == 0 and torch.isfinite(out)
