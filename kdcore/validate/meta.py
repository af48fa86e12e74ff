"""Running models on the ``meta`` device: shapes and dtypes only, no memory, no weights.

``on_meta()`` is the context to build modules in: new tensors are meta tensors and random weight
initialisation on them is skipped (it means nothing there, and torch's Python kernels for it are slow to
load). ``is_meta_limitation(e)`` tells an error of the meta device itself (an op with no meta kernel, a
data-dependent ``.item()``) from a real mistake, so validation can skip what it cannot check.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# In-place random initialisers: skipped on meta tensors (their values do not exist).
_RANDOM_INIT = frozenset({
    "normal_", "uniform_", "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_", "random_",
    "erfinv_",
})

_META_ERROR = re.compile(r"\bmeta\b|'Meta' backend|Meta tensors?|on the meta device", re.IGNORECASE)


class _MetaShortcuts(TorchFunctionMode):
    """Skips random initialisers on meta tensors and gives batch norm its output shape directly (torch's
    Python decomposition of batch norm costs ~10 ms a call on meta; ResNet-50 has 53 of them), after the
    checks batch norm itself makes: the channel count of the statistics and parameters, and more than one
    value per channel in training."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return _batch_norm_shape(*args, **kwargs)
        if getattr(func, "__name__", "") in _RANDOM_INIT and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_meta:
            return args[0]
        return func(*args, **kwargs)


def _batch_norm_shape(input, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                      momentum=0.1, eps=1e-5):
    if input.dim() < 2:
        raise ValueError(f"batch_norm expects an input of at least 2 dimensions (N, C, ...), got {tuple(input.shape)}")
    channels = int(input.shape[1])
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise RuntimeError(f"batch_norm: {name} should contain {channels} elements not {t.numel()} "
                               f"(input of shape {tuple(input.shape)})")
    if training:
        F._verify_batch_size(input.size())
    return torch.empty_like(input)


@contextlib.contextmanager
def on_meta():
    """Build (and run) modules on the meta device: new tensors are meta, random initialisation is skipped,
    batch norm is computed by its shape."""
    with torch.device("meta"), _MetaShortcuts():
        yield


@contextlib.contextmanager
def meta_shortcuts():
    """Running modules already on meta: batch norm computed by its shape (see ``_MetaShortcuts``)."""
    with _MetaShortcuts():
        yield


def meta_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def is_meta_limitation(e: BaseException) -> bool:
    """True when ``e`` comes from running on the meta device, not from the model or the spec."""
    if isinstance(e, NotImplementedError) or _META_ERROR.search(str(e)):
        return True
    return _raised_in(e, ("amp", "autocast_mode.py")) is not None  # torch.autocast has no meta device


def _raised_in(e: BaseException, tail: tuple[str, ...]) -> str | None:
    tb = e.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name.endswith(os.path.join(*tail)):
            return name
        tb = tb.tb_next
    return None


def where_stopped(e: BaseException) -> str:
    """The last frame of ``e`` outside torch, as ``file:line`` (what a note about a skipped check names)."""
    tb, last = e.__traceback__, None
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if f"{os.sep}torch{os.sep}" not in name:
            last = f"{os.path.basename(name)}:{tb.tb_lineno}"
        tb = tb.tb_next
    return last or "?"


class MetaBank:
    """A CRD memory bank on the meta device (``kdcore.memory.BankProtocol``): right shapes, no rows."""

    def __init__(self, n: int, dim: int, momentum: float = 0.5, dtype=None) -> None:
        self.n, self.dim = int(n), int(dim)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*idx.shape, self.dim)
        return meta_tensor(shape), meta_tensor(shape)

    def sample(self, k: int, generator=None) -> torch.Tensor:
        return meta_tensor((int(k),), torch.int64)

    def update(self, idx: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        return None
