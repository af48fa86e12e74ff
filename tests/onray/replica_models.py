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


def overflow_digits(width: int = 8, threshold: float = 17.0):
    """A digits CNN whose logits are inf for rows whose pixel sum is above ``threshold`` (a teacher that overflows
    on a few real training rows: its cache rows must never be written)."""
    import torch

    from kdcore.zoo import DigitsCNN

    class OverflowDigits(DigitsCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            hot = x.flatten(1).sum(1) > threshold
            return torch.where(hot[:, None], torch.full_like(out, float("inf")), out)

    return OverflowDigits(width=width)


def slow_image_cnn(width: int = 8, num_classes: int = 10, delay_s: float = 0.15):
    """kdcore.zoo.image_cnn whose forward sleeps ``delay_s`` inside a Serve replica (a teacher slow enough that a
    build is still running when a test kills one of its replicas); at normal speed everywhere else."""
    import time

    import torch

    from kdcore.zoo import image_cnn

    model = image_cnn(width=width, stem_stride=2, num_classes=num_classes)
    try:
        from ray import serve

        serve.get_replica_context()
    except Exception:  # noqa: BLE001 - not in a replica
        return model

    class Slow(type(model)):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(delay_s)
            return super().forward(x)

    model.__class__ = Slow
    return model
