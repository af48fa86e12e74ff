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


def test_json_stays_one_object_when_child_processes_and_prints_write_to_stdout(tmp_path):
    """What Ray's processes print (they inherit the descriptor) goes to stderr while a ``--json`` bench runs."""
    import subprocess
    import sys

    script = (
        "import os, subprocess, sys\n"
        "from services.cli import cmd_bench\n"
        "def noisy(args):\n"
        "    print('(raylet) a Python print')\n"
        "    subprocess.run([sys.executable, '-c', 'print(\"(raylet) a child process\")'], check=True)\n"
        "    os.write(1, b'(raylet) native code\\n')\n"
        "    cmd_bench._emit({'ratio': 1.0})\n"
        "    return 0\n"
        "class A: json = True\n"
        "sys.exit(cmd_bench._json_only(noisy)(A()))\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"ratio": 1.0}, p.stdout
    assert p.stderr.count("(raylet)") == 3
