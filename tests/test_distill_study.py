"""The digits distillation study (services/bench/distill.py) on a tiny configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.bench import distill


def test_study_runs_a_tiny_configuration_outside_the_repo(tmp_path):
    ckpt = tmp_path / "teacher" / "teacher.safetensors"
    out = tmp_path / "study"
    lines: list[str] = []
    res = distill.run(seeds=(0,), settings=("transfer10",), epochs=2, out_dir=out, log=lines.append,
                      methods=("vanilla", "kd"), teacher_checkpoint=ckpt, teacher_epochs=2)

    assert set(res) >= {"rows", "summary", "markdown", "teacher", "config", "wall_s"}
    # the teacher was trained here, into tmp_path
    assert ckpt.exists() and res["teacher"]["trained_now"] and res["teacher"]["checkpoint"] == str(ckpt)
    assert 0.0 <= res["teacher"]["val_acc"] <= 1.0

    rows = res["rows"]
    assert [(r["setting"], r["method"], r["seed"]) for r in rows] == [("transfer10", "vanilla", 0),
                                                                      ("transfer10", "kd", 0)]
    for r in rows:
        assert r["labeled_fraction"] == 0.1 and r["epochs"] == 2
        assert 0.0 <= r["val_acc"] <= 1.0 and r["time_s"] > 0 and r["params"] > 0
        assert Path(r["out_dir"]).resolve().is_relative_to(tmp_path.resolve())  # never the repo's runs/
    assert rows[1]["losses"].startswith("ce(0.1) + kd(0.9, T=4)")

    summary = res["summary"]
    assert [s["method"] for s in summary] == ["vanilla", "kd"]
    for s, r in zip(summary, rows):
        assert s["acc_mean"] == pytest.approx(r["val_acc"]) and s["acc_std"] == 0.0 and s["accs"] == [r["val_acc"]]

    md = res["markdown"]
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| student")]
    assert len(table) == 2
    assert table[0].startswith("| vanilla |") and table[1].startswith("| kd |")
    assert "transfer10" in md
    assert any("[study] transfer10 kd seed 0" in line for line in lines)


def test_study_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        distill.run(seeds=(0,), settings=("half",), out_dir=tmp_path, log=None)
    with pytest.raises(ValueError, match="unknown"):
        distill.run(seeds=(0,), methods=("mlkd",), out_dir=tmp_path, log=None)


def test_every_method_builds_a_valid_job_in_both_settings():
    base = distill.load_base()
    for setting, fraction in distill.SETTINGS.items():
        for method in distill.METHODS:
            job = distill.make_job(base, setting, method, 1, teacher_checkpoint="teacher.safetensors")
            assert job.data.labeled_fraction == fraction and job.data.labeled_seed == 1
            assert job.train.seed == 1 and job.data.split_seed == 0
            assert job.features.mode == "online"
    assert distill.BASE_SPEC.exists()
