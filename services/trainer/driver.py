"""Launching student training on Ray Train and collecting its results (export, report)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import ray

from kdcore.errors import KDError, TrainingError, UserError
from kdcore.export import export_student
from kdcore.checkpoints import student_from_checkpoint
from kdcore.loop import load_split, run_dir, teacher_shapes_of
from kdcore.spec.job import JobSpec
from kdcore.spec.paths import resolve_paths
from services.data.context import uses_ray_data
from services.membank.actor import create_bank_actor
from services.rayerrors import as_kd_error
from services.trainer.report import write_report
from services.trainer.worker import train_loop_per_worker


def _shapes(job: JobSpec, split, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    if config.get("teacher_shapes"):
        return config["teacher_shapes"]
    if job.features.mode == "cache":
        from kdcore.cache.jobs import cached_teacher_shapes

        return cached_teacher_shapes(job)
    return teacher_shapes_of(job, split, None)


def worker_error(e: BaseException) -> KDError:
    """kd's own errors come back as they were raised; anything else as one TrainingError line."""
    return as_kd_error(e, TrainingError, "training failed on a worker")


def fit_interruptibly(trainer):
    """``trainer.fit()`` with Ctrl-C raising ``KeyboardInterrupt`` here, like in every other stage of a job.

    Called from the main thread, Ray Train replaces the SIGINT handler with one that aborts the run and
    then exits the process (status 1, no word from kd). Run from another thread it installs none; the main
    thread waits, and on Ctrl-C the caller's Ray session is shut down, which ends the run's controller and
    workers with the driver that owns them (checkpoints already written stay; a rerun resumes)."""
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e

    thread = threading.Thread(target=target, name="kd-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


def claim_run_dir(job: JobSpec, out: Path) -> None:
    """A run directory belongs to one spec: a rerun of the same spec resumes, another spec is refused."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    marker = out / "job.yaml"
    mine = job.model_dump(mode="json", exclude={"output", "ray"})
    if marker.exists():
        raw = yaml.safe_load(marker.read_text()) or {}
        try:  # read back through the model: a field added to the spec since that run (with its default) is no change
            theirs = JobSpec.model_validate(raw).model_dump(mode="json", exclude={"output", "ray"})
        except Exception:  # noqa: BLE001 - not a spec this version reads: compared as written
            theirs = {k: v for k, v in raw.items() if k not in ("output", "ray")}
        if theirs != mine:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise UserError(f"{out} holds a run of a different spec (changed: {', '.join(changed)}); a rerun with the "
                            "same name resumes that run. Give the job a new name, set output.dir, or remove the "
                            "directory to start over")
        return
    marker.write_text(job.to_yaml())


def train_student(job: JobSpec, out_dir: str | Path | None = None, extra_config: dict[str, Any] | None = None,
                  log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train ``job``'s student with Ray Train (``train.num_workers`` workers; 0 runs in this process).

    Creates the job's CRD bank actors (killed when training ends, also on failure), resumes from the last
    checkpoint of a previous run with the same name, exports the student and writes the run report.
    """
    job = resolve_paths(job)  # workers run in other directories
    out = (Path(out_dir) if out_dir else run_dir(job)).resolve()
    claim_run_dir(job, out)
    split = load_split(job)
    config: dict[str, Any] = {"job": job.model_dump(mode="json"), **(extra_config or {})}
    config["teacher_shapes"] = {k: list(v) for k, v in _shapes(job, split, config).items()}
    if job.train.num_workers == 0:
        return _train_in_process(job, out, split, config, log)

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    banks = {}
    t0 = time.perf_counter()
    try:
        for loss in job.losses:
            if loss.kind == "crd":
                p = loss.params
                banks[loss.pair] = create_bank_actor(job.name, loss.pair, split.n_train, p.feat_dim, p.momentum,
                                                     p.bank_dtype, job.train.seed)
        config["bank_actors"] = banks
        use_gpu = job.train.gpus_per_worker > 0
        resources = {"CPU": job.train.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = job.train.gpus_per_worker
        datasets, data_config = {}, {}
        if job.features.mode == "cache" and uses_ray_data(job):  # several teachers: chunks joined across caches
            from services.data.pipeline import cache_training_dataset, train_data_config

            datasets["train"] = cache_training_dataset(job, config["job"])
            data_config["dataset_config"] = train_data_config(job)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            datasets=datasets or None,
            **data_config,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=job.train.num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=job.name, storage_path=str((out / "ray-train").resolve()),
                                 failure_config=FailureConfig(max_failures=job.train.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=job.train.checkpoint.keep)),
        )
        if log:
            log(f"[{job.name}] training on Ray Train: {job.train.num_workers} worker(s), features {job.features.mode}")
        try:
            result = fit_interruptibly(trainer)
        except Exception as e:  # noqa: BLE001 - re-raised as the worker's own (picklable) error
            raise worker_error(e) from None
    finally:
        for actor in banks.values():
            ray.kill(actor)
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        student, history = student_from_checkpoint(job, Path(d) / "state.pt")
    return _finish(job, out, student, history, split, time.perf_counter() - t0, log)


def _train_in_process(job: JobSpec, out: Path, split, config, log) -> dict[str, Any]:
    from kdcore.loop import train_local
    from services.trainer.feeds import make_feed

    t0 = time.perf_counter()
    r = train_local(job, out_dir=out, source=make_feed(job, split, config), progress=False, log=log)
    student, history = student_from_checkpoint(job, out / "checkpoints" / "state.pt")
    return _finish(job, out, student, history, split, time.perf_counter() - t0, log, r.get("teacher_forwards"))


def _finish(job, out: Path, student, history, split, seconds: float, log, teacher_forwards=None) -> dict[str, Any]:
    final = history[-1] if history else {}
    student_dir = export_student(student, job.student, out / "student",
                                 {"job": job.name, "val_acc": final.get("val/acc"),
                                  "normalize": {"mean": split.mean, "std": split.std}})
    extra = {"features": job.features.mode, "workers": job.train.num_workers, "train_seconds": round(seconds, 2)}
    if job.multi_teacher:
        extra["teachers"] = ", ".join(f"{n} (weight {w:g})" for n, w in job.teacher_weights().items())
    report = write_report(out, job.name, history, extra)
    if log:
        log(f"[{job.name}] val acc {final.get('val/acc', float('nan')):.4f} after {len(history)} epoch(s); "
            f"student in {student_dir}")
    return {"history": history, "final": final, "out_dir": str(out), "student_dir": str(student_dir),
            "report": report, "seconds": seconds, "teacher_forwards": teacher_forwards,
            "student": {k: v.clone() for k, v in student.state_dict().items()}}
