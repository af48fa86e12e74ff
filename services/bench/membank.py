"""``kd bench membank``: a student step with the shared bank actor vs an in-process bank (the limit).

Two Ray Train workers (DDP over gloo) each train a CIFAR-size student (resnet8x4, 32x32 inputs, batch 64)
with CRD (K=4096 shared negatives, d=128). Every worker alternates blocks of steps with a local
``MemoryBank`` and with the job's one ``BankActor`` (negatives prefetched one step ahead, updates sent
without waiting), so machine noise hits both alike; medians are compared. The actor's raw update+fetch
throughput is measured from the driver.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import ray
import torch


def _worker(config: dict[str, Any]) -> None:
    import ray.train

    from kdcore.losses import CRDLoss
    from kdcore.zoo import resnet8x4
    from services.membank.client import RemoteBank

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    k, d, bs, n = config["nce_k"], config["feat_dim"], config["batch"], config["n_data"]
    gen = torch.Generator().manual_seed(rank)

    def make(bank):
        torch.manual_seed(0)
        student = resnet8x4(num_classes=100)
        crd = CRDLoss(256, 256, feat_dim=d, n_data=None if bank else n, nce_k=k, negatives="shared", bank=bank)
        module = torch.nn.ModuleDict({"student": student, "crd": crd})
        return module, torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)

    remote = RemoteBank(config["actor"], n, d, worker=rank)
    setups = {"local": make(None), "actor": make(remote)}
    x = torch.randn(bs, 3, 32, 32, generator=gen)
    t_feat = torch.randn(bs, 256, generator=gen)
    feats: dict[str, torch.Tensor] = {}
    hook = lambda _m, _i, out: feats.__setitem__("embed", out)  # noqa: E731

    def step(mode: str, idx: torch.Tensor, next_idx: torch.Tensor) -> None:
        module, opt = setups[mode]
        handle = module["student"].embed.register_forward_hook(hook)
        try:
            if mode == "actor":
                got = remote.take()
                remote.prefetch(next_idx, k)
                logits = module["student"](x)
                loss = module["crd"](feats["embed"], t_feat, idx, negatives=got["negatives"],
                                     positives=got["positives"], update_bank=False)
            else:
                logits = module["student"](x)
                loss = module["crd"](feats["embed"], t_feat, idx)
            loss = loss + 0.0 * logits.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce of all gradients, as DDP buckets do
            torch.distributed.all_reduce(flat)
            _unflatten(flat, grads)
            opt.step()
            if mode == "actor":
                u = module["crd"].pending_update()
                remote.update(*u)
        finally:
            handle.remove()

    times: dict[str, list[float]] = {"local": [], "actor": []}
    idx_seq = [torch.randint(0, n, (bs,), generator=gen) for _ in range(config["steps"] + 2)]
    remote.prefetch(idx_seq[0], k)
    block = config["block"]
    s = 0
    while s < config["steps"]:
        for mode in ("local", "actor"):
            for j in range(block):
                i = s + j
                t0 = time.perf_counter()
                step(mode, idx_seq[i], idx_seq[i + 1])
                if i >= config["warmup"]:
                    times[mode].append(time.perf_counter() - t0)
        s += block
    remote.flush()
    metrics = {"rank": rank, "step_s_local": statistics.median(times["local"]),
               "step_s_actor": statistics.median(times["actor"]), "steps": len(times["actor"])}
    if rank == 0:  # Train v2 keeps the metrics of reports that carry a checkpoint
        import json
        import os

        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "metrics.json"), "w") as f:
                json.dump(metrics, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def _unflatten(flat: torch.Tensor, grads: list[torch.Tensor]) -> None:
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def actor_throughput(actor, k: int, d: int, batch: int, n: int, seconds: float = 2.0) -> float:
    """Update+fetch pairs per second the actor serves to one caller (synchronous round trips)."""
    idx = np.random.default_rng(0).integers(0, n, batch)
    neg = np.random.default_rng(1).integers(0, n, k)
    v = np.random.default_rng(2).standard_normal((batch, d)).astype(np.float32)
    ray.get(actor.ping.remote())  # the actor's process is up before the clock starts
    for w in range(5):
        ray.get([actor.update.remote(idx, v, v, 98, w), actor.fetch.remote(idx, neg)])
    ops, t0, step = 0, time.perf_counter(), 10**6
    while time.perf_counter() - t0 < seconds:
        ray.get([actor.update.remote(idx, v, v, 99, step), actor.fetch.remote(idx, neg)])
        ops += 1
        step += 1
    return ops / (time.perf_counter() - t0)


def run(workers: int = 2, nce_k: int = 4096, feat_dim: int = 128, batch: int = 64, n_data: int = 50_000,
        steps: int = 40, warmup: int = 6, block: int = 4, log=print) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from services.membank.actor import create_bank_actor

    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(4, workers + 1), include_dashboard=False, log_to_driver=False)
        started = True
    actor = create_bank_actor("bench", f"membank-{time.time_ns()}", n_data, feat_dim, 0.5)
    try:
        ops = actor_throughput(actor, nce_k, feat_dim, batch, n_data)
        if log:
            log(f"actor update+fetch: {ops:,.0f} ops/s; timing {workers} workers x {steps} steps per mode ...")
        with tempfile.TemporaryDirectory() as tmp:
            trainer = TorchTrainer(
                _worker, scaling_config=ScalingConfig(num_workers=workers),
                train_loop_config={"actor": actor, "nce_k": nce_k, "feat_dim": feat_dim, "batch": batch,
                                   "n_data": n_data, "steps": steps, "warmup": warmup, "block": block},
                run_config=RunConfig(name="kd-bench-membank", storage_path=tmp))
            result = trainer.fit()
        m = result.metrics
    finally:
        ray.kill(actor)
        if started:
            ray.shutdown()
    return {"workers": workers, "nce_k": nce_k, "feat_dim": feat_dim, "batch": batch,
            "step_s_actor": m["step_s_actor"], "step_s_local": m["step_s_local"],
            "ratio": m["step_s_actor"] / m["step_s_local"], "actor_ops_per_s": ops}


if __name__ == "__main__":  # pragma: no cover
    print(run(), file=sys.stderr)
