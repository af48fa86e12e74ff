"""Ctrl-C during a `kd run`: exit 130, one "kd: interrupted" line, nothing of the run left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]
VENV_BIN = Path(sys.executable).parent


def _processes_under(path: str) -> list[str]:
    """Command lines of live processes that mention ``path`` (a Ray started with RAY_TMPDIR=path does)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (Path("/proc") / pid / "environ").read_bytes()
        except OSError:
            continue
        if path in cmd or f"RAY_TMPDIR={path}".encode() in env:
            out.append(f"{pid}: {cmd[:120]}")
    return out


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"kd exited early ({proc.returncode}): {path.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {timeout} s: {path.read_text()[-3000:]}")


def test_sigint_during_training_exits_130_and_leaves_nothing_running(digits_job, tmp_path):
    digits_job["name"] = "interrupted"
    digits_job["losses"] = [{"kind": "ce"}, {"kind": "kd"}]
    digits_job["data"]["batch_size"] = 16
    digits_job["train"] = {"epochs": 500, "num_workers": 2, "optimizer": {"kind": "adam", "lr": 0.003}}
    digits_job["output"] = {"dir": str(tmp_path / "runs")}
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(digits_job))
    ray_tmp = tempfile.mkdtemp(prefix="kdi", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "kd.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(VENV_BIN / "kd"), "run", str(spec)], env=env, stdout=f, stderr=subprocess.STDOUT,
                                cwd=tmp_path, start_new_session=True,
                                # a shell running the suite in the background ignores SIGINT, and children inherit
                                # that: give kd the default disposition a terminal's Ctrl-C meets
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_text(log, "training on Ray Train", proc, timeout=240)
        events = tmp_path / "runs" / "interrupted" / "metrics.json"
        time.sleep(8)  # well inside the training loop (a few epochs in)
        assert proc.poll() is None and not events.exists()
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"kd still running 180 s after SIGINT; its log ends: {log.read_text()[-3000:]}") from None
        text = log.read_text()
        assert rc == 130, text[-3000:]
        assert text.rstrip().splitlines()[-1] == "kd: interrupted", text[-3000:]
        assert "Traceback" not in text
        deadline = time.time() + 30  # Ray's processes exit within seconds of the driver's shutdown
        while _processes_under(ray_tmp) and time.time() < deadline:
            time.sleep(0.5)
        assert _processes_under(ray_tmp) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for line in _processes_under(ray_tmp):
            try:
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
