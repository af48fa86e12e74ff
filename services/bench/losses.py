"""Micro-benchmark of one CRD training step: shared negatives vs per-anchor negatives.

``run()`` times forward + backward + memory-bank update of :class:`kdcore.losses.CRDLoss`
(student_dim = teacher_dim = 256) in both negative modes on the same inputs and reports the
median step times. Used by ``kd bench losses``.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

from kdcore.losses import CRDLoss


class _Stepper:
    """One CRD module + optimizer; ``step()`` runs and times one full training step."""

    def __init__(self, crd: CRDLoss, f_s: torch.Tensor, f_t: torch.Tensor, n_data: int, seed: int) -> None:
        self.crd, self.f_s, self.f_t, self.n_data = crd, f_s, f_t, n_data
        self.opt = torch.optim.SGD(crd.parameters(), lr=0.01)
        self.gen = torch.Generator().manual_seed(seed)
        self.sync = torch.cuda.synchronize if f_s.is_cuda else (lambda: None)

    def step(self) -> float:
        idx = torch.randint(0, self.n_data, (self.f_s.shape[0],), generator=self.gen).to(self.f_s.device)
        self.sync()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.crd(self.f_s, self.f_t, idx)  # samples negatives, scores, updates the bank
        loss.backward()
        self.opt.step()
        self.sync()
        return time.perf_counter() - t0


def run(
    nce_k: int = 4096,
    feat_dim: int = 128,
    batch: int = 64,
    n_data: int = 50000,
    steps: int = 30,
    warmup: int = 5,
    *,
    threads: int | None = None,
    device: str = "cpu",
    dim: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Median seconds of one CRD step in each negative mode (steps of the two modes interleaved).

    Args:
        nce_k: negatives K per step.
        feat_dim: embedding size.
        batch: B.
        n_data: bank rows.
        steps: timed steps per mode (medians over these).
        warmup: untimed steps first.
        threads: torch intra-op threads (default: all CPUs of this process); set explicitly.
        device: "cpu" or "cuda".
        dim: student and teacher feature size.
        seed: inputs, bank and index draws.

    Returns:
        ``{"crd_shared_step_s", "crd_per_anchor_step_s", "ratio" (per-anchor / shared), ...config}``.
    """
    if steps <= 0 or warmup < 0:
        raise ValueError(f"steps must be > 0 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        g = torch.Generator().manual_seed(seed)
        f_s = torch.randn(batch, dim, generator=g).to(device)
        f_t = torch.randn(batch, dim, generator=g).to(device)
        steppers = {}
        for mode in ("shared", "per_anchor"):
            torch.manual_seed(seed)
            crd = CRDLoss(dim, dim, feat_dim=feat_dim, n_data=n_data, nce_k=nce_k, negatives=mode, seed=seed).to(device)
            steppers[mode] = _Stepper(crd, f_s, f_t, n_data, seed)
        times: dict[str, list[float]] = {mode: [] for mode in steppers}
        # Interleaved, alternating which mode goes first, so background load and allocator state
        # affect both modes alike.
        for i in range(warmup + steps):
            order = ("shared", "per_anchor") if i % 2 == 0 else ("per_anchor", "shared")
            for mode in order:
                elapsed = steppers[mode].step()
                if i >= warmup:
                    times[mode].append(elapsed)
        medians = {mode: statistics.median(ts) for mode, ts in times.items()}
    finally:
        torch.set_num_threads(previous)
    return {
        "crd_shared_step_s": medians["shared"],
        "crd_per_anchor_step_s": medians["per_anchor"],
        "ratio": medians["per_anchor"] / medians["shared"],
        "nce_k": nce_k,
        "feat_dim": feat_dim,
        "batch": batch,
        "n_data": n_data,
        "steps": steps,
        "warmup": warmup,
        "threads": int(threads),
        "device": str(device),
    }


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(run(), indent=2))
