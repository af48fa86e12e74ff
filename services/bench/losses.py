"""Micro-benchmarks of the losses: one CRD training step (shared vs per-anchor negatives), and the
forward + backward time of every other term next to plain KD on the same batch.

``run()`` times forward + backward + memory-bank update of :class:`kdcore.losses.CRDLoss`
(student_dim = teacher_dim = 256) in both negative modes on the same inputs and reports the
median step times. ``run_terms()`` times each loss of 2021-2024 (DKD, DIST, NKD, KD with logit
standardisation, MGD, SRD, ReviewKD) with its training-only module, next to plain KD, interleaved.
Used by ``kd bench losses`` (``term_lines`` formats the second table).
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



def _start(steps: int, warmup: int, threads: int | None) -> tuple[int, int]:
    """Check the step counts, set torch's threads (default: every CPU of this process); returns (threads, the
    previous thread count to restore)."""
    if steps <= 0 or warmup < 0:
        raise ValueError(f"steps must be > 0 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    return int(threads), previous

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
    threads, previous = _start(steps, warmup, threads)
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


def _term_cases(batch: int, classes: int, gen: torch.Generator, device: str) -> dict[str, Any]:
    """name -> (callable of no argument returning the loss, tensors whose grads it fills)."""
    from kdcore import losses as L

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    s_logits, t_logits = r(batch, classes, scale=2.0).requires_grad_(True), r(batch, classes, scale=3.0)
    target = torch.randint(0, classes, (batch,), generator=gen).to(device)
    s_map, t_map = r(batch, 32, 8, 8).requires_grad_(True), r(batch, 64, 8, 8)
    stages_s = [r(batch, c, h, h).requires_grad_(True) for c, h in ((16, 16), (32, 8), (64, 4))]
    stages_t = [r(batch, 2 * c, h, h) for c, h in ((16, 16), (32, 8), (64, 4))]
    mgd = L.MGDGenerator(32, 64).to(device)
    srd = L.SRDMap(32, 64).to(device)
    review = L.ReviewFusion([tuple(x.shape[1:]) for x in stages_s], [tuple(x.shape[1:]) for x in stages_t]).to(device)
    std = L.standardize_logits
    return {
        "kd": lambda: L.kd_kl(s_logits, t_logits, 4.0),
        "kd_logit_stand": lambda: L.kd_kl(std(s_logits), std(t_logits), 2.0),
        "dkd": lambda: L.dkd_loss(s_logits, t_logits, target, 1.0, 8.0, 4.0),
        "dist": lambda: L.dist_loss(s_logits, t_logits, 1.0, 1.0, 1.0),
        "nkd": lambda: L.nkd_loss(s_logits, t_logits, target, 1.0, 1.5),
        "mgd": lambda: L.mgd_loss(s_map, t_map, mgd, 0.15, 7e-5),
        "srd": lambda: L.srd_loss(srd(s_map), t_map.mean(dim=(2, 3))),
        "reviewkd": lambda: L.hcl_loss(review(stages_s), stages_t),
    }


def run_terms(batch: int = 64, classes: int = 100, steps: int = 30, warmup: int = 5, *, threads: int | None = None,
              device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Median forward + backward seconds of each term and its ratio to plain KD on the same batch.

    Logit terms: B x ``classes`` logits; MGD and SRD: a 32 x 8 x 8 student map against a 64 x 8 x 8
    teacher map (modules included); ReviewKD: three stages (16, 16x16), (32, 8x8), (64, 4x4) against
    teacher stages of twice the channels. Terms are interleaved step by step, rotating the order.

    Returns:
        ``{"terms": {name: {"step_s", "ratio_to_kd"}}, ...config}``.
    """
    threads, previous = _start(steps, warmup, threads)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    try:
        torch.manual_seed(seed)
        cases = _term_cases(batch, classes, torch.Generator().manual_seed(seed), device)
        names = list(cases)
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(warmup + steps):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                sync()
                t0 = time.perf_counter()
                cases[name]().backward()
                sync()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
        med = {n: statistics.median(ts) for n, ts in times.items()}
    finally:
        torch.set_num_threads(previous)
    return {"terms": {n: {"step_s": med[n], "ratio_to_kd": med[n] / med["kd"]} for n in names},
            "batch": batch, "classes": classes, "steps": steps, "warmup": warmup, "threads": int(threads),
            "device": str(device)}


def term_lines(r: dict[str, Any]) -> list[str]:
    """The human-readable table of :func:`run_terms`."""
    out = [f"loss forward+backward (B={r['batch']}, C={r['classes']}; maps 32x8x8 -> 64x8x8), medians:"]
    for name, t in r["terms"].items():
        limit = "  (reference)" if name == "kd" else f"  {t['ratio_to_kd']:6.2f}x kd"
        out.append(f"  {name:<16} {t['step_s'] * 1e3:8.3f} ms{limit}")
    return out


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(run(), indent=2))
    print("\n".join(term_lines(run_terms())))
