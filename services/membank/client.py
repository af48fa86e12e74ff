"""The worker-side proxy of the bank actor: local index sampling, prefetched fetches, fire-and-forget updates."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch


class RemoteBank:
    """Implements kdcore's ``BankProtocol`` against a :class:`BankActor`.

    ``prefetch(idx, k)`` asks for the next step's positives and shared negatives while the current step
    computes; ``take()`` returns them as ``{"positives": (s, t), "negatives": (s, t)}``. Updates go out
    without waiting (``update``), tagged (worker, step) so a retried call is applied once. ``step`` is the
    worker's global training step: the trainer sets it from its session (:meth:`at_step`) at every epoch, so
    a worker restarted from a checkpoint sends the tags it sent before the checkpoint's successors.
    """

    def __init__(self, actor, n: int, dim: int, worker: int = 0, seed: int = 0) -> None:
        self.actor, self.n, self.dim, self.worker = actor, int(n), int(dim), int(worker)
        self.step = 0
        self._gen = torch.Generator().manual_seed(seed * 1000 + worker)
        self._pending = None
        self._inflight_updates: list = []

    def at_step(self, step: int) -> None:
        """The tag of the next update: the training step it belongs to."""
        self.step = int(step)

    def reset(self) -> None:
        """Reset the shared bank to its seeded initial state (a run starting without a checkpoint)."""
        ray.get(self.actor.reset.remote())

    # -- BankProtocol ---------------------------------------------------------------------------
    def sample(self, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.n, (k,), generator=generator or self._gen)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = ray.get(self.actor.fetch.remote(idx.cpu().numpy(), None))
        return torch.from_numpy(out["pos_s"].copy()), torch.from_numpy(out["pos_t"].copy())

    def update(self, idx: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        ref = self.actor.update.remote(idx.cpu().numpy(), v_s.detach().float().cpu().numpy(),
                                       v_t.detach().float().cpu().numpy(), self.worker, self.step)
        self.step += 1
        self._inflight_updates.append(ref)
        if len(self._inflight_updates) > 8:  # bound what is in flight; keeps memory and staleness small
            ray.wait(self._inflight_updates, num_returns=len(self._inflight_updates) - 4)
            self._inflight_updates = self._inflight_updates[-4:]

    def info(self) -> dict[str, Any]:
        return ray.get(self.actor.info.remote())

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return ray.get(self.actor.state.remote())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ray.get(self.actor.load_state.remote(state))

    # -- prefetching ----------------------------------------------------------------------------
    def prefetch(self, idx: torch.Tensor | np.ndarray | None, k: int) -> None:
        """Start fetching positives of ``idx`` and ``k`` shared negatives for a coming step."""
        neg = self.sample(k).numpy()
        pos = None if idx is None else np.asarray(idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx)
        self._pending = self.actor.fetch.remote(pos, neg)

    def take(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._pending is None:
            raise RuntimeError("RemoteBank.take() without a prefetch()")
        out = ray.get(self._pending)
        self._pending = None
        # arrays from the object store are read-only: copy (K x d, cheap) before handing them to torch
        res = {"negatives": (torch.from_numpy(out["neg_s"].copy()), torch.from_numpy(out["neg_t"].copy()))}
        if "pos_s" in out:
            res["positives"] = (torch.from_numpy(out["pos_s"].copy()), torch.from_numpy(out["pos_t"].copy()))
        return res

    def flush(self) -> None:
        """Wait until every update sent so far is applied."""
        if self._inflight_updates:
            ray.get(self._inflight_updates)
            self._inflight_updates = []
