"""FeatureTaps: named forward hooks, eager validation, cleanup."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcore.errors import LayerNotFoundError, UserError
from kdcore.taps import FeatureTaps, layer_names, validate_layers


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Linear(4, 4)
        self.conv2 = nn.Linear(4, 4)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(3, 4)
        self.layer1 = nn.Sequential(Block(), Block())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.layer1(self.stem(x)))


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_taps_capture_the_right_tensors():
    net = Net()
    x = torch.randn(5, 3)
    with FeatureTaps(net, ["layer1.1.conv1", "stem", ""]) as taps:
        out = net(x)
    f = taps.features
    stem = net.stem(x)
    b0 = net.layer1[0](stem)
    torch.testing.assert_close(f["stem"], stem)
    torch.testing.assert_close(f["layer1.1.conv1"], net.layer1[1].conv1(b0))
    assert f[""] is out
    assert list(f) == ["stem", "layer1.1.conv1", ""]  # insertion order = execution order


def test_logits_alias_means_output_unless_a_module_is_called_logits():
    net = Net()
    with FeatureTaps(net, ["logits"]) as taps:
        out = net(torch.randn(2, 3))
    assert taps.features["logits"] is out

    class WithLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = nn.Linear(3, 3)

        def forward(self, x):
            return self.logits(x) * 2

    m = WithLogits()
    with FeatureTaps(m, ["logits"]) as taps:
        out = m(torch.ones(1, 3))
    torch.testing.assert_close(taps.features["logits"] * 2, out)


def test_typo_raises_layer_not_found_with_close_names():
    net = Net()
    with pytest.raises(LayerNotFoundError) as info:
        FeatureTaps(net, ["stem", "layer1.1.conv3"])
    err = info.value
    assert isinstance(err, UserError) and err.exit_code == 2
    assert err.name == "layer1.1.conv3"
    assert set(err.candidates[:2]) == {"layer1.1.conv1", "layer1.1.conv2"}
    assert "kd layers" in err.message and "Net" in err.message
    assert _hook_count(net) == 0


def test_all_missing_names_are_reported_and_error_pickles():
    import pickle

    with pytest.raises(LayerNotFoundError) as info:
        validate_layers(Net(), ["stm", "layer9.0", "head"])
    err = info.value
    assert "'stm'" in err.message and "'layer9.0'" in err.message and err.details["missing"] == ["stm", "layer9.0"]
    assert "stem" in err.candidates
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is LayerNotFoundError and again.candidates == err.candidates


def test_hooks_removed_on_exit_and_on_exception():
    net = Net()
    with FeatureTaps(net, ["stem", "head"]):
        assert _hook_count(net) == 2
    assert _hook_count(net) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureTaps(net, ["stem"]) as taps:
            net(torch.randn(1, 3))
            raise RuntimeError("boom")
    assert _hook_count(net) == 0 and "stem" in taps.features
    net(torch.randn(1, 3))
    assert list(taps.features) == ["stem"]  # not refilled after exit


def test_teacher_no_grad_student_with_grad_and_detach():
    teacher, student = Net(), Net()
    x = torch.randn(4, 3)
    with torch.no_grad(), FeatureTaps(teacher, ["layer1.0"]) as t_taps:
        teacher(x)
    with FeatureTaps(student, ["layer1.0"]) as s_taps:
        student(x)
    t_feat, s_feat = t_taps.features["layer1.0"], s_taps.features["layer1.0"]
    assert not t_feat.requires_grad and s_feat.requires_grad
    ((s_feat - t_feat) ** 2).mean().backward()
    assert student.stem.weight.grad is not None and student.head.weight.grad is None
    with FeatureTaps(student, ["layer1.0"], detach=True) as d_taps:
        student(x)
    assert not d_taps.features["layer1.0"].requires_grad


def test_each_forward_refills_and_missing_reports_unrun_modules():
    net = Net()
    with FeatureTaps(net, ["stem", "layer1.0.conv2"]) as taps:
        assert taps.missing() == ["stem", "layer1.0.conv2"]
        net(torch.zeros(1, 3))
        first = taps.features["stem"]
        net(torch.ones(1, 3))
        assert not torch.equal(first, taps.features["stem"])
        assert taps.missing() == []


def test_layer_names_and_validate():
    net = Net()
    names = layer_names(net)
    assert names[:3] == ["stem", "layer1", "layer1.0"] and "layer1.1.conv2" in names and "" not in names
    found = validate_layers(net, ["head", ""])
    assert found["head"] is net.head and found[""] is net
