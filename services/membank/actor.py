"""The bank actor: wraps kdcore's MemoryBank; updates are tagged (worker, step) and applied once.

``step`` is the worker's global training step (restored with the training checkpoint), so a worker that
restarts from a checkpoint replays the same tags: an update the bank already holds is dropped, every
later one is applied. The bank's state (rows, tags, per-worker counts) goes into the same checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch

from kdcore.memory import MemoryBank


def bank_actor_name(job_name: str, pair: str) -> str:
    return f"kd-bank-{job_name}-{pair}"


class BankActor:
    """The single bank of a job (one per CRD pair). Numpy in, numpy out (zero-copy through the object store)."""

    def __init__(self, n: int, dim: int, momentum: float = 0.5, dtype: str = "fp32", seed: int = 0) -> None:
        torch.set_num_threads(1)
        self._args = (n, dim, momentum, dtype, seed)
        self.fetches = 0
        self.reset()

    def reset(self) -> None:
        """Back to the initial (seeded) bank with no updates: a run that starts without a checkpoint."""
        n, dim, momentum, dtype, seed = self._args
        self.bank = MemoryBank(n, dim, momentum=momentum, dtype=dtype, seed=seed)
        self.applied: dict[int, int] = {}  # worker -> highest step applied (retries and replays are dropped)
        self.counts: dict[int, int] = {}  # worker -> updates applied
        self.updates = 0
        self.dropped = 0

    def info(self) -> dict[str, Any]:
        return {"n": self.bank.n, "dim": self.bank.dim, "updates": self.updates, "fetches": self.fetches,
                "dtype": str(self.bank.dtype), "nbytes": self.bank.nbytes, "counts": dict(self.counts),
                "applied": dict(self.applied), "dropped": self.dropped}

    def fetch(self, idx: np.ndarray | None, neg_idx: np.ndarray | None) -> dict[str, np.ndarray]:
        """Positives (rows ``idx``) and negatives (rows ``neg_idx``, any shape) of both sides, fp32 numpy."""
        self.fetches += 1
        out: dict[str, np.ndarray] = {}
        if idx is not None:
            s, t = self.bank.gather(torch.from_numpy(np.array(idx)))
            out["pos_s"], out["pos_t"] = s.float().numpy(), t.float().numpy()
        if neg_idx is not None:
            s, t = self.bank.gather(torch.from_numpy(np.array(neg_idx)))
            out["neg_s"], out["neg_t"] = s.float().numpy(), t.float().numpy()
        return out

    def update(self, idx: np.ndarray, v_s: np.ndarray, v_t: np.ndarray, worker: int, step: int) -> bool:
        """Apply one momentum update; a (worker, step) already applied is ignored (a retried call)."""
        if step <= self.applied.get(worker, -1):
            self.dropped += 1
            return False
        self.bank.update(torch.from_numpy(np.array(idx)), torch.from_numpy(np.array(v_s)),
                         torch.from_numpy(np.array(v_t)))
        self.applied[worker] = step
        self.counts[worker] = self.counts.get(worker, 0) + 1
        self.updates += 1
        return True

    def state(self) -> dict[str, Any]:
        """The bank and its applied-update tags, as numpy (for checkpoints)."""
        return {"student": self.bank.student.cpu().numpy().copy(), "teacher": self.bank.teacher.cpu().numpy().copy(),
                "applied": dict(self.applied), "counts": dict(self.counts), "updates": self.updates}

    def load_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.bank.student.copy_(torch.from_numpy(np.array(state["student"])))
            self.bank.teacher.copy_(torch.from_numpy(np.array(state["teacher"])))
        self.applied = {int(k): int(v) for k, v in state["applied"].items()}
        self.counts = {int(k): int(v) for k, v in state.get("counts", {}).items()}
        self.updates = int(state.get("updates", 0))

    def ping(self) -> bool:
        return True


def create_bank_actor(job_name: str, pair: str, n: int, dim: int, momentum: float, dtype: str = "fp32",
                      seed: int = 0, namespace: str | None = None):
    """Create (or find) the job's named bank actor. ``num_cpus=0``: Train's placement group holds the CPUs."""
    name = bank_actor_name(job_name, pair)
    cls = ray.remote(num_cpus=0, max_restarts=0)(BankActor)
    return cls.options(name=name, namespace=namespace, get_if_exists=True).remote(n, dim, momentum, dtype, seed)
