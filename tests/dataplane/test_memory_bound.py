"""A dataset bigger than a per-process memory bound trains under that bound (the reader holds only metadata)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdcore.data.synth import write_parquet_images

pytestmark = pytest.mark.slow

ROWS, SIZE = 12000, 96  # 12000 x 3 x 96 x 96 float32 = 1.3 GB decoded (the PNG bytes are ~0.3 GB)
BOUND_MB = 850


def test_training_on_a_dataset_bigger_than_the_memory_bound_stays_under_it(tmp_path):
    write_parquet_images(tmp_path / "pq", ROWS, size=SIZE, shards=3, rows_per_group=256)
    decoded_mb = ROWS * 3 * SIZE * SIZE * 4 / 2**20
    assert decoded_mb > BOUND_MB * 1.4
    model = {"kind": "factory", "target": "kdcore.zoo:image_cnn"}
    job = {
        "name": "big",
        "teacher": {"model": {**model, "kwargs": {"width": 8, "stem_stride": 8}}, "taps": ["embed"]},
        "student": {"model": {**model, "kwargs": {"width": 4, "stem_stride": 8}},
                    "pairs": [{"name": "feat", "student": "embed", "teacher": "embed"}]},
        "losses": [{"kind": "ce"}, {"kind": "kd"}, {"kind": "hint", "pair": "feat"}],
        "data": {"source": {"kind": "parquet", "path": str(tmp_path / "pq"), "image_column": "image",
                            "label_column": "label", "id_column": "id", "image_size": SIZE},
                 "batch_size": 128, "val_fraction": 0.1, "views": 2,
                 "augment": {"kind": "random_resized_crop", "size": 64, "flip": True}},
        "train": {"epochs": 1, "num_workers": 0, "optimizer": {"kind": "adam", "lr": 0.003}},
        "output": {"dir": str(tmp_path / "runs")},
    }
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job))
    # a fresh parent whose only child is kd: RUSAGE_CHILDREN is then kd's own peak resident memory
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    kd = str(Path(sys.executable).parent / "kd")
    r = subprocess.run([sys.executable, "-c", probe, kd, "train", "--local", "--quiet", str(spec)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    peak_mb = int(r.stdout.split("PEAK_KB")[-1].split()[0]) / 1024
    print(f"\n[memory] dataset decoded {decoded_mb:.0f} MB; kd train --local peak RSS {peak_mb:.0f} MB "
          f"(bound {BOUND_MB} MB)")
    assert peak_mb < BOUND_MB
    metrics = json.loads((tmp_path / "runs" / "big" / "metrics.json").read_text())
    assert metrics[0]["epoch"] == 1 and "val/top5" in metrics[0] and metrics[0]["val/top5"] >= metrics[0]["val/acc"]
