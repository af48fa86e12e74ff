"""The CRD memory bank: one embedding per training sample, for the student and the teacher.

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020; conventions of the
authors' ``ContrastMemory`` (RepDistiller): uniform initialisation in ``[-stdv, stdv]`` with
``stdv = 1 / sqrt(dim / 3)``, momentum update followed by L2 normalisation, uniform negatives.

:class:`BankProtocol` is what :class:`kdcore.losses.CRDLoss` needs from a bank, so a remote
bank (e.g. a Ray actor proxy living outside kdcore) can stand in for the local
:class:`MemoryBank`.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class BankProtocol(Protocol):
    """What CRD needs from a memory bank of ``n`` rows of size ``dim``, per side.

    ``gather`` and ``update`` take int64 indices into ``[0, n)``; tensors may come back on any
    device / dtype (the caller moves and casts them).
    """

    n: int
    dim: int

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` (any shape S) of the student and teacher banks: two S x dim tensors."""
        ...

    def sample(self, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``k`` indices drawn uniformly (with replacement) from ``[0, n)``, int64."""
        ...

    def update(self, idx: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """``row[idx] = normalize(m * row[idx] + (1 - m) * v)`` on both sides."""
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> Any:
        ...


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown memory bank dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


class MemoryBank(nn.Module):
    """Student and teacher embeddings of every training sample (``n x dim`` each).

    A module, so it moves with ``.to(device)`` and its rows are checkpointed with the model that
    owns it (buffers ``student`` and ``teacher``). Rows are stored in ``dtype`` (fp16 halves the
    size: an ImageNet bank, 1.28M x 128 x 2 sides, is 656 MB in fp16, 1.31 GB in fp32) while
    updates are computed in fp32.

    Args:
        n: number of training samples (rows).
        dim: embedding size.
        momentum: ``m`` in ``normalize(m * old + (1 - m) * new)`` (reference: 0.5).
        dtype: storage dtype (torch dtype or "fp32"/"fp16"/"bf16").
        seed: seeds the initial rows and the default sampling generator.
        device: where the rows live.
    """

    def __init__(
        self,
        n: int,
        dim: int,
        momentum: float = 0.5,
        dtype: torch.dtype | str = torch.float32,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if int(n) <= 0 or int(dim) <= 0:
            raise ValueError(f"memory bank needs n > 0 and dim > 0, got n={n}, dim={dim}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"memory bank momentum must be in [0, 1), got {momentum}")
        self.n = int(n)
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.seed = int(seed)
        dtype = _as_dtype(dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"memory bank dtype must be floating point, got {dtype}")
        self._generator = torch.Generator().manual_seed(self.seed)
        self.stdv = 1.0 / math.sqrt(self.dim / 3.0)
        self.register_buffer("student", self._init_rows(dtype, device))
        self.register_buffer("teacher", self._init_rows(dtype, device))

    def _init_rows(self, dtype: torch.dtype, device) -> torch.Tensor:
        rows = torch.empty(self.n, self.dim, dtype=dtype)
        rows.uniform_(-self.stdv, self.stdv, generator=self._generator)
        return rows.to(device) if device is not None else rows

    # -- sizes -------------------------------------------------------------------------------
    @staticmethod
    def nbytes_for(n: int, dim: int, dtype: torch.dtype | str = torch.float32) -> int:
        """Bytes a bank of ``n x dim`` rows per side takes, both sides, without allocating it."""
        return 2 * int(n) * int(dim) * torch.empty((), dtype=_as_dtype(dtype)).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes held by the two row tensors."""
        return self.student.nbytes + self.teacher.nbytes

    @property
    def dtype(self) -> torch.dtype:
        return self.student.dtype

    @property
    def device(self) -> torch.device:
        return self.student.device

    def __len__(self) -> int:
        return self.n

    # -- the protocol -------------------------------------------------------------------------
    def _check_idx(self, idx: torch.Tensor) -> torch.Tensor:
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"memory bank indices must be an int64 tensor, got {got}")
        idx = idx.to(device=self.student.device, dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise IndexError(
                f"memory bank index out of range: got min {int(idx.min())}, max {int(idx.max())}, bank has n={self.n} rows"
            )
        return idx

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` (shape S) of both sides, as ``S x dim`` tensors in the storage dtype (no grad)."""
        i = self._check_idx(idx)
        flat_i = i.reshape(-1)
        shape = (*i.shape, self.dim)
        return (self.student.index_select(0, flat_i).reshape(shape),
                self.teacher.index_select(0, flat_i).reshape(shape))

    def sample(self, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``k`` indices uniform in ``[0, n)`` with replacement (the reference's uniform AliasMethod).

        Without ``generator`` the bank's own seeded CPU generator is used (saved in ``state_dict``).
        The indices are returned on the bank's device.
        """
        gen = generator if generator is not None else self._generator
        idx = torch.randint(0, self.n, (int(k),), generator=gen, device=gen.device)
        return idx.to(self.student.device)

    @torch.no_grad()
    def update(self, idx: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """``rows[idx] = normalize(m * rows[idx] + (1 - m) * v)`` for both sides, computed in fp32.

        ``idx``: B int64; ``v_s``, ``v_t``: B x dim. With repeated indices one of the writes wins
        (as the reference's ``index_copy_``).
        """
        i = self._check_idx(idx).reshape(-1)
        for name, rows, v in (("v_s", self.student, v_s), ("v_t", self.teacher, v_t)):
            if v.shape != (i.numel(), self.dim):
                raise ValueError(
                    f"memory bank update: {name} must be {i.numel()} x {self.dim} (B x dim), got {tuple(v.shape)}"
                )
            compute = torch.float64 if rows.dtype == torch.float64 else torch.float32
            old = rows.index_select(0, i).to(compute)
            new = old.mul(self.momentum).add(v.detach().to(device=rows.device, dtype=compute), alpha=1.0 - self.momentum)
            new = new / new.pow(2).sum(dim=1, keepdim=True).sqrt()
            rows.index_copy_(0, i, new.to(rows.dtype))

    # -- checkpointing ------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"n": self.n, "dim": self.dim, "momentum": self.momentum, "seed": self.seed,
                "generator": self._generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if (state.get("n"), state.get("dim")) != (self.n, self.dim):
            raise ValueError(
                f"memory bank state is for n={state.get('n')}, dim={state.get('dim')}; this bank has "
                f"n={self.n}, dim={self.dim}"
            )
        self.momentum = float(state["momentum"])
        self.seed = int(state.get("seed", self.seed))
        if "generator" in state:
            self._generator.set_state(state["generator"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Keep the storage dtype of this bank when loading rows saved in another dtype.
        for name in ("student", "teacher"):
            key = prefix + name
            if key in state_dict and state_dict[key].dtype != getattr(self, name).dtype:
                state_dict[key] = state_dict[key].to(getattr(self, name).dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"n={self.n}, dim={self.dim}, momentum={self.momentum}, dtype={self.dtype}"
