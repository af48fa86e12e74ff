"""CRD against an independent re-derivation of the reference (RepDistiller) math, written with loops."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from kdcore.losses import CRDLoss
from kdcore.memory import BankProtocol, MemoryBank

N, K, DS, DT, D = 10, 3, 3, 2, 4
MOM = 0.3  # not 0.5, so m and 1 - m cannot be confused


def _crd(objective="nce", negatives="per_anchor", temperature=0.5, seed=0, **kw):
    torch.manual_seed(seed)
    return CRDLoss(DS, DT, feat_dim=D, n_data=N, nce_k=K, temperature=temperature, momentum=MOM,
                   objective=objective, negatives=negatives, seed=seed, **kw).double()


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, DS, generator=g, dtype=torch.float64),
            torch.randn(2, DT, generator=g, dtype=torch.float64))


IDX = torch.tensor([4, 7])
NEG = [[1, 4, 9], [0, 7, 3]]  # row 0 contains its own positive (4) as a negative, like the reference allows
CIDX = torch.tensor([[4, 1, 4, 9], [7, 0, 7, 3]])


# -- the reference, re-derived with python lists ------------------------------------------------

def _embed(lin, x):
    w, b = lin.weight.tolist(), lin.bias.tolist()
    out = []
    for row in x.tolist():
        z = [sum(wi * xi for wi, xi in zip(wr, row)) + bi for wr, bi in zip(w, b)]
        n = math.sqrt(sum(v * v for v in z))
        out.append([v / n for v in z])
    return out


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _reference_step(crd, f_s, f_t, idx, cidx, z=None, momentum=None):
    """One RepDistiller CRD step. Returns (loss, (Z_s, Z_t), new student rows, new teacher rows)."""
    temp, n = crd.temperature, crd.n_data
    momentum = MOM if momentum is None else momentum
    mem_s, mem_t = crd.bank.student.tolist(), crd.bank.teacher.tolist()
    v_s, v_t = _embed(crd.embed_s.linear, f_s), _embed(crd.embed_t.linear, f_t)
    cidx = cidx.tolist()
    # out_s: student anchor vs teacher memory; out_t: teacher anchor vs student memory
    out_s = [[math.exp(_dot(mem_t[j], v_s[b]) / temp) for j in cidx[b]] for b in range(len(v_s))]
    out_t = [[math.exp(_dot(mem_s[j], v_t[b]) / temp) for j in cidx[b]] for b in range(len(v_t))]
    if z is None:
        z = (sum(map(sum, out_s)) / sum(map(len, out_s)) * n, sum(map(sum, out_t)) / sum(map(len, out_t)) * n)

    def contrast_loss(out, zz):
        m = len(out[0]) - 1
        pn = 1.0 / n
        eps = 1e-7
        total = 0.0
        for row in out:
            p = [v / zz for v in row]
            total += math.log(p[0] / (p[0] + m * pn + eps))
            for q in p[1:]:
                total += math.log((m * pn) / (q + m * pn + eps))
        return -total / len(out)

    loss = contrast_loss(out_s, z[0]) + contrast_loss(out_t, z[1])
    new_s, new_t = [r[:] for r in mem_s], [r[:] for r in mem_t]
    for b, i in enumerate(idx.tolist()):
        for mem, new, v in ((mem_s, new_s, v_s[b]), (mem_t, new_t, v_t[b])):
            u = [momentum * a + (1 - momentum) * c for a, c in zip(mem[i], v)]
            nrm = math.sqrt(sum(x * x for x in u))
            new[i] = [x / nrm for x in u]
    return loss, z, new_s, new_t


def _reference_softmax(crd, f_s, f_t, neg_rows_idx):
    temp = crd.temperature
    mem_s, mem_t = crd.bank.student.tolist(), crd.bank.teacher.tolist()
    v_s, v_t = _embed(crd.embed_s.linear, f_s), _embed(crd.embed_t.linear, f_t)
    total = 0.0
    for b in range(len(v_s)):
        pos = math.exp(_dot(v_s[b], v_t[b]) / temp)
        neg_s = sum(math.exp(_dot(v_s[b], mem_t[j]) / temp) for j in neg_rows_idx[b])
        neg_t = sum(math.exp(_dot(v_t[b], mem_s[j]) / temp) for j in neg_rows_idx[b])
        total += -math.log(pos / (pos + neg_s)) - math.log(pos / (pos + neg_t))
    return total / len(v_s)


# -- NCE objective ----------------------------------------------------------------------------

def test_nce_matches_reference_and_sets_z():
    crd = _crd()
    f_s, f_t = _batch(1)
    loss_ref, z_ref, new_s, new_t = _reference_step(crd, f_s, f_t, IDX, CIDX)
    assert crd.Z_s is None and crd.Z_t is None
    loss = crd(f_s, f_t, IDX, CIDX)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(loss_ref, rel=1e-9)
    assert crd.Z_s == pytest.approx(z_ref[0], rel=1e-9)
    assert crd.Z_t == pytest.approx(z_ref[1], rel=1e-9)
    torch.testing.assert_close(crd.bank.student, torch.tensor(new_s, dtype=torch.float64))
    torch.testing.assert_close(crd.bank.teacher, torch.tensor(new_t, dtype=torch.float64))


def test_z_is_fixed_after_first_batch():
    crd = _crd()
    f_s, f_t = _batch(1)
    crd(f_s, f_t, IDX, CIDX)
    z = (crd.Z_s, crd.Z_t)
    g_s, g_t = _batch(2)
    idx2 = torch.tensor([2, 5])
    cidx2 = torch.tensor([[2, 8, 6, 1], [5, 5, 0, 9]])
    loss_ref, z_fresh, new_s, new_t = _reference_step(crd, 3 * g_s, g_t, idx2, cidx2, z=z)
    loss = crd(3 * g_s, g_t, idx2, cidx2)
    assert (crd.Z_s, crd.Z_t) == z
    assert loss.item() == pytest.approx(loss_ref, rel=1e-9)
    # and this batch would have given other constants had Z not been fixed
    _, z_other, _, _ = _reference_step(_crd(), 3 * g_s, g_t, idx2, cidx2)
    assert z_other[0] != pytest.approx(z[0], rel=1e-3)
    torch.testing.assert_close(crd.bank.teacher, torch.tensor(new_t, dtype=torch.float64))


def test_memory_update_happens_after_scoring():
    crd = _crd()
    f_s, f_t = _batch(3)
    before = copy.deepcopy(crd)
    loss = crd(f_s, f_t, IDX, CIDX).item()
    loss_pre, *_ = _reference_step(before, f_s, f_t, IDX, CIDX)
    # the same step scored against the already-updated memory is a different number
    after = copy.deepcopy(before)
    _, _, new_s, new_t = _reference_step(before, f_s, f_t, IDX, CIDX)
    after.bank.student.copy_(torch.tensor(new_s, dtype=torch.float64))
    after.bank.teacher.copy_(torch.tensor(new_t, dtype=torch.float64))
    loss_post, *_ = _reference_step(after, f_s, f_t, IDX, CIDX)
    assert loss == pytest.approx(loss_pre, rel=1e-9)
    assert loss_post != pytest.approx(loss_pre, rel=1e-3)


def test_small_temperature_float32_stays_finite_and_matches():
    crd = _crd(temperature=0.01)
    f_s, f_t = _batch(4)
    ref, *_ = _reference_step(crd, f_s, f_t, IDX, CIDX)
    crd32 = copy.deepcopy(crd).float()
    loss = crd32(f_s.float(), f_t.float(), IDX, CIDX)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref, rel=1e-3)


# -- shared vs per-anchor -----------------------------------------------------------------------

def test_shared_equals_per_anchor_with_identical_negative_rows():
    per = _crd(negatives="per_anchor")
    shared = copy.deepcopy(per)
    shared.negatives = "shared"
    f_s, f_t = _batch(5)
    negs = [1, 9, 3]
    cidx = torch.tensor([[i] + negs for i in IDX.tolist()])
    a = per(f_s, f_t, IDX, cidx)
    b = shared(f_s, f_t, IDX, torch.tensor(negs))
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    assert (per.Z_s, per.Z_t) == pytest.approx((shared.Z_s, shared.Z_t), rel=1e-12)
    torch.testing.assert_close(per.bank.student, shared.bank.student)
    ref, *_ = _reference_step(_crd(), f_s, f_t, IDX, cidx)
    assert a.item() == pytest.approx(ref, rel=1e-9)


class RecordingBank:
    """A stand-in bank (as a remote one would be) that records what CRD asks of it."""

    def __init__(self, n, dim):
        self.inner = MemoryBank(n, dim, dtype=torch.float64)
        self.n, self.dim = n, dim
        self.gathers: list[tuple[int, ...]] = []
        self.samples: list[int] = []
        self.updates = 0

    def gather(self, idx):
        self.gathers.append(tuple(idx.shape))
        return self.inner.gather(idx)

    def sample(self, k, generator=None):
        self.samples.append(k)
        return self.inner.sample(k, generator)

    def update(self, idx, v_s, v_t):
        self.updates += 1
        self.inner.update(idx, v_s, v_t)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        return self.inner.load_state_dict(state)


@pytest.mark.parametrize("objective", ["nce", "softmax"])
def test_shared_and_per_anchor_request_shapes(objective):
    b, k = 5, 7
    for mode, gathered, sampled in (("per_anchor", [(b, k + 1)], [b * k]),
                                    ("shared", [(b + k,)] if objective == "nce" else [(k,)], [k])):
        bank = RecordingBank(50, D)
        assert isinstance(bank, BankProtocol)
        crd = CRDLoss(DS, DT, D, nce_k=k, bank=bank, objective=objective, negatives=mode).double()
        loss = crd(torch.randn(b, DS, dtype=torch.float64), torch.randn(b, DT, dtype=torch.float64),
                   torch.arange(b))
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert bank.gathers == gathered and bank.samples == sampled and bank.updates == 1


def test_shared_and_per_anchor_agree_in_distribution():
    """Every negative is uniform over the bank in both modes, so the expected loss is the same."""
    n, k, b, draws = 40, 6, 4, 150
    base = CRDLoss(DS, DT, D, n_data=n, nce_k=k, temperature=0.5, negatives="per_anchor").double()
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(b, DS, generator=g, dtype=torch.float64)
    f_t = torch.randn(b, DT, generator=g, dtype=torch.float64)
    idx = torch.arange(b)
    base(f_s, f_t, idx, update_bank=False)  # fix Z
    means, sems, counts = {}, {}, {}
    for mode in ("per_anchor", "shared"):
        crd = copy.deepcopy(base)
        crd.negatives = mode
        gen = torch.Generator().manual_seed(1)
        hits = torch.zeros(n)
        vals = []
        for _ in range(draws):
            neg = crd.sample_negatives(b, generator=gen)
            hits += torch.bincount(neg.reshape(-1), minlength=n)
            full = neg if mode == "shared" else torch.cat([idx[:, None], neg], dim=1)
            vals.append(crd(f_s, f_t, idx, full, update_bank=False).item())
        v = torch.tensor(vals)
        means[mode], sems[mode] = v.mean().item(), (v.std() / math.sqrt(draws)).item()
        counts[mode] = hits / hits.sum()
    assert abs(means["shared"] - means["per_anchor"]) < 4 * math.hypot(sems["shared"], sems["per_anchor"])
    for mode in counts:  # uniform over the bank
        assert counts[mode].max().item() < 2.0 / n and counts[mode].min().item() > 0.3 / n
    # sanity: the loss does vary with the negatives drawn (the comparison above is not vacuous)
    assert sems["shared"] > 0


# -- softmax objective --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["per_anchor", "shared"])
def test_softmax_objective_closed_form(mode):
    crd = _crd(objective="softmax", negatives=mode)
    f_s, f_t = _batch(6)
    negs = [[1, 4, 9], [1, 4, 9]] if mode == "shared" else NEG
    expected = _reference_softmax(crd, f_s, f_t, negs)
    cidx = torch.tensor(negs[0]) if mode == "shared" else CIDX
    before = crd.bank.teacher.clone()
    assert crd(f_s, f_t, IDX, cidx).item() == pytest.approx(expected, rel=1e-9)
    assert crd.Z_s is None  # no normalisation constant in the softmax form
    assert not torch.equal(before, crd.bank.teacher)


def test_softmax_two_orthogonal_anchors_exact():
    # v_s = v_t = e_b, negatives = the other anchor's direction: loss = 2 * -log(e^{1/T} / (e^{1/T} + 1))
    crd = CRDLoss(2, 2, feat_dim=2, n_data=2, nce_k=1, temperature=0.5, objective="softmax",
                  negatives="shared").double()
    with torch.no_grad():
        for lin in (crd.embed_s.linear, crd.embed_t.linear):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    neg = torch.tensor([[0.0, 0.0]], dtype=torch.float64)  # exp(0) = 1
    e = torch.eye(2, dtype=torch.float64)
    loss = crd(e, e, torch.tensor([0, 1]), negatives=(neg, neg))
    assert loss.item() == pytest.approx(2 * -math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-12)


# -- supplied negatives, deferred updates, remote banks ------------------------------------------

def test_supplied_negatives_match_bank_indices_and_defer_update():
    crd = _crd(negatives="shared")
    other = copy.deepcopy(crd)
    f_s, f_t = _batch(7)
    negs = torch.tensor([2, 8, 5])
    neg_s, neg_t = crd.bank.gather(negs)
    pos = crd.bank.gather(IDX)
    snapshot = crd.bank.student.clone()
    a = crd(f_s, f_t, IDX, negatives=(neg_s, neg_t), positives=pos, update_bank=False)
    assert torch.equal(crd.bank.student, snapshot)  # not applied
    b = other(f_s, f_t, IDX, negs)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    upd = crd.pending_update()
    assert upd is not None and torch.equal(upd[0], IDX) and upd[1].shape == (2, D) and not upd[1].requires_grad
    assert crd.pending_update() is None
    crd.apply_update(upd)
    torch.testing.assert_close(crd.bank.student, other.bank.student)
    torch.testing.assert_close(crd.bank.teacher, other.bank.teacher)


def test_remote_style_bank_and_gradients():
    bank = RecordingBank(N, D)
    crd = CRDLoss(DS, DT, D, nce_k=K, bank=bank, temperature=0.5).double()
    assert crd.n_data == N and "bank" not in dict(crd.named_children())
    f_s, f_t = _batch(8)
    crd(f_s, f_t, IDX, CIDX, update_bank=False)  # sets Z
    x_s, x_t = f_s.clone().requires_grad_(), f_t.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: crd(a, b, IDX, CIDX, update_bank=False), (x_s, x_t))
    loss = crd(x_s, x_t, IDX, CIDX, update_bank=False)
    loss.backward()
    assert crd.embed_s.linear.weight.grad.abs().sum() > 0 and crd.embed_t.linear.weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="BankProtocol"):
        CRDLoss(DS, DT, D, bank=object())


def test_state_dict_round_trip_keeps_z_and_bank():
    crd = _crd()
    f_s, f_t = _batch(9)
    crd(f_s, f_t, IDX, CIDX)
    fresh = _crd(seed=5)
    fresh.load_state_dict(crd.state_dict())
    assert (fresh.Z_s, fresh.Z_t) == (crd.Z_s, crd.Z_t)
    g_s, g_t = _batch(10)
    assert fresh(g_s, g_t, IDX, CIDX).item() == pytest.approx(crd(g_s, g_t, IDX, CIDX).item(), rel=1e-12)


def test_fp16_bank_and_default_sampling():
    crd = CRDLoss(DS, DT, D, n_data=100, nce_k=16, bank_dtype="fp16")
    loss = crd(torch.randn(4, DS), torch.randn(4, DT), torch.arange(4))
    assert crd.bank.student.dtype == torch.float16 and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_input_errors():
    crd = _crd()
    f_s, f_t = _batch(1)
    with pytest.raises(ValueError, match=r"column 0"):
        crd(f_s, f_t, IDX, torch.tensor([[4, 1, 2, 3], [6, 0, 1, 2]]))
    with pytest.raises(ValueError, match=r"student \(2, 3\) and teacher \(3, 2\)"):
        crd(f_s, torch.zeros(3, DT, dtype=torch.float64), IDX)
    with pytest.raises(ValueError, match="idx must be"):
        crd(f_s, f_t, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="expects 3"):
        crd(torch.zeros(2, 5, dtype=torch.float64), f_t, IDX)
    shared = _crd(negatives="shared")
    with pytest.raises(ValueError, match="1-D"):
        shared(f_s, f_t, IDX, CIDX)
    with pytest.raises(ValueError, match="K x 4"):
        shared(f_s, f_t, IDX, negatives=(torch.zeros(3, 5), torch.zeros(3, 5)))
    with pytest.raises(ValueError, match="positives are only used"):
        shared(f_s, f_t, IDX, positives=shared.bank.gather(IDX))
    with pytest.raises(ValueError, match="objective"):
        CRDLoss(DS, DT, D, n_data=N, objective="triplet")
    with pytest.raises(ValueError, match="n_data"):
        CRDLoss(DS, DT, D)


def test_scores_leave_autocast_precision():
    crd = CRDLoss(DS, DT, D, n_data=N, nce_k=K, temperature=0.5)
    f_s, f_t = _batch(11)
    expected = copy.deepcopy(crd)(f_s.float(), f_t.float(), IDX, CIDX).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crd(f_s.float(), f_t.float(), IDX, CIDX)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=0.05)  # only the bf16 heads differ


def test_bench_runs_both_modes_and_restores_threads():
    from services.bench.losses import run

    before = torch.get_num_threads()
    out = run(nce_k=16, feat_dim=8, batch=4, n_data=100, steps=2, warmup=1, threads=1)
    assert out["crd_shared_step_s"] > 0 and out["crd_per_anchor_step_s"] > 0
    assert out["ratio"] == pytest.approx(out["crd_per_anchor_step_s"] / out["crd_shared_step_s"])
    assert out["threads"] == 1 and torch.get_num_threads() == before
