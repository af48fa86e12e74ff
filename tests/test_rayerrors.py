"""kd's errors found inside Ray's wrappers (services.rayerrors); no Ray cluster is started."""

from ray.train import ControllerError, WorkerGroupError

from kdcore.errors import CacheError, DataError, TrainingError
from services.rayerrors import as_kd_error, kd_error_in, root_cause


def _raised_from(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


def test_kd_error_found_through_train_wrappers_and_chained_causes():
    bad = DataError("data.source.path: /nope does not exist")
    wrapped = ControllerError(WorkerGroupError("workers failed", {1: RuntimeError("other"),
                                                                  0: _raised_from(RuntimeError("task"), bad)}))
    assert kd_error_in(wrapped) is bad
    assert as_kd_error(wrapped, TrainingError, "training failed") is bad


def test_other_errors_become_one_line_naming_the_lowest_rank_root_cause():
    wrapped = WorkerGroupError("workers failed", {3: ValueError("three"), 1: KeyError("line 1\nshape mismatch")})
    assert isinstance(root_cause(wrapped), KeyError)
    err = as_kd_error(wrapped, CacheError, "building the cache failed")
    assert isinstance(err, CacheError)
    assert "building the cache failed: KeyError:" in str(err) and "shape mismatch" in str(err)
    assert "\n" not in str(err).strip()


def test_cycles_in_exception_context_end():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert kd_error_in(a) is None
    assert root_cause(a) in (a, b)


def test_ray_datas_retry_note_is_not_taken_for_the_message():
    from ray.exceptions import UserCodeException

    task = UserCodeException("Traceback (most recent call last):\n  File \"x.py\", line 3\n"
                             "RuntimeError: block 7 holds no stored row\n"
                             "Failed to run map task after 1/1 attempts (total backoff 0.0s).\n"
                             "To change retry attempts, backoff, or which errors are retried, configure it.")
    err = as_kd_error(WorkerGroupError("workers failed", {0: task}), TrainingError, "training failed on a worker")
    assert str(err) == ("training failed on a worker: UserCodeException: RuntimeError: block 7 holds no "
                        "stored row")
