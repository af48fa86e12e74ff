"""A two-teacher digits job shared by the multi-teacher tests: a small CNN and an MLP, random or trained."""

from __future__ import annotations

import copy

CNN = {"kind": "factory", "target": "kdcore.zoo:digits_cnn", "kwargs": {"width": 8}}
MLP = {"kind": "factory", "target": "kdcore.zoo:mlp", "kwargs": {"hidden": 48}}


def two_teacher_job(tmp=None, mode: str = "online", **changes) -> dict:
    """Teachers ``cnn`` (digits CNN, taps embed + block3) and ``mlp`` (weight 0.5, tap hidden); the student pairs
    its ``embed`` with each (``feat`` on cnn, ``hid`` on mlp), KD on the averaged logits, DKD on mlp's alone."""
    job = {
        "name": "mt",
        "teachers": [
            {"name": "cnn", "model": copy.deepcopy(CNN), "taps": ["embed", "block3"]},
            {"name": "mlp", "model": copy.deepcopy(MLP), "taps": ["hidden"], "weight": 0.5},
        ],
        "student": {"model": {"kind": "factory", "target": "kdcore.zoo:digits_cnn", "kwargs": {"width": 4}},
                    "pairs": [{"name": "feat", "student": "embed", "teacher": "embed"},
                              {"name": "hid", "student": "embed", "teacher": "hidden", "teacher_model": "mlp"}]},
        "losses": [{"kind": "ce"}, {"kind": "kd"}, {"kind": "dkd", "teacher": "mlp"},
                   {"kind": "hint", "pair": "feat"}, {"kind": "cosine", "pair": "hid"}],
        "data": {"source": {"kind": "sklearn_digits"}, "batch_size": 128},
        "features": {"mode": mode},
        "train": {"epochs": 1, "num_workers": 0, "optimizer": {"kind": "adam", "lr": 0.003}},
    }
    if tmp is not None:
        job["features"]["cache"] = {"uri": str(tmp / "cache"), "chunk_rows": 256}
        job["output"] = {"dir": str(tmp / "runs")}
    job.update(changes)
    return job
