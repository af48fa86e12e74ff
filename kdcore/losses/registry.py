"""The one table of loss kinds: what each needs, its spec model, how the distiller computes it.

Adding a loss is one module in ``kdcore/losses/`` (the tensor-in, tensor-out math plus a ``term``
adapter) and one :class:`LossEntry` passed to :func:`register_loss`. Everything that knows about
loss kinds reads this table: the spec union (``kdcore.spec.losses.LossSpec``), the YAML error
loader, the job's cross-field checks and :class:`kdcore.distiller.Distiller`. The built-in kinds are
registered by ``kdcore.spec.losses`` next to their spec models.

This module imports neither torch nor pydantic, so the spec layer can read the table without
loading torch; ``compute`` and ``build`` may be given as ``"package.module:function"`` strings,
imported on first use.

``needs`` says what a term is computed from:

* ``labels``:   the student's logits and the batch's labels (the task loss);
* ``logits``:   student and teacher logits (B, C); the labels are passed too, for losses that use
  the target class (DKD, NKD). A logit term's spec has a ``teacher`` field (``kdcore.spec.losses._teacher``):
  in a multi-teacher job the teacher whose logits it gets, or ``mean`` (their weighted average); the
  distiller resolves it for every logit term in one place (``Distiller._teacher_logits``);
* ``pair``:     one layer pair (``pair:`` in the spec); with ``headed=True`` both sides go through the
  pair's projection heads first, otherwise the raw features (and the term's own ``build`` module);
* ``pair_raw``: one layer pair, the teacher's raw tapped features (never a fixed projection of them:
  a projected stream payload is refused with ``raw_reason``);
* ``bank``:     one layer pair plus a memory bank of negatives (CRD); its module is built with the
  job's ``bank_factory`` and lives in ``Distiller.crd``;
* ``pairs``:    several layer pairs (``pairs: [a, b, ...]`` in the spec), raw features of each.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

NEEDS = ("labels", "logits", "pair", "pair_raw", "bank", "pairs")
_RAW = ("pair_raw", "bank", "pairs")  # needs that take the teacher's raw features


@dataclass
class TermInputs:
    """What the distiller hands a term's ``compute``.

    ``student`` / ``teacher``: logits (B, C) for ``labels`` / ``logits`` terms; the pair's features
    (B, ...) for pair terms (after the heads when ``headed``); lists of features, one per pair, for
    ``pairs`` terms. ``module``: the term's training-only module (its entry's ``build``), if any.
    ``labels`` (B,) int64 and ``labeled`` (B,) bool: may be None (a batch without labels).
    ``epoch``: completed epochs, from ``Distiller.set_epoch`` (None when the loop never set it).
    ``idx``, ``bank_inputs``, ``update_bank``: the memory-bank terms' row indices, pre-fetched bank
    rows and whether to update the bank now.
    """

    spec: Any
    student: Any = None
    teacher: Any = None
    module: Any = None
    labels: Any = None
    labeled: Any = None
    epoch: int | None = None
    idx: Any = None
    bank_inputs: dict | None = None
    update_bank: bool = True

    @property
    def params(self) -> Any:
        return getattr(self.spec, "params", None)


@dataclass
class BuildContext:
    """What an entry's ``build`` gets to size its module.

    ``student_shape`` / ``teacher_shape``: per-sample feature shapes (no batch dim) of the pair, or
    lists of them (``pairs`` terms); logits shapes for logit terms. ``n_data``: training rows;
    ``bank_factory``: optional remote bank constructor; ``seed``: the job's seed.
    """

    spec: Any
    student_shape: Any
    teacher_shape: Any
    n_data: int
    bank_factory: Callable | None = None
    seed: int = 0


def _resolve(target: Callable | str | None) -> Callable | None:
    if target is None or callable(target):
        return target
    module, _, attr = str(target).partition(":")
    if not module or not attr:
        raise ValueError(f"loss table: {target!r} is not 'package.module:function'")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class LossEntry:
    """One loss kind.

    Args:
        kind: the ``kind:`` value in a job spec.
        spec: its spec model (a :class:`kdcore.spec.Spec` subclass with ``kind: Literal[kind]``,
            ``weight`` and ``params``; ``pair: str`` for pair terms, ``pairs: list[str]`` for ``pairs``).
        needs: one of :data:`NEEDS` (see the module docstring).
        compute: ``(TermInputs) -> 0-d tensor`` (or None: no term for this batch), or its
            ``"module:function"`` path.
        headed: ``pair`` terms only: compare after the pair's projection heads.
        ranks: accepted ranks of a batch of features (batch dim included), e.g. ``{2}`` vectors,
            ``{4}`` maps; None accepts any. Checked by the distiller against both sides' shapes.
        build: ``(BuildContext) -> nn.Module`` for a training-only module (a generator, a fusion
            block, a linear map; never part of the exported student), or its path.
        raw_reason: why the term needs the teacher's raw features (required for raw needs; shown
            when a job streams projected features).

    A spec whose ``params`` has ``warmup_epochs`` > 0 is scaled by :func:`warmup_factor` by the
    distiller (the training loop must call ``Distiller.set_epoch`` before each epoch).
    """

    kind: str
    spec: type
    needs: str
    compute: Callable | str
    headed: bool = False
    ranks: frozenset[int] | None = None
    build: Callable | str | None = None
    raw_reason: str | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.needs not in NEEDS:
            raise ValueError(f"loss {self.kind!r}: needs must be one of {NEEDS}, got {self.needs!r}")
        if self.headed and self.needs != "pair":
            raise ValueError(f"loss {self.kind!r}: only 'pair' terms can be headed")
        if self.needs in _RAW and not self.raw_reason:
            raise ValueError(f"loss {self.kind!r}: a {self.needs!r} term needs a raw_reason")
        if self.ranks is not None:
            object.__setattr__(self, "ranks", frozenset(int(r) for r in self.ranks))

    @property
    def paired(self) -> bool:
        return self.needs not in ("labels", "logits")

    @property
    def needs_raw_teacher(self) -> bool:
        return self.raw_reason is not None

    def run(self, inputs: TermInputs) -> Any:
        fn = self._cache.get("compute") or self._cache.setdefault("compute", _resolve(self.compute))
        return fn(inputs)

    def make_module(self, ctx: BuildContext) -> Any:
        fn = self._cache.get("build") or self._cache.setdefault("build", _resolve(self.build))
        return fn(ctx) if fn is not None else None


_TABLE: dict[str, LossEntry] = {}
_LISTENERS: list[Callable[[], None]] = []
_STATE = {"builtins": False}


def _builtins() -> None:
    if not _STATE["builtins"]:
        _STATE["builtins"] = True
        importlib.import_module("kdcore.spec.losses")  # registers the built-in kinds


def register_loss(entry: LossEntry, *, replace: bool = False) -> LossEntry:
    """Add ``entry`` to the table; the spec union and every model holding it are rebuilt.

    Raises ValueError for a kind already registered (unless ``replace``) or a spec model whose
    ``kind`` field does not fix the value ``entry.kind``.
    """
    _builtins()
    if entry.kind in _TABLE and not replace:
        raise ValueError(f"loss kind {entry.kind!r} is already registered")
    fields = getattr(entry.spec, "model_fields", {})
    kind_field = fields.get("kind")
    args = getattr(getattr(kind_field, "annotation", None), "__args__", ())
    if tuple(args) != (entry.kind,):
        raise ValueError(f"loss {entry.kind!r}: its spec model {entry.spec.__name__} must declare "
                         f"kind: Literal[{entry.kind!r}]")
    if entry.paired and not ({"pair", "pairs"} & set(fields)):
        raise ValueError(f"loss {entry.kind!r}: a {entry.needs!r} term's spec needs a 'pair' or 'pairs' field")
    _TABLE[entry.kind] = entry
    for listener in list(_LISTENERS):
        listener()
    return entry


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener()`` after every registration (the spec layer rebuilds its models)."""
    _LISTENERS.append(listener)


def get(kind: str) -> LossEntry:
    _builtins()
    try:
        return _TABLE[kind]
    except KeyError:
        raise KeyError(f"unknown loss kind {kind!r}; registered: {', '.join(_TABLE)}") from None


def entries() -> list[LossEntry]:
    _builtins()
    return list(_TABLE.values())


def kinds() -> tuple[str, ...]:
    _builtins()
    return tuple(_TABLE)


def pair_names(loss: Any) -> list[str]:
    """The layer pairs a loss term refers to (``pair`` or ``pairs``), in order; [] for logit terms."""
    pairs = getattr(loss, "pairs", None)
    if pairs:
        return list(pairs)
    pair = getattr(loss, "pair", None)
    return [pair] if pair else []


def logit_teacher(loss: Any) -> str | None:
    """The ``teacher`` a logit term names (a teacher's name or ``mean``); None when unset or not a logit term."""
    return getattr(loss, "teacher", None)


def term_name(loss: Any) -> str:
    """``kind`` or ``kind/pair`` (``kind/a+b`` for several pairs), ``kind@teacher`` for a logit term that names
    its teacher: the name of the term in the loss parts."""
    names = pair_names(loss)
    if names:
        return f"{loss.kind}/{'+'.join(names)}"
    teacher = logit_teacher(loss)
    return f"{loss.kind}@{teacher}" if teacher else loss.kind


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """``min((epoch + 1) / warmup_epochs, 1)`` for the 0-based ``epoch`` about to run; 1 without warm-up.

    mdistiller counts epochs from 1 and scales DKD / ReviewKD by ``min(epoch / warmup, 1)``; with
    kd's 0-based epochs that is ``epoch + 1``, so the first epoch trains at ``1 / warmup_epochs``.
    """
    if warmup_epochs <= 0:
        return 1.0
    return min((int(epoch) + 1) / float(warmup_epochs), 1.0)


def check_ranks(entry: LossEntry, side: str, shape: Iterable[int], where: str) -> None:
    """Raise ValueError when a per-sample ``shape`` (no batch dim) has a rank ``entry`` refuses."""
    shape = tuple(shape)
    if entry.ranks is not None and len(shape) + 1 not in entry.ranks:
        want = " or ".join({2: "vectors (B, d)", 4: "feature maps (B, C, H, W)"}.get(r, f"rank {r}")
                           for r in sorted(entry.ranks))
        raise ValueError(f"{where}: {entry.kind} needs {want}, but the {side} feature is {shape} per sample; "
                         "tap another layer")
