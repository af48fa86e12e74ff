"""``kd submit``, ``kd status``, ``kd logs``: jobs on a remote Ray cluster through the Ray Jobs API.

The job's runtime environment carries the spec and the project's code (kdcore + services), so the cluster
needs only the dependencies (the kd image has them). Ray's token authentication is honoured the way Ray
itself reads the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from kdcore.errors import UserError
from kdcore.spec.job import JobSpec
from services.raysession import job_env_vars

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SPEC_NAME = "kd-job.yaml"


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        raise UserError(f"cannot reach the Ray Jobs API at {address}: {str(e).splitlines()[0]}; check --address "
                        "(http://HEAD:8265) and, with token auth, that RAY_AUTH_TOKEN or ~/.ray/auth_token holds "
                        "the cluster's token") from None
    except RuntimeError as e:  # auth failures and bad responses
        raise UserError(f"the Ray Jobs API at {address} refused the connection: {str(e).splitlines()[0]}") from None


def stage_job(job: JobSpec, spec_path: str | Path, into: Path) -> Path:
    """A working directory with the project's packages and the job spec, as uploaded to the cluster."""
    for pkg in ("kdcore", "services"):
        shutil.copytree(PROJECT_ROOT / pkg, into / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copyfile(spec_path, into / SPEC_NAME)
    return into


def submit(job: JobSpec, spec_path: str | Path, address: str, submission_id: str | None = None,
           extra_args: list[str] | None = None) -> str:
    """Submit ``kd run`` of the spec to the cluster; returns the submission id."""
    client = _client(address)
    with tempfile.TemporaryDirectory(prefix="kd-submit-") as tmp:
        workdir = stage_job(job, spec_path, Path(tmp))
        entrypoint = " ".join(["python", "-m", "services.cli.main", "run", SPEC_NAME, "--address", "auto",
                               *(extra_args or [])])
        import time

        deadline = time.time() + 90
        while True:
            try:
                return client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                         runtime_env={"working_dir": str(workdir), "env_vars": job_env_vars()},
                                         metadata={"kd_job": job.name})
            except RuntimeError as e:
                # a head that just started has no job agent yet: Ray answers 500 "No available agent"
                if "No available agent" in str(e) and time.time() < deadline:
                    time.sleep(2)
                    continue
                raise UserError(f"the cluster at {address} refused the job: {str(e).splitlines()[0]}") from None


def status(address: str, submission_id: str) -> dict:
    client = _client(address)
    try:
        info = client.get_job_info(submission_id)
    except RuntimeError as e:
        raise UserError(f"no job {submission_id!r} at {address}: {str(e).splitlines()[0]}") from None
    return {"submission_id": submission_id, "status": str(info.status.value if hasattr(info.status, "value")
                                                           else info.status),
            "message": info.message, "entrypoint": info.entrypoint}


def logs(address: str, submission_id: str, follow: bool = False) -> Iterator[str]:
    client = _client(address)
    if not follow:
        yield client.get_job_logs(submission_id)
        return
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(submission_id):
            yield chunk

    agen = tail()
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def wait(address: str, submission_id: str, timeout_s: float = 600.0) -> str:
    """Block until the job ends; returns its final status."""
    import time

    client = _client(address)
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        s = str(client.get_job_status(submission_id))
        if s.split(".")[-1] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return s.split(".")[-1]
        time.sleep(1.0)
    raise TimeoutError(f"job {submission_id} still running after {timeout_s:.0f} s")
