"""CIFAR models of the RepDistiller / mdistiller tables (kdcore.zoo_cifar)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcore import zoo_cifar
from kdcore.taps import FeatureTaps, layer_names

# Published parameter counts at 100 classes (CRD / DKD papers' tables, in millions).
PUBLISHED_M = {"resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_16_2": 0.70, "wrn_40_2": 2.26}
# Exact counts of the authors' model code (RepDistiller models/, mdistiller mdistiller/models/cifar/), measured by
# building their modules at 100 classes.
AUTHORS_EXACT = {"resnet8x4": 1_233_540, "resnet32x4": 7_433_860, "wrn_16_2": 703_284, "wrn_40_2": 2_255_156}
# Stage shapes on 3 x 32 x 32 inputs (per sample).
SHAPES = {
    "resnet8x4": {"layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3": (256, 8, 8), "embed": (256,)},
    "resnet32x4": {"layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3": (256, 8, 8), "embed": (256,)},
    "wrn_16_2": {"layer1": (32, 32, 32), "layer2": (64, 16, 16), "layer3": (128, 8, 8), "embed": (128,)},
    "wrn_40_2": {"layer1": (32, 32, 32), "layer2": (64, 16, 16), "layer3": (128, 8, 8), "embed": (128,)},
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PUBLISHED_M))
def test_parameter_counts_match_the_published_ones(name):
    model = getattr(zoo_cifar, name)(num_classes=100)
    n = n_params(model)
    assert abs(n / 1e6 - PUBLISHED_M[name]) / PUBLISHED_M[name] < 0.01
    assert n == AUTHORS_EXACT[name]


@pytest.mark.parametrize("name", list(PUBLISHED_M))
def test_forward_and_stage_taps(name):
    torch.manual_seed(0)
    model = getattr(zoo_cifar, name)(num_classes=100).eval()
    taps = ["layer1", "layer2", "layer3", "embed", "fc"]
    assert set(taps) <= set(layer_names(model))
    with torch.no_grad(), FeatureTaps(model, taps) as t:
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    for tap, shape in SHAPES[name].items():
        assert tuple(t.features[tap].shape) == (2, *shape), tap
    assert torch.equal(t.features["fc"], out)


def test_embed_is_the_pooled_last_stage_and_taps_are_not_overwritten():
    torch.manual_seed(0)
    for model, last in ((zoo_cifar.resnet8x4(), "layer3"), (zoo_cifar.wrn_16_2(), "relu")):
        model.eval()
        with torch.no_grad(), FeatureTaps(model, [last, "embed", "layer1"]) as t:
            model(torch.randn(2, 3, 32, 32))
        assert torch.allclose(t.features["embed"], t.features[last].mean(dim=(2, 3)), atol=1e-6)
    # the WRN's stage output is the raw residual sum: it has negative values (no in-place ReLU hit it later)
    assert (t.features["layer1"] < 0).any()


def test_num_classes_and_bad_depths():
    assert zoo_cifar.resnet8x4(num_classes=10)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert zoo_cifar.wrn_40_2(num_classes=7).fc.out_features == 7
    with pytest.raises(ValueError, match="6n\\+2"):
        zoo_cifar.CifarResNet(9, (16, 16, 32, 64))
    with pytest.raises(ValueError, match="6n\\+4"):
        zoo_cifar.WideResNet(15, 2)


def test_authors_state_dict_keys_load():
    """mdistiller's / RepDistiller's checkpoint keys: the ResNets' are ours, the WRNs' are renamed."""
    res = zoo_cifar.resnet8x4()
    assert zoo_cifar.from_authors_state_dict(res.state_dict()).keys() == res.state_dict().keys()
    wrn = zoo_cifar.wrn_16_2()
    ours = wrn.state_dict()
    theirs = {}
    for k, v in ours.items():  # the authors' WRN names: block<i>.layer.<j>..., convShortcut
        k2 = k.replace("shortcut", "convShortcut")
        for i in (1, 2, 3):
            k2 = k2.replace(f"layer{i}.", f"block{i}.layer.") if k2.startswith(f"layer{i}.") else k2
        theirs[k2] = v.clone()
    assert "block1.layer.0.convShortcut.weight" in theirs and "block3.layer.1.bn2.running_var" in theirs
    converted = zoo_cifar.from_authors_state_dict(theirs)
    assert converted.keys() == ours.keys()
    wrn.load_state_dict(converted)  # strict
    # a {"model": state_dict} wrapper (mdistiller's checkpoint files) and DataParallel's "module." prefix
    wrapped = {"model": {"module." + k: v for k, v in theirs.items()}, "epoch": 240}
    assert zoo_cifar.from_authors_state_dict(wrapped).keys() == ours.keys()


def test_tiny_local_training_run_resnet8x4_student(tmp_path):
    from kdcore.loop import train_local
    from kdcore.spec.job import JobSpec

    job = JobSpec.from_dict({
        "name": "cifar-tiny",
        "teacher": {"model": {"kind": "factory", "target": "kdcore.zoo_cifar:wrn_16_2", "kwargs": {"num_classes": 100}},
                    "taps": ["layer1", "layer2", "layer3", "embed"]},
        "student": {"model": {"kind": "factory", "target": "kdcore.zoo_cifar:resnet8x4", "kwargs": {"num_classes": 100}},
                    "pairs": [{"name": "feat", "student": "embed", "teacher": "embed", "projector": {"kind": "linear"}},
                              {"name": "s1", "student": "layer1", "teacher": "layer1"},
                              {"name": "s2", "student": "layer2", "teacher": "layer2"},
                              {"name": "s3", "student": "layer3", "teacher": "layer3"}]},
        "losses": [{"kind": "ce", "weight": 1.0},
                   {"kind": "dkd", "weight": 1.0, "params": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}},
                   {"kind": "kd", "weight": 0.9, "params": {"temperature": 2.0, "logit_stand": True}},
                   {"kind": "hint", "weight": 1.0, "pair": "feat"},
                   {"kind": "reviewkd", "weight": 1.0, "pairs": ["s1", "s2", "s3"]}],
        "data": {"source": {"kind": "factory", "target": "kdcore.zoo_imagenet:synthetic_images",
                            "kwargs": {"n": 24, "num_classes": 100, "size": 32}},
                 "val_fraction": 0.25, "batch_size": 8, "augment": {"kind": "crop_flip", "max_shift": 4, "flip": True},
                 "mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]},
        "features": {"mode": "online"},
        "train": {"epochs": 1, "num_workers": 0, "optimizer": {"kind": "sgd", "lr": 0.05, "weight_decay": 5e-4},
                  "schedule": {"kind": "cosine"}},
    }, source="test")
    res = train_local(job, out_dir=tmp_path / "run", resume=False, progress=False, log=None)
    final = res["final"]
    assert final["epoch"] == 1 and 0.0 <= final["val/acc"] <= 1.0 and np.isfinite(final["val/loss"])
