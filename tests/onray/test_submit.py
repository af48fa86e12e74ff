"""A separate Ray head (`ray start --head` on loopback), started as an operator would:

* `kd submit` runs a job there;
* `ray job submit -- kd run SPEC` works for a spec without `ray.address` (the driver uses the job's cluster);
* a plain `kd run` on the same machine starts its own private Ray and leaves nothing on that cluster.

The head gets its own RAY_TMPDIR, shared with the processes the tests start, so that its current-cluster
file is what a bare `ray.init()` of those processes would find (as with `ray start` on a user's machine),
without touching any other Ray on this machine.
"""

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

from dataclasses import dataclass

import pytest
import yaml

from services.cli.main import main

pytestmark = pytest.mark.ray
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    address: str  # the dashboard / Jobs API
    env: dict  # the environment of processes that should see this head as "the cluster on the machine"
    log: Path


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A second Ray cluster, started the way an operator would, stopped (its process group) afterwards."""
    tmp_path = tmp_path_factory.mktemp("head")
    port, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="kdh", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_TMPDIR": temp_dir}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=3", "--include-dashboard=true",
         "--disable-usage-stats",
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
        yield Head(address, env, tmp_path / "head.log")
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


def _cache_job(digits_job, tmp_path, name):
    digits_job["name"] = name
    digits_job["losses"] = [{"kind": "ce"}, {"kind": "kd"}]
    digits_job["train"] = {"epochs": 1, "num_workers": 1, "optimizer": {"kind": "adam", "lr": 0.003}}
    digits_job["features"] = {"mode": "cache", "cache": {"uri": str(tmp_path / "cache")}}
    digits_job["output"] = {"dir": str(tmp_path / "runs")}
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(digits_job))
    return spec


def _actors_on(head: Head) -> list[str]:
    from ray.util.state import list_actors

    return [f"{a.class_name}:{a.name}:{a.state}" for a in list_actors(address=head.address, limit=1000)]


@pytest.mark.slow
def test_submit_runs_the_job_on_the_cluster(ray_head, digits_job, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    digits_job["name"] = "submitted"
    digits_job["losses"] = [{"kind": "ce"}, {"kind": "kd"}]
    digits_job["train"] = {"epochs": 1, "num_workers": 1, "optimizer": {"kind": "adam", "lr": 0.003}}
    digits_job["output"] = {"dir": str(tmp_path / "runs")}
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(digits_job))
    ray_head = ray_head.address
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


@pytest.mark.slow
def test_kd_run_with_a_foreign_cluster_on_the_machine_starts_its_own_ray(ray_head, digits_job, tmp_path):
    before = _actors_on(ray_head)
    spec = _cache_job(digits_job, tmp_path, "private")
    # the head's RAY_TMPDIR: a bare ray.init() here would find and join that cluster
    r = subprocess.run([str(VENV_BIN / "kd"), "run", str(spec)], env=ray_head.env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "starting a private local Ray" in r.stdout
    assert (tmp_path / "runs" / "private" / "student" / "student.safetensors").exists()
    # nothing of the job ever lived on the other cluster: no Serve controller or proxy, no bank, no trainer
    assert _actors_on(ray_head) == before, _actors_on(ray_head)


@pytest.mark.slow
def test_ray_job_submit_kd_run_uses_the_jobs_cluster(ray_head, digits_job, tmp_path):
    spec = _cache_job(digits_job, tmp_path, "rayjob")
    r = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.address,
                        "--submission-id", "kd-test-rayjob", "--", str(VENV_BIN / "kd"), "run", str(spec)],
                       env=ray_head.env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "running inside a Ray job" in out and "succeeded" in out, out[-4000:]
    assert "KeyError" not in out and "Traceback" not in out
    assert (tmp_path / "runs" / "rayjob" / "student" / "student.safetensors").exists()
    assert any("ServeController" in a for a in _actors_on(ray_head))  # the job's teacher did run there
