"""`kd cache build --local | info | verify [--repair] | ls | rm` on a real cache on disk."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from services.cli.main import main


def _corrupt_one_chunk(uri: Path) -> None:
    chunk = sorted(p for p in (uri / "layers").rglob("c.*") if p.is_file())[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


def test_cache_commands(tmp_path, digits_job, capsys):
    uri = tmp_path / "caches" / "digits"
    digits_job["features"] = {"mode": "cache", "cache": {"uri": str(uri), "chunk_rows": 256}}
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(digits_job))
    assert main(["cache", "build", "--local", str(spec)]) == 0
    built = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert built["reused"] is False and built["chunks_written"] == 6
    assert main(["cache", "build", "--local", str(spec)]) == 0  # a second build reuses: the teacher does not run
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["reused"] is True and again["teacher_forwards"] == 0

    assert main(["cache", "info", str(uri), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert json.dumps(info).count("1438") >= 1
    assert main(["cache", "verify", str(uri)]) == 0
    assert "OK" in capsys.readouterr().out

    _corrupt_one_chunk(uri)
    assert main(["cache", "verify", str(uri)]) == 1
    assert "corrupted" in capsys.readouterr().out.lower()
    assert main(["cache", "verify", "--repair", str(uri)]) == 1
    assert "marked 1 corrupted chunk" in capsys.readouterr().out
    assert main(["cache", "build", "--local", str(spec)]) == 0  # rewrites only the repaired chunk
    rebuilt = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rebuilt["chunks_written"] == 1
    assert main(["cache", "verify", str(uri)]) == 0
    capsys.readouterr()

    assert main(["cache", "ls", str(tmp_path / "caches")]) == 0
    assert "digits" in capsys.readouterr().out
    assert main(["cache", "rm", "--yes", str(uri)]) == 0
    assert not uri.exists()
    assert main(["cache", "info", str(uri)]) != 0
    assert "no cache at" in capsys.readouterr().err


def test_cache_mismatch_is_refused_naming_the_field(tmp_path, digits_job, capsys):
    uri = tmp_path / "cache"
    digits_job["features"] = {"mode": "cache", "cache": {"uri": str(uri), "chunk_rows": 512}}
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(digits_job))
    assert main(["cache", "build", "--local", str(spec)]) == 0
    digits_job["teacher"]["taps"] = ["embed"]  # another layer set
    spec.write_text(yaml.safe_dump(digits_job))
    assert main(["cache", "build", "--local", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "layers" in err and "expected" in err
