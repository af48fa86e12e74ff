"""MemoryBank: reference initialisation, gather/sample/update maths, fp16 storage, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from kdcore.memory import BankProtocol, MemoryBank


def test_init_is_uniform_in_reference_range_and_seeded():
    bank = MemoryBank(2000, 12, seed=3)
    stdv = 1 / math.sqrt(12 / 3)  # = 0.5
    for rows in (bank.student, bank.teacher):
        assert rows.shape == (2000, 12) and rows.dtype == torch.float32
        assert rows.min().item() >= -stdv and rows.max().item() <= stdv
        # uniform on [-0.5, 0.5]: mean 0, variance 1/12
        assert abs(rows.mean().item()) < 0.01
        assert rows.var().item() == pytest.approx(1 / 12, rel=0.05)
    assert not torch.equal(bank.student, bank.teacher)
    again = MemoryBank(2000, 12, seed=3)
    assert torch.equal(again.student, bank.student) and torch.equal(again.teacher, bank.teacher)
    assert not torch.equal(MemoryBank(2000, 12, seed=4).student, bank.student)


def test_gather_shapes_and_values():
    bank = MemoryBank(10, 3)
    s, t = bank.gather(torch.tensor([[1, 2], [9, 1]]))
    assert s.shape == (2, 2, 3) and t.shape == (2, 2, 3)
    assert torch.equal(s[1, 1], bank.student[1]) and torch.equal(t[1, 0], bank.teacher[9])
    with pytest.raises(IndexError, match="n=10"):
        bank.gather(torch.tensor([10]))
    with pytest.raises(ValueError, match="int64"):
        bank.gather(torch.tensor([1.0]))


def test_sample_is_uniform_in_range_and_reproducible():
    bank = MemoryBank(7, 2)
    idx = bank.sample(7000, generator=torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64 and idx.shape == (7000,)
    counts = torch.bincount(idx, minlength=7).float()
    assert counts.numel() == 7 and counts.min() > 850 and counts.max() < 1150
    same = bank.sample(7000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, same)
    # the bank's own generator advances: two draws differ
    assert not torch.equal(bank.sample(50), bank.sample(50))


def test_update_is_momentum_then_l2_normalise():
    m = 0.3
    bank = MemoryBank(5, 2, momentum=m, dtype=torch.float64)
    bank.student.copy_(torch.tensor([[3.0, 4.0]] * 5))
    bank.teacher.copy_(torch.tensor([[1.0, 0.0]] * 5))
    idx = torch.tensor([1, 3])
    v_s = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    v_t = torch.tensor([[0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    bank.update(idx, v_s, v_t)
    # row 1 student: 0.3*(3,4) + 0.7*(0,1) = (0.9, 1.9)
    n = math.hypot(0.9, 1.9)
    assert bank.student[1].tolist() == pytest.approx([0.9 / n, 1.9 / n])
    n = math.hypot(0.9 + 0.7, 1.2)
    assert bank.student[3].tolist() == pytest.approx([1.6 / n, 1.2 / n])
    # teacher row 3: 0.3*(1,0) + 0.7*(0,-1) = (0.3, -0.7)
    n = math.hypot(0.3, 0.7)
    assert bank.teacher[3].tolist() == pytest.approx([0.3 / n, -0.7 / n])
    # untouched rows stay
    assert bank.student[0].tolist() == [3.0, 4.0] and bank.teacher[4].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"2 x 2"):
        bank.update(idx, torch.zeros(3, 2), torch.zeros(2, 2))


def test_fp16_storage_updates_in_fp32():
    bank16 = MemoryBank(50, 8, momentum=0.5, dtype="fp16", seed=1)
    assert bank16.student.dtype == torch.float16
    ref = bank16.student.float().clone()
    idx = torch.tensor([0, 5, 7])
    v = torch.randn(3, 8)
    bank16.update(idx, v, v)
    new = 0.5 * ref[idx] + 0.5 * v
    new = new / new.norm(dim=1, keepdim=True)
    # the stored rows are the fp32 result rounded once to fp16
    assert torch.equal(bank16.student[idx], new.half())


def test_imagenet_size_fp16_fits_under_a_gigabyte():
    n, dim = 1_281_167, 128
    assert MemoryBank.nbytes_for(n, dim, torch.float16) == 2 * n * dim * 2 == 327_978_752 * 2
    assert MemoryBank.nbytes_for(n, dim, "fp16") < 0.7e9
    assert MemoryBank.nbytes_for(n, dim, torch.float32) > 1.0e9
    small = MemoryBank(1000, 16, dtype=torch.float16)
    assert small.nbytes == MemoryBank.nbytes_for(1000, 16, torch.float16) == 64_000


def test_state_dict_round_trip_keeps_rows_generator_and_storage_dtype():
    bank = MemoryBank(20, 4, momentum=0.2, seed=0)
    bank.update(torch.tensor([3]), torch.ones(1, 4), torch.ones(1, 4))
    state = bank.state_dict()
    other = MemoryBank(20, 4, momentum=0.9, seed=99)
    other.load_state_dict(state)
    assert torch.equal(other.student, bank.student) and torch.equal(other.teacher, bank.teacher)
    assert other.momentum == 0.2
    assert torch.equal(other.sample(10), bank.sample(10))
    half = MemoryBank(20, 4, dtype=torch.float16)
    half.load_state_dict(state)
    assert half.student.dtype == torch.float16 and torch.equal(half.student, bank.student.half())
    with pytest.raises((ValueError, RuntimeError), match="n=20"):
        MemoryBank(21, 4).load_state_dict(state)


def test_protocol_and_argument_errors():
    assert isinstance(MemoryBank(3, 2), BankProtocol)
    assert not isinstance(object(), BankProtocol)
    with pytest.raises(ValueError, match="momentum"):
        MemoryBank(3, 2, momentum=1.0)
    with pytest.raises(ValueError, match="n > 0"):
        MemoryBank(0, 2)
