"""Projection heads: map student (and optionally teacher) features into the space a loss compares.

Over 300 lines on purpose: every head kind (and the ensemble wrapper) is a small class, kept side by side.

Built from a :class:`kdcore.spec.ProjectorSpec` (read through ``getattr`` only, so any object with
the same attributes works). Kinds:

* ``linear``:   ``z = W h + b`` (FitNets' regressor, Romero et al. 2015), no activation.
* ``mlp``:      ``Linear(d_in, h) -> BatchNorm1d(h) -> act -> Linear(h, d_out)``, ``h`` default ``max(d_in, d_out)``.
* ``conv``:     for B x C x H x W maps. Same spatial size: ``Conv2d 1x1``; otherwise FitNets'
  ``ConvReg`` shape matching: student 2x larger -> 3x3 stride-2 conv; student 2x smaller ->
  4x4 stride-2 transposed conv; student larger by ``(dh, dw)`` -> ``(1+dh) x (1+dw)`` conv.
  Then ``BatchNorm2d -> act`` (ConvReg = batchnorm on, activation relu).
* ``lowrank``:  ``d_in -> r -> d_out`` (two linear maps, no activation), r default
  ``max(8, min(d_in, d_out) // 4)``.
* ``identity``: no parameters; requires ``d_in == d_out``.

Options: ``activation`` and ``batchnorm`` apply inside mlp and conv heads; a batch-norm layer is
bypassed in training mode when it would see one value per channel (a one-sample batch, or one
sample with a 1x1 map), where batch statistics do not exist. ``l2_normalize`` divides each
output sample by its L2 norm (conv outputs: over the flattened C*H*W map). ``weight_norm``
reparametrises every linear / conv weight (``torch.nn.utils.parametrizations.weight_norm``).
Non-conv heads flatten B x ... inputs to B x d.

Ensembles (Chen et al., "Improved Feature Distillation via Projector Ensemble", NeurIPS 2022):
``ensemble: n`` builds n independently initialised heads of the same kind and averages their outputs
(:class:`ProjectorEnsemble`). The authors' heads are linear maps each followed by a ReLU, compared with
the cosine loss; kd's ``linear`` heads have no activation.

Over 300 lines because every head kind, its shape rules and the ensemble live together: the spec's
projector options map onto this one file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

from kdcore.errors import UserError

KINDS = ("linear", "mlp", "conv", "lowrank", "identity")
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "none")


def _activation(name: str) -> nn.Module | None:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1)
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    if name == "none":
        return None
    raise UserError(f"unknown projector activation {name!r}; use one of {', '.join(ACTIVATIONS)}")


class _BatchNorm(nn.Module):
    """BatchNorm1d/2d that is bypassed in training when there is one value per channel."""

    def __init__(self, channels: int, two_d: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels) if two_d else nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() // x.shape[1] <= 1:
            return x
        return self.bn(x)


class Projector(nn.Module):
    """A projection head. ``body`` holds the layers; ``kind``, ``in_dim``, ``out_dim`` describe it."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, body: nn.Module, flatten: bool, l2_normalize: bool):
        super().__init__()
        self.kind = kind
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.body = body
        self.flatten = flatten
        self.l2_normalize = l2_normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            x = x.reshape(x.shape[0], -1)
            if x.shape[1] != self.in_dim:
                raise ValueError(
                    f"{self.kind} projector expects {self.in_dim} features per sample, got input of shape "
                    f"{tuple(x.shape)} after flattening"
                )
        elif x.dim() != 4 or x.shape[1] != self.in_dim:
            raise ValueError(
                f"conv projector expects B x {self.in_dim} x H x W feature maps, got {tuple(x.shape)}"
            )
        z = self.body(x)
        if self.l2_normalize:
            flat = z.reshape(z.shape[0], -1)
            z = (flat / flat.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)).reshape(z.shape)
        return z

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, in_dim={self.in_dim}, out_dim={self.out_dim}, l2_normalize={self.l2_normalize}"


def _hw(value: Any, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    hw = tuple(int(v) for v in value)
    if len(hw) != 2:
        raise UserError(f"{what} must be an int or (H, W), got {value!r}")
    return hw  # type: ignore[return-value]


def _conv_layer(in_ch: int, out_ch: int, in_hw, out_hw) -> nn.Module:
    if in_hw is None or out_hw is None or in_hw == out_hw:
        return nn.Conv2d(in_ch, out_ch, kernel_size=1)
    (sh, sw), (th, tw) = in_hw, out_hw
    if sh == 2 * th and sw == 2 * tw:
        return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=2, padding=1)
    if 2 * sh == th and 2 * sw == tw:
        return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1)
    if sh >= th and sw >= tw:
        return nn.Conv2d(in_ch, out_ch, kernel_size=(1 + sh - th, 1 + sw - tw))
    raise UserError(
        f"conv projector cannot map a {sh}x{sw} student map to a {th}x{tw} teacher map: the student map must be "
        "2x larger, 2x smaller, or at least as large on both axes; tap another student layer"
    )


class ProjectorEnsemble(Projector):
    """The mean of several heads' outputs: ``z = (1/n) sum_i g_i(h)``; each head initialised independently."""

    def __init__(self, heads: list[Projector]) -> None:
        first = heads[0]
        super().__init__(first.kind, first.in_dim, first.out_dim, nn.ModuleList(heads), first.flatten,
                         l2_normalize=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(x) for head in self.body]).mean(dim=0)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, in_dim={self.in_dim}, out_dim={self.out_dim}, ensemble={len(self.body)}"


def build_projector(
    spec: Any,
    in_dim: int,
    out_dim: int | None,
    *,
    in_hw: int | tuple[int, int] | None = None,
    out_hw: int | tuple[int, int] | None = None,
) -> Projector:
    """Build a head from ``spec`` (a ProjectorSpec or anything with its attributes): one, or with
    ``spec.ensemble`` = n > 1 a :class:`ProjectorEnsemble` of n (see :func:`build_one_projector`).
    """
    n = int(getattr(spec, "ensemble", 1) or 1)
    if n < 1:
        raise UserError(f"projector ensemble must be >= 1, got {n}")
    if n > 1 and getattr(spec, "kind", "linear") == "identity":
        raise UserError("an identity head has no parameters to ensemble; pick kind linear/mlp/conv/lowrank")
    heads = [build_one_projector(spec, in_dim, out_dim, in_hw=in_hw, out_hw=out_hw) for _ in range(n)]
    return heads[0] if n == 1 else ProjectorEnsemble(heads)


def build_one_projector(
    spec: Any,
    in_dim: int,
    out_dim: int | None,
    *,
    in_hw: int | tuple[int, int] | None = None,
    out_hw: int | tuple[int, int] | None = None,
) -> Projector:
    """Build one head from ``spec`` (a ProjectorSpec or anything with its attributes).

    Args:
        spec: reads ``kind, hidden_dim, rank, activation, batchnorm, l2_normalize, weight_norm``
            (``out_dim`` only when the ``out_dim`` argument is None).
        in_dim: flattened input size (vector kinds) or input channels (conv).
        out_dim: output size / channels; None: ``spec.out_dim``, else ``in_dim`` for identity.
        in_hw, out_hw: conv only, the student's and teacher's spatial sizes (int or (H, W)) when
            they may differ; omitted: a 1x1 conv.

    Raises:
        UserError: unknown kind/activation, identity with different dims, impossible conv shapes.
    """
    kind = getattr(spec, "kind", "linear")
    if kind not in KINDS:
        raise UserError(f"unknown projector kind {kind!r}; use one of {', '.join(KINDS)}")
    in_dim = int(in_dim)
    if out_dim is None:
        out_dim = getattr(spec, "out_dim", None)
    if out_dim is None:
        if kind != "identity":
            raise UserError(f"{kind} projector needs an output size: set projector.out_dim")
        out_dim = in_dim
    out_dim = int(out_dim)
    if in_dim <= 0 or out_dim <= 0:
        raise UserError(f"projector dims must be positive, got in_dim={in_dim}, out_dim={out_dim}")
    act_name = getattr(spec, "activation", "relu")
    use_bn = bool(getattr(spec, "batchnorm", True))
    l2 = bool(getattr(spec, "l2_normalize", False))
    use_wn = bool(getattr(spec, "weight_norm", False))

    layers: list[nn.Module] = []
    if kind == "identity":
        if in_dim != out_dim:
            raise UserError(
                f"identity projector needs equal dims, but the student side has {in_dim} and the target {out_dim}; "
                "use kind linear (or mlp/lowrank) to map between them"
            )
        if in_hw is not None and out_hw is not None and _hw(in_hw, "in_hw") != _hw(out_hw, "out_hw"):
            raise UserError(
                f"identity projector needs equal spatial sizes, got {_hw(in_hw, 'in_hw')} and {_hw(out_hw, 'out_hw')}; "
                "use kind conv"
            )
        return _IdentityProjector(in_dim, out_dim, l2)
    if kind == "linear":
        layers = [nn.Linear(in_dim, out_dim)]
    elif kind == "lowrank":
        rank = getattr(spec, "rank", None)
        rank = int(rank) if rank is not None else max(8, min(in_dim, out_dim) // 4)
        layers = [nn.Linear(in_dim, rank, bias=False), nn.Linear(rank, out_dim)]
    elif kind == "mlp":
        hidden = getattr(spec, "hidden_dim", None)
        hidden = int(hidden) if hidden is not None else max(in_dim, out_dim)
        layers = [nn.Linear(in_dim, hidden)]
        if use_bn:
            layers.append(_BatchNorm(hidden, two_d=False))
        act = _activation(act_name)
        if act is not None:
            layers.append(act)
        layers.append(nn.Linear(hidden, out_dim))
    else:  # conv
        layers = [_conv_layer(in_dim, out_dim, _hw(in_hw, "in_hw"), _hw(out_hw, "out_hw"))]
        if use_bn:
            layers.append(_BatchNorm(out_dim, two_d=True))
        act = _activation(act_name)
        if act is not None:
            layers.append(act)
    if kind in ("linear", "lowrank"):
        _activation(act_name)  # validate the name even where it does not apply
    if use_wn:
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.ConvTranspose2d):
                layers[i] = _weight_norm(layer, dim=1)  # output channels are dim 1 of a transposed conv weight
            elif isinstance(layer, (nn.Linear, nn.Conv2d)):
                layers[i] = _weight_norm(layer, dim=0)
    body = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
    return Projector(kind, in_dim, out_dim, body, flatten=kind != "conv", l2_normalize=l2)


class _IdentityProjector(Projector):
    """Identity head: returns its input (optionally L2-normalised per sample), any shape."""

    def __init__(self, in_dim: int, out_dim: int, l2_normalize: bool) -> None:
        super().__init__("identity", in_dim, out_dim, nn.Identity(), flatten=False, l2_normalize=l2_normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.l2_normalize:
            flat = x.reshape(x.shape[0], -1)
            return (flat / flat.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)).reshape(x.shape)
        return x


def _flat_size(value: int | tuple[int, ...] | torch.Size) -> int:
    if isinstance(value, int):
        return value
    n = 1
    for v in value:
        n *= int(v)
    return n


def _conv_dims(value: int | tuple[int, ...] | torch.Size, side: str) -> tuple[int, tuple[int, int] | None]:
    if isinstance(value, int):
        return value, None
    shape = tuple(int(v) for v in value)
    if len(shape) == 3:
        return shape[0], (shape[1], shape[2])
    if len(shape) == 1:
        return shape[0], None
    raise UserError(f"a conv projector needs C x H x W feature maps, but the {side} feature is {shape}; "
                    "use kind linear/mlp for vectors")


def build_heads(spec: Any, student_dim, teacher_dim) -> tuple[Projector, Projector | None]:
    """The pair's heads ``(g_s, g_t)``.

    ``spec.sides == "student"`` (FitNets): ``g_s`` maps the student into the teacher's space
    (output = the teacher's size; ``spec.out_dim``, if set, must equal it) and ``g_t`` is None.
    ``spec.sides == "both"``: asymmetric heads ``g_s: d_s -> d_p``, ``g_t: d_t -> d_p`` with
    ``d_p = spec.out_dim`` or 128.

    ``student_dim``/``teacher_dim``: an int (flattened vector size) or a per-sample feature shape;
    a (C, H, W) shape gives the conv kind its channels and spatial sizes, other shapes are
    flattened.
    """
    kind = getattr(spec, "kind", "linear")
    sides = getattr(spec, "sides", "student")
    if kind == "conv":
        s_dim, s_hw = _conv_dims(student_dim, "student")
        t_dim, t_hw = _conv_dims(teacher_dim, "teacher")
    else:
        s_dim, t_dim = _flat_size(student_dim), _flat_size(teacher_dim)
        s_hw = t_hw = None
    if sides == "student":
        out = getattr(spec, "out_dim", None)
        if out is not None and int(out) != t_dim:
            raise UserError(
                f"a student-only projector maps into the teacher's space ({t_dim}), but projector.out_dim is {out}; "
                "remove out_dim or set sides: both"
            )
        return build_projector(spec, s_dim, t_dim, in_hw=s_hw, out_hw=t_hw), None
    if sides != "both":
        raise UserError(f"unknown projector sides {sides!r}; use 'student' or 'both'")
    if kind == "identity":
        if s_dim != t_dim:
            raise UserError(
                f"identity heads on both sides need equal feature sizes, got student {s_dim} and teacher {t_dim}; "
                "use kind linear"
            )
        return build_projector(spec, s_dim, s_dim), build_projector(spec, t_dim, t_dim)
    d_p = getattr(spec, "out_dim", None)
    d_p = int(d_p) if d_p is not None else 128
    if kind == "conv":
        # both maps go to d_p channels at the smaller of the two spatial sizes
        target_hw = None
        if s_hw is not None and t_hw is not None:
            target_hw = (min(s_hw[0], t_hw[0]), min(s_hw[1], t_hw[1]))
        return (build_projector(spec, s_dim, d_p, in_hw=s_hw, out_hw=target_hw),
                build_projector(spec, t_dim, d_p, in_hw=t_hw, out_hw=target_hw))
    return build_projector(spec, s_dim, d_p), build_projector(spec, t_dim, d_p)

