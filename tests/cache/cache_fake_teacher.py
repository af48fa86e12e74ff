"""A deterministic fake teacher for the cache tests, usable in-process and as a subprocess build script.

Row r (sample r // V, view r % V) gets features, logits and augmentation params that are pure functions
of r, so any process computes the same bytes.

As a script::

    python cache_fake_teacher.py URI [--writer W --n-writers N] [--kill-after-computes K]
        [--kill-after-writes K] [--sleep S] [--calls-file F] [--create] [--lease-ttl S] [--barrier B]

``--kill-after-computes K``: SIGKILL itself when compute_fn is called the (K+1)-th time (K chunks were
computed, fewer may be written). ``--kill-after-writes K``: SIGKILL itself right after all the data of
the (K+1)-th chunk is stored, before its done marker (``--victim-file`` gets that chunk's index). ``--calls-file``: append the row ranges computed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

N_SAMPLES = 300
VIEWS = 2
CHUNK_ROWS = 64  # 600 rows -> 10 chunks, the last one partial (24 rows)
LAYERS = {"embed": (8,), "block.3": (4, 3)}
NUM_CLASSES = 10
AUG_PARAMS = 3
AUG_SPEC = {"crop": [0.8, 1.0], "flip": True}
SAMPLE_IDS = np.arange(N_SAMPLES, dtype=np.int64) * 3 + 1000


def compute(start: int, stop: int) -> dict[str, np.ndarray]:
    r = np.arange(start, stop, dtype=np.float64)
    sample, view = r // VIEWS, r % VIEWS
    embed = np.sin(r[:, None] * 0.37 + np.arange(8)[None, :] * 0.11) * 3.0
    block = np.cos(r[:, None] * 0.05 + np.arange(12)[None, :]).reshape(-1, 4, 3) * 10.0
    logits = np.sin(r[:, None] * 0.013 * (np.arange(NUM_CLASSES)[None, :] + 1)) * 8.0
    aug = np.stack([sample, view, (r * 7919) % 101], axis=1)
    return {"embed": embed.astype(np.float32), "block.3": block.astype(np.float32),
            "logits": logits.astype(np.float32), "aug": aug.astype(np.float32)}


def manifest(**overrides):
    from kdcore.cache import make_manifest

    kw = dict(teacher="sha256:teacher-a", dataset="sha256:dataset-a", n_samples=N_SAMPLES, layers=LAYERS,
              num_classes=NUM_CLASSES, views=VIEWS, augmentation=AUG_SPEC, aug_seed=7, aug_params=AUG_PARAMS,
              chunk_rows=CHUNK_ROWS)
    kw.update(overrides)
    return make_manifest(**kw)


def build_reference(path: Path, **overrides) -> str:
    from kdcore.cache import CacheWriter, build

    uri = str(path)
    w = CacheWriter.create(uri, manifest(**overrides), SAMPLE_IDS)
    report = build(w, compute)
    assert report.complete and report.written == 10
    return uri


def build_cache(spec, manifest, sample_ids, compute_fn, *, root=None, writer=0, n_writers=1, progress=None):
    """Build (or reuse, or resume) the cache a CacheSpec asks for: at ``spec.uri``, else ``root/<key>``;
    with ``spec.reuse`` and no uri, a complete matching cache anywhere under ``root`` is reused."""
    from kdcore.cache import BuildReport, CacheWriter, build, find_cache
    from kdcore.cache.stores import join_uri

    if spec.uri is None and spec.reuse:
        found = find_cache(root, manifest, s3_endpoint=spec.s3_endpoint)
        if found is not None:
            n = manifest.n_chunks
            return BuildReport(found, n, n, n, 0, 0, 0, True, True, 0.0)
    uri = spec.uri or join_uri(root, manifest.key())
    if writer == 0:
        w = CacheWriter.open_or_create(uri, manifest, sample_ids, reuse=spec.reuse, s3_endpoint=spec.s3_endpoint)
    else:
        w = CacheWriter.open(uri, manifest, s3_endpoint=spec.s3_endpoint, writer=writer)
    return build(w, compute_fn, writer=writer, n_writers=n_writers, progress=progress)


def snapshot(root: Path) -> dict[str, object]:
    """Every object of a cache; times (manifest created/completed, marker written_at) left out."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if rel == "zarr.json":
            meta = json.loads(p.read_text())
            m = dict(meta["attributes"]["kd_cache"])
            m.pop("created_at"), m.pop("completed_at")
            meta["attributes"] = m
            out[rel] = meta
        elif rel.startswith("kd_done/0"):
            marker = json.loads(p.read_text())
            marker.pop("written_at")
            out[rel] = marker
        else:
            out[rel] = p.read_bytes()
    return out


HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def run_teacher(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run this file as a build script in a fresh interpreter."""
    proc = subprocess.run([sys.executable, str(HERE / "cache_fake_teacher.py"), *args], capture_output=True,
                          text=True, env=_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"teacher script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def spawn_teacher(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "cache_fake_teacher.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def main(argv: list[str]) -> int:
    from kdcore.cache import CacheWriter, build
    from kdcore.cache.stores import LocalCacheStore

    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("--writer", type=int, default=0)
    p.add_argument("--n-writers", type=int, default=1)
    p.add_argument("--kill-after-computes", type=int, default=None)
    p.add_argument("--kill-after-writes", type=int, default=None)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--calls-file", default=None)
    p.add_argument("--create", action="store_true", help="create the cache if needed (writer 0)")
    p.add_argument("--s3-endpoint", default=None)
    p.add_argument("--victim-file", default=None, help="with --kill-after-writes: where to write the chunk killed")
    p.add_argument("--writer-threads", type=int, default=2)
    p.add_argument("--lease-ttl", type=float, default=60.0)
    p.add_argument("--ready-id", default=None, help="name of the ready file (default: the writer index)")
    p.add_argument("--barrier", default=None, help="touch BARRIER.ready-W, then wait for BARRIER.go to exist")
    args = p.parse_args(argv)

    calls = [0]

    def compute_fn(start: int, stop: int):
        if args.kill_after_computes is not None and calls[0] >= args.kill_after_computes:
            os.kill(os.getpid(), signal.SIGKILL)
        calls[0] += 1
        if args.calls_file:
            with open(args.calls_file, "a") as f:
                f.write(json.dumps([start, stop, time.time()]) + "\n")
        if args.sleep:
            time.sleep(args.sleep)
        return compute(start, stop)

    if args.kill_after_writes is not None:
        real_put = LocalCacheStore.put_chunk
        per_chunk: dict[int, int] = {}
        lock = threading.Lock()

        def put_then_maybe_die(self, key, data, crc_bytes):
            out = real_put(self, key, data, crc_bytes)
            chunk = int(key.rsplit("/", 1)[-1].split(".")[1])  # <array>/c.<chunk>.0...
            with lock:
                per_chunk[chunk] = per_chunk.get(chunk, 0) + 1
                # 4 data arrays per chunk (2 layers, logits, aug): die once the (K+1)-th chunk has all of
                # them stored, before that chunk's done marker is written
                complete = [c for c, n in per_chunk.items() if n == 4]
                if per_chunk[chunk] == 4 and len(complete) == args.kill_after_writes + 1:
                    if args.victim_file:
                        Path(args.victim_file).write_text(str(chunk))
                    os.kill(os.getpid(), signal.SIGKILL)
            return out

        LocalCacheStore.put_chunk = put_then_maybe_die

    m = manifest()
    if args.create:
        w = CacheWriter.open_or_create(args.uri, m, SAMPLE_IDS, s3_endpoint=args.s3_endpoint)
    else:
        w = CacheWriter.open(args.uri, m, s3_endpoint=args.s3_endpoint)
    if args.barrier:
        Path(f"{args.barrier}.ready-{args.ready_id or args.writer}").touch()
        deadline = time.monotonic() + 60
        while not Path(f"{args.barrier}.go").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
    report = build(w, compute_fn, writer=args.writer, n_writers=args.n_writers, writer_threads=args.writer_threads,
                   lease_ttl=args.lease_ttl)
    print(json.dumps({"written": report.written, "calls": report.compute_calls, "complete": report.complete,
                      "by_others": report.by_others, "skipped": report.skipped, "taken_over": report.taken_over}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
