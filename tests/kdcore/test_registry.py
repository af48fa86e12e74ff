"""The loss table: one entry per kind, read by the spec union, the YAML errors, the checks and the distiller."""

from __future__ import annotations

import copy
from typing import Literal

import pytest
import torch
from pydantic import Field

from kdcore.errors import SpecError
from kdcore.losses import registry
from kdcore.losses.registry import LossEntry, register_loss
from kdcore.spec import JobSpec
from kdcore.spec.base import Spec


def test_a_scratch_loss_registers_once_and_trains_through_kd_train_local(tmp_path, digits_job):
    import scratch_loss  # tests/kdcore/scratch_loss.py: registers "scratch_l1" through the one table

    from kdcore.loop import train_local

    assert "scratch_l1" in registry.kinds()
    digits_job["losses"] = [{"kind": "ce"}, {"kind": "scratch_l1", "pair": "feat", "params": {"power": 2.0}}]
    job = JobSpec.from_dict(digits_job)
    assert type(job.losses[1]).__name__ == "ScratchL1LossSpec"
    before = scratch_loss.CALLS["n"]
    result = train_local(job, out_dir=tmp_path / "run", progress=False, log=None)
    assert scratch_loss.CALLS["n"] > before
    assert result["history"][-1]["loss/scratch_l1/feat"] > 0
    # the same kind in a sweep variant (a model that holds loss terms too) and in the JSON schema
    from kdcore.spec.sweep import SweepSpec

    sweep = SweepSpec.model_validate({"base": digits_job, "variants": [
        {"name": "l1", "losses": [{"kind": "scratch_l1", "pair": "feat"}]}]})
    assert sweep.variants[0].losses[0].kind == "scratch_l1"
    assert "ScratchL1LossSpec" in JobSpec.model_json_schema()["$defs"]


def test_scratch_loss_errors_read_the_table(digits_job):
    import scratch_loss  # noqa: F401

    bad = copy.deepcopy(digits_job)
    bad["losses"] = [{"kind": "scratch_l1", "pair": "feat", "params": {"powr": 2}}]
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict(bad)
    (p,) = e.value.problems
    assert p.path == "losses.0.params.powr" and "power" in p.fix
    bad["losses"] = [{"kind": "scratch_l2", "pair": "feat"}]
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict(bad)
    assert "scratch_l1" in e.value.problems[0].fix and e.value.problems[0].path == "losses.0.kind"


def test_registration_is_checked():
    class NoKind(Spec):
        """x"""

        kind: Literal["other"] = Field(description="k")
        pair: str = Field(description="p")

    with pytest.raises(ValueError, match="already registered"):
        register_loss(LossEntry("kd", NoKind, "logits", lambda inp: None))
    with pytest.raises(ValueError, match="Literal"):
        register_loss(LossEntry("mine", NoKind, "pair", lambda inp: None))
    with pytest.raises(ValueError, match="raw_reason"):
        LossEntry("mine", NoKind, "pair_raw", lambda inp: None)
    with pytest.raises(ValueError, match="headed"):
        LossEntry("mine", NoKind, "logits", lambda inp: None, headed=True)


def test_the_table_is_the_only_kind_list():
    import kdcore.spec.job as job_mod
    import kdcore.spec.losses as spec_losses

    assert not hasattr(spec_losses, "LOSS_KINDS") and not hasattr(job_mod, "PAIRED_LOSSES")
    kinds = set(registry.kinds())
    assert {"ce", "kd", "hint", "cosine", "pkt", "sp", "rkd", "at", "infonce", "crd",
            "dkd", "dist", "nkd", "mgd", "srd", "reviewkd"} <= kinds
    mapping = JobSpec.model_json_schema()["properties"]["losses"]["items"]["discriminator"]["mapping"]
    assert kinds <= set(mapping)
    for e in registry.entries():  # spec classes never share a name with a module class
        assert e.spec.__name__.endswith("Spec")


def test_spec_layer_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, kdcore.spec; kdcore.spec.JobSpec.model_json_schema(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stdout + r.stderr


def test_kdcore_losses_names_are_the_functions_whatever_was_imported_first():
    import subprocess
    import sys

    code = ("import kdcore.losses.pkt, kdcore.losses.rkd\nfrom kdcore.losses import pkt, rkd\n"
            "print(callable(pkt) and callable(rkd) and pkt.__module__ == 'kdcore.losses.pkt')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "True", r.stdout + r.stderr


def test_warmup_factor_counts_epochs_like_mdistiller():
    assert registry.warmup_factor(0, 20) == pytest.approx(1 / 20)
    assert registry.warmup_factor(19, 20) == 1.0 and registry.warmup_factor(50, 20) == 1.0
    assert registry.warmup_factor(3, 0) == 1.0


def test_ranks_are_checked_by_the_distiller(digits_job):
    from kdcore.distiller import Distiller, probe_shapes
    from kdcore.zoo import digits_cnn

    digits_job["losses"] = [{"kind": "at", "pair": "feat"}]  # feat pairs vectors; AT needs maps
    job = JobSpec.from_dict(digits_job)
    s, t = digits_cnn(4), digits_cnn(8)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="feature maps"):
        Distiller(s, job.student.pairs, job.losses, probe_shapes(s, ["embed"], x),
                  probe_shapes(t, job.teacher.taps, x), n_data=10)
