"""The feature cache at ``features.cache.uri``: absent (built by the run), matching (reused or resumed), or
built for another job (refused), naming the manifest field that differs.

The cheap identity fields (layers and their shapes, class count, rows, views, augmentation, storage dtype,
chunk layout of an unfinished cache) come from the meta probe and the spec. The teacher and dataset
fingerprints hash every weight and every input row; they are computed when that is small (at most
``FINGERPRINT_BYTES`` each), else left to ``kd run`` with a note.
"""

from __future__ import annotations


from kdcore.spec.job import JobSpec
from kdcore.validate.data import DataInfo
from kdcore.validate.models import Probe
from kdcore.validate.report import Report, first_line, with_timeout

FINGERPRINT_BYTES = 256 << 20
REMOTE_TIMEOUT_S = 20.0
FIELD = "features.cache.uri"


def check(job: JobSpec, info: DataInfo, t_probe: Probe | None, report: Report, offline: bool = False,
          field: str = FIELD) -> None:
    """``job``: one teacher's job (a multi-teacher job's ``for_teacher(name)`` view, whose ``features.cache.uri``
    is that teacher's cache); problems and notes at ``field`` (e.g. ``teachers.1.cache_uri``)."""
    spec = job.features.cache
    if job.features.mode != "cache" or not spec.uri:
        return
    uri = spec.uri
    if uri.startswith("memory://"):
        report.note(f"{field}: {uri} lives in one process only; the run builds it")
        return
    from kdcore.cache.handle import CacheHandle
    from kdcore.errors import KDError

    remote = "://" in uri and not uri.startswith("file://")
    if remote and offline:
        report.note(f"{field}: {uri} not checked (--offline)")
        return

    def look():
        try:
            return CacheHandle.open(uri, None, s3_endpoint=spec.s3_endpoint, read_only=True)
        except KDError as e:
            if "no manifest" in e.message:
                return None
            raise

    if remote:
        handle, err = with_timeout(look, REMOTE_TIMEOUT_S)
        if err is not None:
            report.note(f"{field}: {uri} not reachable from here ({err}); not checked (--offline skips this)")
            return
    else:
        from pathlib import Path

        local = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
        if not local.exists():
            report.note(f"{field}: no cache at {uri} yet; the run builds it")
            return
        if not local.is_dir():
            report.add(field, "is a file, not a cache directory", uri, "point it at a new or empty directory")
            return
        try:
            handle = look()
        except KDError as e:
            report.add(field, f"the cache there cannot be read: {e.message}", uri,
                       "remove it (`kd cache rm URI`) or point features.cache.uri elsewhere")
            return
    if handle is None:
        report.note(f"{field}: no finished cache at {uri} yet; the run builds it there (a directory holding other "
                    "files is refused)")
        return
    _compare(job, info, t_probe, handle, report, field)


def _compare(job, info: DataInfo, t_probe: Probe | None, handle, report: Report, field: str = FIELD) -> None:
    from kdcore.cache.manifest import IDENTITY_FIELDS, LAYOUT_FIELDS, differences, make_manifest
    from kdcore.data.augment import n_params

    uri, found = handle.uri, handle.manifest
    n_train = info.n_train(job.data.val_fraction)
    if t_probe is None or t_probe.logits is None or n_train is None:
        report.note(f"{field}: a cache exists at {uri} but it cannot be compared with this job (the teacher or the "
                    "data could not be checked)")
        return
    taps = [t for t in dict.fromkeys(job.teacher.taps) if t != "logits"]
    if any(t not in t_probe.features for t in taps):
        return  # a tap problem is already reported
    skipped = []
    teacher_fp = _teacher_fingerprint(job, report)
    if teacher_fp is None:
        teacher_fp = found.teacher
        skipped.append("teacher")
    dataset_fp = _dataset_fingerprint(job, info)
    if dataset_fp is None:
        dataset_fp = found.dataset
        skipped.append("dataset")
    try:
        expected = make_manifest(
            teacher=teacher_fp, dataset=dataset_fp, n_samples=n_train,
            layers={t: tuple(int(d) for d in t_probe.features[t].shape[1:]) for t in taps},
            num_classes=int(t_probe.logits.shape[1]), views=job.data.views,
            augmentation=job.data.augment.model_dump(mode="json"), aug_seed=job.data.augment.seed,
            aug_params=n_params(job.data.augment), spec=job.features.cache)
    except Exception as e:  # noqa: BLE001 - the run would fail the same way; report it here
        report.add(field, f"the manifest this job needs is invalid: {first_line(e)}", None,
                   "check teacher.taps and features.cache")
        return
    diffs = differences(expected, found, layout=not found.complete)
    what = dict(IDENTITY_FIELDS + LAYOUT_FIELDS)
    for name, want, have in diffs:
        layout = name in dict(LAYOUT_FIELDS)
        fix = ("resume with the chunk_rows/compression it was started with, or remove it (`kd cache rm URI`)"
               if layout else "point features.cache.uri at another location, or remove it (`kd cache rm URI`) "
               "and let the run rebuild it")
        report.add(field, f"the cache there was built for another job: {name} ({what[name]}) differs: this job "
                   f"{_show(want)}, the cache {_show(have)}; the run would refuse it", uri, fix)
    if diffs:
        return
    if skipped:
        report.note(f"{field}: the {' and '.join(skipped)} fingerprint(s) of the cache at {uri} were not compared "
                    f"(more than {FINGERPRINT_BYTES >> 20} MB to hash); the run compares them")
    if found.complete:
        verdict = "reused" if job.features.cache.reuse else "rebuilt (features.cache.reuse is false)"
        report.note(f"{field}: the cache at {uri} matches this job and is complete: {verdict}")
    else:
        done = len(handle.done_chunks())
        report.note(f"{field}: the cache at {uri} matches this job, {done} of {found.n_chunks} chunks written: "
                    "the run resumes it")


def _show(value) -> str:
    from kdcore.cache.fingerprint import canonical_json

    text = value if isinstance(value, str) else canonical_json(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _teacher_fingerprint(job: JobSpec, report: Report) -> str | None:
    """The teacher's fingerprint as ``kd run`` computes it, when its weights are small; else None."""
    import os

    import torch

    from kdcore.cache.fingerprint import teacher_fingerprint
    from kdcore.modeling import model_from_spec

    ckpt = job.teacher.checkpoint
    if ckpt and (not os.path.isfile(ckpt) or os.path.getsize(ckpt) > FINGERPRINT_BYTES):
        return None
    try:
        with torch.random.fork_rng(devices=[]):
            if not ckpt:
                torch.manual_seed(job.train.seed)  # as kdcore.loop.build_teacher seeds a teacher without weights
            model = model_from_spec(job.teacher.model, ckpt)
            if not ckpt and sum(t.numel() * t.element_size() for t in model.state_dict().values()) > FINGERPRINT_BYTES:
                return None
    except Exception:  # noqa: BLE001 - the model and checkpoint checks report why
        return None
    arch = {"model": job.teacher.model.model_dump(mode="json"), "precision": job.teacher.precision}
    return teacher_fingerprint(model, arch)


def _dataset_fingerprint(job: JobSpec, info: DataInfo) -> str | None:
    """The dataset's fingerprint as ``kd run`` computes it (``DataSplit.fingerprint()``: metadata only for
    readers that stream, the bytes for in-memory sources), when that is small; else None."""
    import math

    from kdcore.loop import load_split

    in_memory = job.data.source.kind in ("sklearn_digits", "npz", "factory")
    if in_memory and (info.n_rows is None or info.shape is None
                      or info.n_rows * math.prod(info.shape) * 4 > FINGERPRINT_BYTES):
        return None
    try:
        split = load_split(job)
        if hasattr(split, "fingerprint"):
            return split.fingerprint()
        from kdcore.cache.fingerprint import dataset_fingerprint

        return dataset_fingerprint(split.ids_train, split.x_train)
    except Exception:  # noqa: BLE001 - the data checks report why
        return None
