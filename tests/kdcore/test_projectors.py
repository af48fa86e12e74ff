"""Projection heads built from a ProjectorSpec-like object."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdcore.errors import UserError
from kdcore.projectors import build_heads, build_projector


def spec(**kw):
    base = dict(kind="linear", out_dim=None, hidden_dim=None, rank=None, activation="relu", batchnorm=True,
                l2_normalize=False, weight_norm=False, sides="student")
    base.update(kw)
    return SimpleNamespace(**base)


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_linear_is_wh_plus_b_and_flattens():
    head = build_projector(spec(kind="linear"), 6, 3)
    x = torch.randn(4, 2, 3)
    lin = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(lin) == 1
    expected = x.reshape(4, 6) @ lin[0].weight.t() + lin[0].bias
    torch.testing.assert_close(head(x), expected)  # no activation on a linear head
    with pytest.raises(ValueError, match="expects 6 features"):
        head(torch.randn(4, 5))


def test_mlp_structure_default_hidden_and_single_sample_batch():
    head = build_projector(spec(kind="mlp", activation="gelu"), 8, 4)
    kinds = [type(m).__name__ for m in head.body]
    assert kinds == ["Linear", "_BatchNorm", "GELU", "Linear"]
    assert head.body[0].out_features == 8  # max(in, out)
    head.train()
    assert head(torch.randn(5, 8)).shape == (5, 4)
    one = torch.randn(1, 8)
    out = head(one)  # BatchNorm is bypassed for one sample instead of raising
    lin1, act, lin2 = head.body[0], head.body[2], head.body[3]
    torch.testing.assert_close(out, lin2(act(lin1(one))))
    head.eval()
    assert head(one).shape == (1, 4)
    no_bn = build_projector(spec(kind="mlp", batchnorm=False, activation="none", hidden_dim=5), 8, 4)
    assert [type(m).__name__ for m in no_bn.body] == ["Linear", "Linear"] and no_bn.body[0].out_features == 5


def test_lowrank_default_and_explicit_rank():
    head = build_projector(spec(kind="lowrank"), 256, 128)
    assert head.body[0].out_features == 32  # min(256, 128) // 4
    assert build_projector(spec(kind="lowrank"), 16, 16).body[0].out_features == 8  # at least 8
    head = build_projector(spec(kind="lowrank", rank=3), 10, 20)
    assert head.body[0].weight.shape == (3, 10) and head.body[1].weight.shape == (20, 3)
    assert _params(head) == 3 * 10 + 20 * 3 + 20
    assert head(torch.randn(2, 10)).shape == (2, 20)


@pytest.mark.parametrize(
    "in_hw,out_hw,layer,kernel,stride",
    [
        (None, None, nn.Conv2d, (1, 1), (1, 1)),
        ((8, 8), (4, 4), nn.Conv2d, (3, 3), (2, 2)),
        ((4, 4), (8, 8), nn.ConvTranspose2d, (4, 4), (2, 2)),
        ((7, 6), (5, 5), nn.Conv2d, (3, 2), (1, 1)),
        ((5, 5), (5, 5), nn.Conv2d, (1, 1), (1, 1)),
    ],
)
def test_conv_matches_fitnets_convreg_shapes(in_hw, out_hw, layer, kernel, stride):
    head = build_projector(spec(kind="conv"), 3, 6, in_hw=in_hw, out_hw=out_hw)
    conv = head.body[0]
    assert type(conv) is layer and conv.kernel_size == kernel and conv.stride == stride
    assert [type(m).__name__ for m in head.body] == [layer.__name__, "_BatchNorm", "ReLU"]
    h, w = in_hw or (5, 5)
    out = head(torch.randn(2, 3, h, w))
    assert out.shape == (2, 6, *(out_hw or (5, 5)))
    assert (out >= 0).all()


def test_conv_errors():
    with pytest.raises(UserError, match="3x3 student map to a 5x5"):
        build_projector(spec(kind="conv"), 3, 6, in_hw=3, out_hw=5)
    head = build_projector(spec(kind="conv"), 3, 6)
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        head(torch.randn(2, 3))


def test_identity_requires_equal_dims():
    head = build_projector(spec(kind="identity"), 5, 5)
    x = torch.randn(2, 5)
    assert head(x) is x and _params(head) == 0
    with pytest.raises(UserError, match=r"student side has 5 and the target 7"):
        build_projector(spec(kind="identity"), 5, 7)
    normed = build_projector(spec(kind="identity", l2_normalize=True), 5, None)
    torch.testing.assert_close(normed(x).norm(dim=1), torch.ones(2))


def test_l2_normalize_and_weight_norm():
    head = build_projector(spec(kind="linear", l2_normalize=True, weight_norm=True), 4, 3)
    out = head(torch.randn(6, 4) * 10)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(6))
    lin = head.body
    assert torch.nn.utils.parametrize.is_parametrized(lin, "weight")
    g, v = lin.parametrizations.weight.original0, lin.parametrizations.weight.original1
    torch.testing.assert_close(lin.weight, g * v / v.norm(dim=1, keepdim=True))
    out.sum().backward()
    assert v.grad is not None
    tconv = build_projector(spec(kind="conv", weight_norm=True), 3, 5, in_hw=2, out_hw=4).body[0]
    v = tconv.parametrizations.weight.original1  # in x out x kh x kw; norms per output channel (dim 1)
    norms = v.transpose(0, 1).reshape(5, -1).norm(dim=1).reshape(1, 5, 1, 1)
    torch.testing.assert_close(tconv.weight, tconv.parametrizations.weight.original0 * v / norms)


def test_conv_l2_normalises_whole_sample():
    head = build_projector(spec(kind="conv", l2_normalize=True, batchnorm=False, activation="none"), 2, 3)
    out = head(torch.randn(4, 2, 3, 3))
    torch.testing.assert_close(out.reshape(4, -1).norm(dim=1), torch.ones(4))


def test_unknown_kind_and_activation_are_user_errors():
    with pytest.raises(UserError, match="unknown projector kind 'attention'"):
        build_projector(spec(kind="attention"), 2, 2)
    with pytest.raises(UserError, match="unknown projector activation 'tanh'"):
        build_projector(spec(kind="mlp", activation="tanh"), 2, 2)
    with pytest.raises(UserError, match="out_dim"):
        build_projector(spec(kind="linear"), 2, None)


def test_out_dim_falls_back_to_spec():
    assert build_projector(spec(kind="linear", out_dim=9), 4, None)(torch.randn(2, 4)).shape == (2, 9)


def test_build_heads_student_only_and_both():
    g_s, g_t = build_heads(spec(kind="linear"), 64, 256)
    assert g_t is None and g_s(torch.randn(2, 64)).shape == (2, 256)
    with pytest.raises(UserError, match=r"teacher's space \(256\).*out_dim is 128"):
        build_heads(spec(kind="linear", out_dim=128), 64, 256)
    g_s, g_t = build_heads(spec(kind="mlp", sides="both", l2_normalize=True), 64, (8, 4, 4))
    assert g_s(torch.randn(3, 64)).shape == (3, 128) and g_t(torch.randn(3, 8, 4, 4)).shape == (3, 128)
    g_s, g_t = build_heads(spec(kind="linear", sides="both", out_dim=16), 64, 256)
    assert g_s.out_dim == g_t.out_dim == 16
    with pytest.raises(UserError, match="student 64 and teacher 256"):
        build_heads(spec(kind="identity", sides="both"), 64, 256)


def test_build_heads_conv_shapes():
    g_s, g_t = build_heads(spec(kind="conv"), (16, 8, 8), (32, 4, 4))
    assert g_t is None and g_s(torch.randn(2, 16, 8, 8)).shape == (2, 32, 4, 4)
    g_s, g_t = build_heads(spec(kind="conv", sides="both", out_dim=12), (16, 8, 8), (32, 4, 4))
    assert g_s(torch.randn(2, 16, 8, 8)).shape == g_t(torch.randn(2, 32, 4, 4)).shape == (2, 12, 4, 4)
    with pytest.raises(UserError, match="C x H x W"):
        build_heads(spec(kind="conv"), (16, 8), (32, 4, 4))


def test_works_with_the_real_spec_model():
    from kdcore.spec.projector import ProjectorSpec

    g_s, g_t = build_heads(ProjectorSpec(kind="mlp", sides="both", out_dim=32), 10, 20)
    assert g_s(torch.randn(4, 10)).shape == g_t(torch.randn(4, 20)).shape == (4, 32)
