"""``kd bench losses``: the CRD step bench and every new loss's forward+backward time next to plain KD's."""

from __future__ import annotations

import json

import pytest

from services.cli.main import main

TERMS = ("kd", "kd_logit_stand", "dkd", "dist", "nkd", "mgd", "srd", "reviewkd")
SMALL = ["--batch", "4", "--classes", "10", "--steps", "2", "--warmup", "0", "--nce-k", "16", "--feat-dim", "8",
         "--threads", "1"]  # one thread: fast and steady on a shared machine


def test_text_output_has_crd_and_every_term_next_to_kd(capsys):
    assert main(["bench", "losses", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "CRD step (K=16, d=8, B=4)" in out and "per-anchor (limit)" in out
    assert "loss forward+backward (B=4, C=10" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert "(reference)" in lines["kd"]
    for name in TERMS[1:]:
        assert name in lines, out
        assert lines[name].rstrip().endswith("x kd") and " ms " in lines[name]


def test_json_is_one_object_with_ratios_to_kd(capsys):
    assert main(["bench", "losses", *SMALL, "--json"]) == 0
    out = capsys.readouterr().out.strip()
    r = json.loads(out)  # one object, nothing else printed
    assert r["crd_shared_step_s"] > 0 and r["crd_per_anchor_step_s"] > 0 and r["nce_k"] == 16
    assert r["threads"] == 1 and r["loss_terms"]["threads"] == 1
    terms = r["loss_terms"]
    assert terms["batch"] == 4 and terms["classes"] == 10 and terms["steps"] == 2
    assert tuple(terms["terms"]) == TERMS
    assert terms["terms"]["kd"]["ratio_to_kd"] == pytest.approx(1.0)
    for name, t in terms["terms"].items():
        assert t["step_s"] > 0
        assert t["ratio_to_kd"] == pytest.approx(t["step_s"] / terms["terms"]["kd"]["step_s"])


def test_only_terms_skips_crd(capsys):
    assert main(["bench", "losses", *SMALL, "--only", "terms", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) == {"loss_terms"}
    assert main(["bench", "losses", *SMALL, "--only", "terms"]) == 0
    out = capsys.readouterr().out
    assert "CRD step" not in out and "reviewkd" in out


def test_bad_sizes_are_user_errors(capsys):
    assert main(["bench", "losses", "--steps", "0"]) == 2
    assert "--steps must be > 0" in capsys.readouterr().err
    assert main(["bench", "losses", "--threads", "0"]) == 2
    assert "--threads must be > 0" in capsys.readouterr().err
