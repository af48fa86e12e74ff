"""The shared CRD bank actor: one bank for all workers, updates applied once, state that round-trips."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import ray
import torch

from services.membank.actor import create_bank_actor
from services.membank.client import RemoteBank

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # train functions defined here ship by value


def test_tagged_updates_apply_once_and_state_roundtrips(ray_clean):
    actor = create_bank_actor("unit", "feat", n=50, dim=8, momentum=0.5, namespace="kd-test")
    bank = RemoteBank(actor, 50, 8, worker=3)
    idx = torch.tensor([1, 2])
    v = torch.nn.functional.normalize(torch.ones(2, 8), dim=1)
    before = bank.gather(idx)[0]
    bank.update(idx, v, v)
    bank.flush()
    after = bank.gather(idx)[0]
    assert not torch.allclose(before, after)
    # a retried call with the same (worker, step) tag is dropped
    assert ray.get(actor.update.remote(idx.numpy(), np.zeros((2, 8), np.float32), np.zeros((2, 8), np.float32), 3, 0)) \
        is False
    assert torch.equal(bank.gather(idx)[0], after)
    state = bank.state_dict()
    other = create_bank_actor("unit2", "feat", n=50, dim=8, momentum=0.5, namespace="kd-test")
    ray.get(other.load_state.remote(state))
    assert np.array_equal(ray.get(other.state.remote())["student"], state["student"])
    assert ray.get(other.state.remote())["applied"] == {3: 0}


def test_prefetch_returns_positives_and_shared_negatives(ray_clean):
    actor = create_bank_actor("unit3", "feat", n=100, dim=16, momentum=0.5, namespace="kd-test")
    bank = RemoteBank(actor, 100, 16, worker=0)
    bank.prefetch(torch.arange(4), k=32)
    got = bank.take()
    assert got["negatives"][0].shape == (32, 16) and got["positives"][1].shape == (4, 16)
    s, t = bank.gather(torch.arange(4))
    assert torch.equal(got["positives"][0], s) and torch.equal(got["positives"][1], t)
    with pytest.raises(RuntimeError, match="prefetch"):
        bank.take()


def _two_workers_one_bank(config):
    import ray.train
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    bank = RemoteBank(config["actor"], 20, 4, worker=rank)
    if rank == 0:
        bank.update(torch.tensor([7]), torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 1.0, 0, 0]]))
        bank.flush()
    dist.barrier()
    s, t = bank.gather(torch.tensor([7]))
    ray.train.report({"rank": rank, "s": s.tolist(), "t": t.tolist()})


def test_both_train_workers_see_one_bank(ray_clean, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    actor = create_bank_actor("unit4", "feat", n=20, dim=4, momentum=0.0, namespace="kd-test")
    expected = ray.get(actor.state.remote())
    trainer = TorchTrainer(_two_workers_one_bank, train_loop_config={"actor": actor},
                           scaling_config=ScalingConfig(num_workers=2),
                           run_config=RunConfig(name="onebank", storage_path=str(tmp_path)))
    trainer.fit()
    state = ray.get(actor.state.remote())
    # momentum 0: row 7 is exactly the update rank 0 pushed, and rank 1 read it back through the same actor
    assert state["student"][7].tolist() == [1.0, 0, 0, 0] and state["teacher"][7].tolist() == [0, 1.0, 0, 0]
    assert np.array_equal(np.delete(state["student"], 7, 0), np.delete(expected["student"], 7, 0))
    assert ray.get(actor.info.remote())["fetches"] == 2
