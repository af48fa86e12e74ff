"""The kd CLI: help everywhere, exit codes 0/2/1, one clear line per problem, no tracebacks for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommands(sub, (*prefix, name))


@pytest.mark.parametrize("cmd", [()] + list(_subcommands(build_parser())), ids=lambda c: " ".join(c) or "kd")
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: kd" in capsys.readouterr().out


def test_console_script_runs(tmp_path):
    kd = Path(sys.executable).with_name("kd")
    spec = str(ROOT / "examples" / "digits_kd.yaml")
    r = subprocess.run([str(kd), "validate", "--schema-only", spec], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout
    # from a directory without the teacher's checkpoint the deep checks say how to get one
    r = subprocess.run([str(kd), "validate", spec], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "teacher.checkpoint: checkpoint file not found" in r.stderr, r.stderr
    assert "kd train-teacher" in r.stderr and "Traceback" not in r.stderr


def test_validate_broken_spec_exits_2_with_every_problem(tmp_path, digits_job, capsys):
    digits_job["losses"][2]["pair"] = "fet"
    digits_job["data"]["batch_size"] = 0
    digits_job["train"]["optimiser"] = {}
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(digits_job))
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 2 and all(line.startswith("kd: error: ") for line in lines), err  # field errors first
    assert "data.batch_size" in err and "train.optimiser" in err and "did you mean 'optimizer'" in err
    assert "Traceback" not in err


def test_validate_reports_problems_of_every_file(tmp_path, digits_job, capsys):
    good, bad1, bad2 = tmp_path / "good.yaml", tmp_path / "bad1.yaml", tmp_path / "bad2.yaml"
    good.write_text(yaml.safe_dump(digits_job))
    bad1.write_text(yaml.safe_dump({**digits_job, "name": "UPPER"}))
    bad2.write_text("name: [\n")
    assert main(["validate", str(good), str(bad1), str(bad2)]) == 2
    captured = capsys.readouterr()
    assert "good.yaml: ok" in captured.out
    assert "bad1.yaml: name" in captured.err and "bad2.yaml" in captured.err


def test_schema_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["required"]) >= {"name", "student", "losses", "data"}
    assert schema["oneOf"] == [{"required": ["teacher"]}, {"required": ["teachers"]}]  # one teacher, or several
    assert main(["schema", "--kind", "sweep"]) == 0
    assert "variants" in json.loads(capsys.readouterr().out)["properties"]


def test_layers_lists_module_paths(tmp_path, digits_job, capsys):
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(digits_job))
    assert main(["layers", str(f), "--side", "student"]) == 0
    out = capsys.readouterr().out
    assert "embed\tFlatten" in out and "block2.0.0\tConv2d" in out


def test_missing_checkpoint_is_a_user_error(tmp_path, digits_job, capsys):
    digits_job["teacher"]["checkpoint"] = str(tmp_path / "missing.safetensors")
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(digits_job))
    assert main(["train", "--local", "--quiet", str(f), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and "Traceback" not in err


def test_unknown_tap_is_a_user_error_naming_close_matches(tmp_path, digits_job, capsys):
    digits_job["teacher"]["taps"] = ["embed", "blok3"]
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(digits_job))
    assert main(["train", "--local", "--quiet", str(f), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "blok3" in err and "block3" in err


def test_factory_rejecting_kwargs_is_a_user_error(tmp_path, digits_job, capsys):
    digits_job["teacher"]["model"]["kwargs"] = {"width": 8, "bogus": 1}
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(digits_job))
    assert main(["train", "--local", "--quiet", str(f), "--out", str(tmp_path / "run")]) == 2
    assert "rejected kwargs" in capsys.readouterr().err


def test_argparse_usage_error_exits_2():
    with pytest.raises(SystemExit) as e:
        main(["validate"])
    assert e.value.code == 2


def test_failure_exits_1_with_one_line(tmp_path, digits_job, capsys):
    # a CIFAR ResNet teacher cannot run on 8x8 digits: a failure (exit 1), not a user error in the spec
    digits_job["teacher"]["model"] = {"kind": "factory", "target": "kdcore.zoo:resnet8x4"}
    digits_job["teacher"]["taps"] = ["embed"]
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(digits_job))
    assert main(["train", "--local", "--quiet", str(f), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kd: failed: RuntimeError") and "KD_DEBUG" in err[0]


def test_export_writes_the_student_without_heads(tmp_path, digits_job, capsys):
    from safetensors.torch import load_file

    digits_job["output"] = {"dir": str(tmp_path / "runs")}
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(digits_job))
    assert main(["train", "--local", "--quiet", str(f)]) == 0
    assert main(["export", str(f), "--out", str(tmp_path / "exported")]) == 0
    keys = load_file(str(tmp_path / "exported" / "student.safetensors")).keys()
    assert keys and not any("heads" in k or "crd" in k for k in keys)
    assert main(["export", str(f).replace("job", "nope"), "--out", str(tmp_path / "x")]) == 2
