"""Ray Train students: metrics each epoch, a killed worker restarts from the last checkpoint with the bank restored."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from kdcore.spec import JobSpec

pytestmark = pytest.mark.ray


def _job(digits_job, tmp_path, epochs):
    digits_job["name"] = "killtest"
    digits_job["losses"] = [{"kind": "ce"}, {"kind": "kd"},
                            {"kind": "crd", "pair": "feat", "params": {"nce_k": 64, "negatives": "shared"}}]
    digits_job["data"]["batch_size"] = 32
    digits_job["train"] = {"epochs": epochs, "num_workers": 2, "max_failures": 1,
                           "optimizer": {"kind": "adam", "lr": 0.003}}
    digits_job["output"] = {"dir": str(tmp_path / "runs")}
    return JobSpec.from_dict(digits_job)


def _wait_for(predicate, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_killed_worker_resumes_and_bank_keeps_every_update_once(ray_clean, digits_job, tmp_path):
    from services.trainer.driver import train_student

    job = _job(digits_job, tmp_path, epochs=8)
    events = tmp_path / "events"
    result: dict = {}

    def run():
        try:
            result["r"] = train_student(job, extra_config={"events_dir": str(events)}, log=None)
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    rank1 = events / "rank1.log"
    # Ray Train registers a checkpoint when its controller next polls the workers (every 2 s): kill rank 1
    # once one is registered, so there is a checkpoint to resume from
    snapshot = tmp_path / "runs" / "killtest" / "ray-train" / "killtest" / "checkpoint_manager_snapshot.json"
    _wait_for(lambda: snapshot.exists(), 240, "a registered checkpoint")
    text = rank1.read_text()
    assert "epoch 8 done" not in text, "training finished before the kill; make epochs longer"
    pid = int(re.search(r"start pid=(\d+)", text).group(1))
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=300)
    assert not t.is_alive()
    assert "error" not in result, result.get("error")
    r = result["r"]
    # metrics were reported for every epoch, and the run finished all of them
    assert [h["epoch"] for h in r["history"]] == list(range(1, 9))
    assert all("val/acc" in h and "loss/crd/feat" in h for h in r["history"])
    rank0 = (events / "rank0.log").read_text()
    restored = re.findall(r"restored epoch=(\d+) step=\d+ bank_updates=(\d+)", rank0)
    assert restored, rank0
    epoch, updates = int(restored[-1][0]), int(restored[-1][1])
    assert epoch >= 1
    # the bank came back as it was at that checkpoint: 2 workers x steps per epoch x epochs updates
    steps = (job.data.batch_size and -(-(1438 // 2) // job.data.batch_size))
    assert updates == 2 * steps * epoch
    # after the restart every worker's updates kept reaching the bank: exactly the per-worker counts of an
    # uninterrupted run (a replayed step is dropped, never applied twice), and the rows moved on
    import torch

    restored_bank = torch.load(events / "restored-bank-feat.pt", weights_only=False)
    final_bank = torch.load(events / "final-bank-feat.pt", weights_only=False)
    assert restored_bank["counts"] == {0: steps * epoch, 1: steps * epoch}
    assert final_bank["counts"] == {0: steps * 8, 1: steps * 8}, final_bank["counts"]
    assert final_bank["updates"] == 2 * steps * 8
    assert final_bank["applied"] == {0: steps * 8 - 1, 1: steps * 8 - 1}
    changed = (final_bank["student"] != restored_bank["student"]).any(axis=1).mean()
    assert changed > 0.9, f"only {changed:.0%} of the bank rows changed after the restart"
    assert Path(r["report"]["plot"]).stat().st_size > 1000 and Path(r["report"]["summary"]).exists()
    from ray.util import list_named_actors

    assert not [a for a in list_named_actors(all_namespaces=True) if a["name"].startswith("kd-bank-killtest")]
