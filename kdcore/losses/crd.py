"""Contrastive representation distillation with a memory bank of negatives.

Over 300 lines on purpose: both objectives, both negative schemes and the remote-bank protocol are one
method, documented and tested together.

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020. ``objective="nce"``
follows the authors' reference code (RepDistiller ``CRDLoss`` + ``ContrastMemory`` +
``ContrastLoss``) so the published hyperparameters (T = 0.07, momentum 0.5, feat_dim 128,
K = 16384, weight 0.8) carry over.

Reference semantics kept here:

* heads: ``embed(x) = normalize(W flatten(x) + b)`` for each side (``embed_s``, ``embed_t``);
* the memory bank holds a student row and a teacher row per training sample; student anchors
  ``v_s`` are scored against *teacher* bank rows and teacher anchors ``v_t`` against *student*
  bank rows, the positive being the bank row of the sample itself (index ``idx``);
* ``P = exp(<v, row> / T) / Z`` with ``Z = mean(exp(<v, row> / T)) * n_data`` over the first
  batch's (K + 1) scores per anchor, then fixed (one constant per direction);
* NCE with noise probability ``Pn = 1 / n_data`` and ``m = K``:
  ``loss = -(sum_b log(P_pos / (P_pos + m Pn + eps)) + sum_{b,k} log(m Pn / (P_neg + m Pn + eps))) / B``,
  eps = 1e-7, for both directions, summed;
* the bank is updated after scoring: ``row[idx] = normalize(m * row[idx] + (1 - m) * v)``.

The NCE terms are evaluated in log space (``log P = s / T - log Z``), which is the same number
without overflowing ``exp`` at small temperatures; scores are computed in at least fp32.

Over 300 lines: the module, both objectives, both negative modes and the remote-bank protocol are one
method and are kept together with its distiller adapters.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdcore.memory import BankProtocol, MemoryBank

NCE_EPS = 1e-7

Objective = Literal["nce", "softmax"]
NegativeMode = Literal["per_anchor", "shared"]


class Embed(nn.Module):
    """``x (B x ...) -> normalize(W x.view(B, -1) + b)`` (B x dim_out), the reference CRD head."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.linear.in_features:
            raise ValueError(
                f"crd: features flatten to {x.shape[1]} values per sample, but the head expects "
                f"{self.linear.in_features}; got input shape {tuple(x.shape)}"
            )
        z = self.linear(x)
        return z / z.pow(2).sum(dim=1, keepdim=True).sqrt()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def nce_loss(log_p: torch.Tensor, n_data: int) -> torch.Tensor:
    """RepDistiller ``ContrastLoss`` on log-probabilities.

    Args:
        log_p: B x (K+1) of ``log P = score / T - log Z``; column 0 is the positive.
        n_data: dataset size (noise probability 1 / n_data).

    Returns:
        0-d tensor ``-(sum log D1 + sum log D0) / B``.
    """
    bsz, cols = log_p.shape
    m = cols - 1
    mpn = m / float(n_data)
    log_floor = math.log(mpn + NCE_EPS)
    floor = torch.full_like(log_p, log_floor)
    log_denom = torch.logaddexp(log_p, floor)  # log(P + m Pn + eps)
    log_d1 = log_p[:, 0] - log_denom[:, 0]
    if m > 0:
        log_d0 = math.log(mpn) - log_denom[:, 1:]
        total = log_d1.sum() + log_d0.sum()
    else:
        total = log_d1.sum()
    return -total / bsz


class CRDLoss(nn.Module):
    """CRD loss with its two embedding heads and its memory bank.

    Args:
        student_dim: flattened size of the student feature (d_s).
        teacher_dim: flattened size of the teacher feature (d_t).
        feat_dim: embedding size of both heads and of the bank rows.
        n_data: number of training samples (bank rows). May be omitted when ``bank`` is given.
        nce_k: K, negatives per anchor (ignored when the caller supplies negatives or contrast_idx).
        temperature: T of ``exp(<u, v> / T)``.
        momentum: bank momentum (used only when this module builds its own bank).
        objective: ``"nce"`` (reference) or ``"softmax"`` (InfoNCE over bank negatives:
            ``-log(exp(<z_s, z_t>/T) / (exp(<z_s, z_t>/T) + sum_k exp(<z_s, n_k>/T)))``, batch
            mean, both directions summed; the positive is the *current* other-side embedding).
        negatives: ``"per_anchor"`` (reference: a B x K gather of distinct negatives per anchor)
            or ``"shared"`` (one set of K negative indices for the whole batch: a K x d gather and
            one B x d @ d x K matmul per direction).
        bank: a :class:`kdcore.memory.BankProtocol` (e.g. a remote bank); default a local
            :class:`MemoryBank` of ``n_data x feat_dim`` (``bank_dtype`` storage, ``seed``).
        bank_dtype: storage dtype of the default bank.
        seed: seed of the default bank.

    ``forward`` returns the 0-d loss. The normalisation constants ``Z_s`` (student anchors vs
    teacher rows) and ``Z_t`` (teacher anchors vs student rows) are set by the first NCE call
    and saved in ``state_dict``.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        feat_dim: int = 128,
        n_data: int | None = None,
        nce_k: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        objective: Objective = "nce",
        negatives: NegativeMode = "per_anchor",
        bank: BankProtocol | None = None,
        *,
        bank_dtype: torch.dtype | str = torch.float32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if objective not in ("nce", "softmax"):
            raise ValueError(f"crd objective must be 'nce' or 'softmax', got {objective!r}")
        if negatives not in ("per_anchor", "shared"):
            raise ValueError(f"crd negatives must be 'per_anchor' or 'shared', got {negatives!r}")
        if not float(temperature) > 0:
            raise ValueError(f"crd temperature must be > 0, got {temperature}")
        if int(nce_k) <= 0:
            raise ValueError(f"crd nce_k must be > 0, got {nce_k}")
        if bank is None:
            if n_data is None:
                raise ValueError("crd needs n_data (the number of training samples) or a bank")
            bank = MemoryBank(int(n_data), int(feat_dim), momentum=momentum, dtype=bank_dtype, seed=seed)
        else:
            if not isinstance(bank, BankProtocol):
                raise TypeError(f"crd bank must implement kdcore.memory.BankProtocol, got {type(bank).__name__}")
            if n_data is not None and int(n_data) != int(bank.n):
                raise ValueError(f"crd n_data={n_data} does not match the bank's n={bank.n}")
            if int(bank.dim) != int(feat_dim):
                raise ValueError(f"crd feat_dim={feat_dim} does not match the bank's dim={bank.dim}")
        self.student_dim = int(student_dim)
        self.teacher_dim = int(teacher_dim)
        self.feat_dim = int(feat_dim)
        self.n_data = int(bank.n)
        self.nce_k = int(nce_k)
        self.temperature = float(temperature)
        self.objective: Objective = objective
        self.negatives: NegativeMode = negatives
        self.embed_s = Embed(self.student_dim, self.feat_dim)
        self.embed_t = Embed(self.teacher_dim, self.feat_dim)
        self.bank = bank  # a MemoryBank registers as a submodule (moves and checkpoints with this loss)
        self.log_z_s: float | None = None
        self.log_z_t: float | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- normalisation constants ---------------------------------------------------------------
    @property
    def Z_s(self) -> float | None:  # noqa: N802 (the paper's name)
        """Normaliser of student-anchor scores (reference ``Z_v1``), None until the first NCE batch."""
        return None if self.log_z_s is None else math.exp(self.log_z_s)

    @property
    def Z_t(self) -> float | None:  # noqa: N802
        """Normaliser of teacher-anchor scores (reference ``Z_v2``), None until the first NCE batch."""
        return None if self.log_z_t is None else math.exp(self.log_z_t)

    def get_extra_state(self) -> dict[str, Any]:
        return {"log_z_s": self.log_z_s, "log_z_t": self.log_z_t}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.log_z_s = state.get("log_z_s")
        self.log_z_t = state.get("log_z_t")

    # -- negatives -----------------------------------------------------------------------------
    def sample_negatives(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Negative indices for one step: K (shared mode) or B x K (per-anchor mode), uniform."""
        if self.negatives == "shared":
            return self.bank.sample(self.nce_k, generator=generator)
        return self.bank.sample(batch_size * self.nce_k, generator=generator).reshape(batch_size, self.nce_k)

    # -- bank updates --------------------------------------------------------------------------
    def pending_update(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The ``(idx, v_s, v_t)`` of the last ``forward(..., update_bank=False)`` (detached), and forget it.

        Apply it with ``bank.update(*u)`` (e.g. on a remote bank) or :meth:`apply_update`.
        """
        update, self._pending = self._pending, None
        return update

    def apply_update(self, update: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Apply ``update`` (default: the pending one) to ``self.bank``."""
        if update is None:
            update = self.pending_update()
        if update is not None:
            self.bank.update(*update)

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        f_s: torch.Tensor,
        f_t: torch.Tensor,
        idx: torch.Tensor,
        contrast_idx: torch.Tensor | None = None,
        *,
        negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
        positives: tuple[torch.Tensor, torch.Tensor] | None = None,
        update_bank: bool = True,
    ) -> torch.Tensor:
        """CRD loss of one batch.

        Args:
            f_s: B x d_s student features (any B x ... shape, flattened).
            f_t: B x d_t teacher features.
            idx: B int64 dataset indices of the batch (bank rows of the positives).
            contrast_idx: optional explicit bank indices. Per-anchor mode: B x (K+1), column 0
                equal to ``idx`` (the reference data loader's ``sample_idx``). Shared mode: K
                negative indices. Default: drawn uniformly from the bank.
            negatives: optional precomputed bank rows ``(neg_s, neg_t)`` (student rows score the
                teacher anchors, teacher rows the student anchors): K x feat_dim (shared mode,
                e.g. prefetched by a remote bank one step ahead) or B x K x feat_dim (per-anchor
                mode). Treated as constants.
            positives: optional bank rows ``(pos_s, pos_t)`` of ``idx``, B x feat_dim, used with
                ``negatives`` by the NCE objective (default: ``bank.gather(idx)``).
            update_bank: apply the bank update after scoring; when False it is kept for
                :meth:`pending_update`.

        Returns:
            0-d loss (sum of the two directions).
        """
        bsz = f_s.shape[0] if f_s.dim() else 0
        if f_s.dim() < 1 or f_t.dim() < 1 or f_s.shape[0] != f_t.shape[0] or bsz == 0:
            raise ValueError(
                f"crd: student and teacher features must share a non-empty batch dimension, got student "
                f"{tuple(f_s.shape)} and teacher {tuple(f_t.shape)}"
            )
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32) or idx.shape != (bsz,):
            got = (tuple(idx.shape), idx.dtype) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"crd: idx must be an int64 tensor of shape ({bsz},) (one index per sample), got {got}")
        idx = idx.long()
        if contrast_idx is not None and negatives is not None:
            raise ValueError("crd: pass either contrast_idx or negatives, not both")
        if positives is not None and negatives is None:
            raise ValueError("crd: positives are only used together with precomputed negatives")

        v_s = self.embed_s(f_s)
        v_t = self.embed_t(f_t)
        dtype = _compute_dtype(torch.promote_types(v_s.dtype, v_t.dtype))
        device = v_s.device
        a_s = v_s.to(dtype)
        a_t = v_t.to(dtype)

        def rows(x: torch.Tensor) -> torch.Tensor:
            return x.detach().to(device=device, dtype=dtype)

        pos_s = pos_t = None
        if negatives is not None:
            neg_s, neg_t = rows(negatives[0]), rows(negatives[1])
            if self.negatives == "shared":
                ok = neg_s.dim() == 2 and neg_s.shape[1] == self.feat_dim
                want = f"K x {self.feat_dim}"
            else:
                ok = neg_s.dim() == 3 and neg_s.shape[0] == bsz and neg_s.shape[2] == self.feat_dim
                want = f"{bsz} x K x {self.feat_dim}"
            if not ok or neg_t.shape != neg_s.shape:
                raise ValueError(
                    f"crd ({self.negatives} negatives): neg_s and neg_t must both be {want}, got "
                    f"{tuple(neg_s.shape)} and {tuple(neg_t.shape)}"
                )
            if self.objective == "nce":
                if positives is not None:
                    pos_s, pos_t = rows(positives[0]), rows(positives[1])
                    for name, p in (("pos_s", pos_s), ("pos_t", pos_t)):
                        if p.shape != (bsz, self.feat_dim):
                            raise ValueError(f"crd: {name} must be {bsz} x {self.feat_dim}, got {tuple(p.shape)}")
                else:
                    g_s, g_t = self.bank.gather(idx)
                    pos_s, pos_t = rows(g_s), rows(g_t)
        elif self.negatives == "shared":
            if contrast_idx is None:
                neg_idx = self.sample_negatives(bsz)
            else:
                if contrast_idx.dim() != 1:
                    raise ValueError(
                        f"crd (shared negatives): contrast_idx must be the K shared negative indices (1-D), got shape "
                        f"{tuple(contrast_idx.shape)}; use negatives='per_anchor' for B x (K+1) indices"
                    )
                neg_idx = contrast_idx.long()
            need_pos = self.objective == "nce"
            all_idx = torch.cat([idx.to(neg_idx.device), neg_idx]) if need_pos else neg_idx
            g_s, g_t = self.bank.gather(all_idx)
            g_s, g_t = rows(g_s), rows(g_t)
            if need_pos:
                pos_s, neg_s = g_s[:bsz], g_s[bsz:]
                pos_t, neg_t = g_t[:bsz], g_t[bsz:]
            else:
                neg_s, neg_t = g_s, g_t
        else:
            if contrast_idx is None:
                neg = self.sample_negatives(bsz)
                full = torch.cat([idx.to(neg.device).unsqueeze(1), neg], dim=1)
            else:
                if contrast_idx.dim() != 2 or contrast_idx.shape[0] != bsz or contrast_idx.shape[1] < 2:
                    raise ValueError(
                        f"crd (per-anchor negatives): contrast_idx must be {bsz} x (K+1) with column 0 = idx, got "
                        f"shape {tuple(contrast_idx.shape)}"
                    )
                full = contrast_idx.long()
                if not torch.equal(full[:, 0].to(idx.device), idx):
                    raise ValueError("crd: contrast_idx[:, 0] must equal idx (column 0 holds the positives)")
            g_s, g_t = self.bank.gather(full)
            g_s, g_t = rows(g_s), rows(g_t)
            pos_s, neg_s = g_s[:, 0], g_s[:, 1:]
            pos_t, neg_t = g_t[:, 0], g_t[:, 1:]

        # scores in fp32/fp64 even inside an autocast region (exp(1/T) overflows fp16)
        with torch.autocast(device_type=device.type, enabled=False):
            if self.objective == "nce":
                # scores of student anchors against teacher rows and teacher anchors against student rows
                s_s = torch.cat([(a_s * pos_t).sum(1, keepdim=True), self._neg_scores(a_s, neg_t)], dim=1)
                s_t = torch.cat([(a_t * pos_s).sum(1, keepdim=True), self._neg_scores(a_t, neg_s)], dim=1)
                logit_s = s_s / self.temperature
                logit_t = s_t / self.temperature
                if self.log_z_s is None:
                    self.log_z_s = self._log_z(logit_s)
                if self.log_z_t is None:
                    self.log_z_t = self._log_z(logit_t)
                loss = nce_loss(logit_s - self.log_z_s, self.n_data) + nce_loss(logit_t - self.log_z_t, self.n_data)
            else:
                pos = (a_s * a_t).sum(1, keepdim=True) / self.temperature
                logits_s = torch.cat([pos, self._neg_scores(a_s, neg_t) / self.temperature], dim=1)
                logits_t = torch.cat([pos, self._neg_scores(a_t, neg_s) / self.temperature], dim=1)
                target = torch.zeros(bsz, dtype=torch.long, device=device)
                loss = F.cross_entropy(logits_s, target) + F.cross_entropy(logits_t, target)

        update = (idx, v_s.detach(), v_t.detach())
        if update_bank:
            self._pending = None
            self.bank.update(*update)
        else:
            self._pending = update
        return loss

    @staticmethod
    def _neg_scores(anchor: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """B x d anchors vs K x d (shared) or B x K x d (per-anchor) rows -> B x K scores."""
        if neg.dim() == 2:
            return anchor @ neg.t()
        return torch.bmm(neg, anchor.unsqueeze(2)).squeeze(2)

    def _log_z(self, logits: torch.Tensor) -> float:
        """``log(mean(exp(logits)) * n_data)`` of the first batch (reference: ``out.mean() * outputSize``)."""
        with torch.no_grad():
            lse = torch.logsumexp(logits.detach().double().reshape(-1), dim=0).item()
        return lse - math.log(logits.numel()) + math.log(self.n_data)

    def extra_repr(self) -> str:
        return (f"n_data={self.n_data}, nce_k={self.nce_k}, T={self.temperature}, objective={self.objective!r}, "
                f"negatives={self.negatives!r}")


def build(ctx) -> CRDLoss:
    """Distiller adapter (``kdcore.losses.registry.BuildContext``): the pair's CRD module and its bank."""
    prm = ctx.spec.params
    bank = None
    if ctx.bank_factory is not None:
        bank = ctx.bank_factory(ctx.n_data, prm.feat_dim, prm.momentum, prm.bank_dtype)
    return CRDLoss(math.prod(ctx.student_shape), math.prod(ctx.teacher_shape), feat_dim=prm.feat_dim,
                   n_data=None if bank else ctx.n_data, nce_k=prm.nce_k, temperature=prm.temperature,
                   momentum=prm.momentum, objective=prm.objective, negatives=prm.negatives, bank=bank,
                   bank_dtype=torch.float16 if prm.bank_dtype == "fp16" else torch.float32, seed=ctx.seed)


def term(inp) -> torch.Tensor:
    """Distiller adapter (``kdcore.losses.registry.TermInputs``): raw features flattened, the batch's rows."""
    if inp.idx is None:
        raise ValueError("crd needs the batch's training-row indices (idx)")
    given = inp.bank_inputs or {}
    return inp.module(inp.student.flatten(1), inp.teacher.flatten(1), inp.idx, negatives=given.get("negatives"),
                      positives=given.get("positives"), update_bank=inp.update_bank)
