"""`kd submit` against a separate local Ray head (`ray start --head` on loopback): the job succeeds."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from services.cli.main import main

pytestmark = pytest.mark.ray
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A second Ray cluster, started the way an operator would, stopped (its process group) afterwards."""
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")
    temp_dir = tempfile.mkdtemp(prefix="kdh", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=3", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # every port its own: another Ray on this machine (the session's) holds the defaults
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}", f"--node-manager-port={_free_port()}",
         f"--object-manager-port={_free_port()}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        import requests

        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(f"{address}/api/version", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"ray start exited: {(tmp_path / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
        else:
            raise AssertionError("the Ray head did not come up")
        yield address
    finally:
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_runs_the_job_on_the_cluster(ray_head, digits_job, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    digits_job["name"] = "submitted"
    digits_job["losses"] = [{"kind": "ce"}, {"kind": "kd"}]
    digits_job["train"] = {"epochs": 1, "num_workers": 1, "optimizer": {"kind": "adam", "lr": 0.003}}
    digits_job["output"] = {"dir": str(tmp_path / "runs")}
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(digits_job))
    assert main(["submit", str(spec), "--address", ray_head, "--id", "kd-test-submit", "--wait"]) == 0, \
        capsys.readouterr()
    out = capsys.readouterr().out
    assert "kd-test-submit" in out and "SUCCEEDED" in out
    assert main(["status", "kd-test-submit", "--address", ray_head]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["logs", "kd-test-submit", "--address", ray_head]) == 0
    assert "stage: train student" in capsys.readouterr().out
    assert (tmp_path / "runs" / "submitted" / "student" / "student.safetensors").exists()
    assert main(["status", "no-such-job", "--address", ray_head]) == 2
