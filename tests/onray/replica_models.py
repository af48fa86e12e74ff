"""Model factories for tests that must behave differently inside a Serve replica."""

from __future__ import annotations


def crashes_in_replica(width: int = 8):
    """A digits CNN that builds in the driver but raises inside a Ray Serve replica (a replica crashing at start)."""
    from ray import serve

    from kdcore.zoo import digits_cnn

    try:
        serve.get_replica_context()
    except Exception:  # noqa: BLE001 - not in a replica: build normally
        return digits_cnn(width)
    raise RuntimeError("simulated teacher crash while loading in the replica")
