"""Running a teacher: eval mode, no grad, tapped layers + logits, optional autocast.

The same runner serves the online mode (in a training worker), the Serve replicas and cache builds,
so every path computes identical features. A multi-teacher job runs a :class:`TeacherSet`: every teacher,
their outputs in one flat dict keyed ``"<teacher>/<layer>"`` and ``"<teacher>/logits"`` (:func:`feature_key`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from kdcore.taps import FeatureTaps

LOGITS = "logits"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TeacherRunner:
    """Call with a batch of inputs; returns ``{tap: tensor, "logits": tensor}`` in float32 on CPU."""

    def __init__(self, model: nn.Module, taps: list[str], precision: str = "fp32", device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.taps = list(dict.fromkeys(t for t in taps if t != LOGITS))
        self.precision = precision
        self.forwards = 0  # teacher forward passes run (tests count them)
        self.rows = 0
        # validates tap names eagerly (raises LayerNotFoundError with the closest names)
        self._taps = FeatureTaps(self.model, self.taps, detach=True)

    def _autocast(self):
        if self.precision == "fp32" or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=_DTYPES[self.precision])

    def shapes(self, sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of every tap and the logits, from one forward on ``sample`` (a probe: it is not
        counted in ``forwards``/``rows``)."""
        forwards, rows = self.forwards, self.rows
        out = self(sample)
        self.forwards, self.rows = forwards, rows
        return {k: tuple(int(d) for d in v.shape[1:]) for k, v in out.items()}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        with self._taps as taps, self._autocast():
            logits = self.model(x)
            feats = dict(taps.features)
        self.forwards += 1
        self.rows += len(x)
        out = {name: t.float().cpu() for name, t in feats.items()}
        out[LOGITS] = logits.float().cpu()
        return out


def feature_key(teacher: str | None, layer: str) -> str:
    """The key of teacher ``teacher``'s ``layer`` (or ``"logits"``) in a multi-teacher feature dict; the plain
    layer name when ``teacher`` is None (a single-teacher job)."""
    return layer if teacher is None else f"{teacher}/{layer}"


def prefixed(teacher: str, features: dict) -> dict:
    """``features`` of one teacher with every key made ``"<teacher>/<key>"``."""
    return {feature_key(teacher, k): v for k, v in features.items()}


def mean_logits(features: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The teachers' weight-normalised average of logits, ``sum_n w_n z_n / sum_n w_n`` over the teachers with
    ``w_n > 0``; ``z_n`` is ``features["<n>/logits"]`` (B, C). Raises ValueError when the class counts differ or
    no weight is positive."""
    used = [(n, float(w)) for n, w in weights.items() if w > 0]
    if not used:
        raise ValueError("the mean of the teachers' logits needs a teacher with weight > 0")
    total = sum(w for _, w in used)
    out = None
    for n, w in used:
        z = features[feature_key(n, LOGITS)]
        if out is not None and z.shape != out.shape:
            raise ValueError(f"teacher {n!r} outputs logits of shape {tuple(z.shape)}, teacher {used[0][0]!r} "
                             f"{tuple(out.shape)}: averaged logits need one class count")
        term = z * (w / total)
        out = term if out is None else out + term
    return out


class TeacherSet:
    """Several named teachers called as one: ``{"<name>/<tap>": tensor, "<name>/logits": tensor}`` in float32.

    Looks like a :class:`TeacherRunner` to its callers (``__call__``, ``shapes``, ``forwards``, ``rows``);
    ``runners`` holds each teacher's own runner (what its cache build uses)."""

    def __init__(self, runners: dict[str, TeacherRunner]) -> None:
        if not runners:
            raise ValueError("a TeacherSet needs at least one teacher")
        self.runners = dict(runners)

    @property
    def forwards(self) -> int:
        """Teacher forward passes run, summed over the teachers."""
        return sum(r.forwards for r in self.runners.values())

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.runners.values())

    def shapes(self, sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for name, runner in self.runners.items():
            out.update(prefixed(name, runner.shapes(sample)))
        return out

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, runner in self.runners.items():
            out.update(prefixed(name, runner(x)))
        return out
