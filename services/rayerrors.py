"""kd's errors out of Ray's wrappers: a worker's, a task's or a replica's exception arrives wrapped (Ray Train's
``WorkerGroupError`` and ``ControllerError``, Ray's ``RayTaskError``, a Serve call's or a Ray Data task's
re-raise), and the user should see kd's own message, or one line naming what failed."""

from __future__ import annotations

import re
from typing import Callable, Iterator

from kdcore.errors import KDError


def _wrapped(e: BaseException) -> Iterator[BaseException]:
    """The exceptions ``e`` wraps, the one it was raised for first."""
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(e, WorkerGroupError) and e.worker_failures:
        yield from (e.worker_failures[rank] for rank in sorted(e.worker_failures))
    if isinstance(e, ControllerError) and e.controller_failure is not None:
        yield e.controller_failure
    if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None:
        yield e.cause
    for inner in (e.__cause__, e.__context__):
        if inner is not None:
            yield inner


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception along the first wrapped one of each wrapper (the worker's, the task's)."""
    seen = {id(e)}
    while (inner := next(_wrapped(e), None)) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    return e


def kd_error_in(e: BaseException) -> KDError | None:
    """The first kd error anywhere among the exceptions ``e`` wraps (``e`` itself included), if any."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, KDError):
            return x
        stack.extend(reversed(list(_wrapped(x))))
    return None


def as_kd_error(e: BaseException, make: Callable[[str], KDError], what: str) -> KDError:
    """The kd error inside ``e``, else ``make("<what>: <type>: <last line of the root cause>")``."""
    kd = kd_error_in(e)
    if kd is not None:
        return kd
    root = root_cause(e)
    lines = [line for line in _without_retry_note(str(root)).splitlines() if line.strip()]
    return make(f"{what}: {type(root).__name__}: {lines[-1].strip() if lines else ''}")


# Ray Data appends "Failed to <what> after n/m attempts (...)" and a note on its retry settings to a task's error.
_RETRY_NOTE = re.compile(r"\n\s*Failed to .* after \d+/\d+ attempts.*\Z", re.DOTALL)


def _without_retry_note(message: str) -> str:
    return _RETRY_NOTE.sub("", message)
