"""The kd exception hierarchy.

Every error kd raises on purpose is a ``KDError``. Errors caused by the user (a bad spec,
a missing checkpoint, a layer name that does not exist, a cache built for another teacher)
are ``UserError``s: the CLI prints them as one line per problem and exits 2, never with a
traceback. Anything else is a failure (exit 1).

All of them pickle by their constructor arguments, so they survive the trip from a Ray
worker or Serve replica back to the driver unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class KDError(Exception):
    """Base class of every error kd raises on purpose. Exit status 1 in the CLI."""

    exit_code = 1

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.details))

    def lines(self) -> list[str]:
        """The problem(s) as one line each, as the CLI prints them."""
        return [self.message]


def _rebuild(cls, message, details):
    err = cls.__new__(cls)
    KDError.__init__(err, message, **details)
    for key, value in details.items():
        setattr(err, key, value)
    return err


class UserError(KDError):
    """A mistake in what the user asked for; fixable by changing the input. Exit status 2."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One problem found in a spec: where, what was given, what is wrong and how to fix it."""

    path: str
    message: str
    value: Any = None
    fix: str | None = None
    about: str | None = None  # what the field means, when no specific fix is known

    def __str__(self) -> str:
        text = f"{self.path or '<spec>'}: {self.message}"
        if self.value is not None:
            shown = repr(self.value)
            text += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
        if self.fix:
            text += f"; fix: {self.fix}"
        elif self.about:
            text += f" [{self.path.rsplit('.', 1)[-1]}: {self.about}]"
        return text


class SpecError(UserError):
    """A job spec failed validation. ``problems`` lists every problem found, not just the first."""

    def __init__(self, message: str, problems: list[Problem] | None = None, source: str | None = None, **details):
        super().__init__(message, problems=list(problems or []), source=source, **details)
        self.problems = list(problems or [])
        self.source = source

    def lines(self) -> list[str]:
        prefix = f"{self.source}: " if self.source else ""
        if not self.problems:
            return [prefix + self.message]
        return [prefix + str(p) for p in self.problems]


class ModelLoadError(UserError):
    """A model could not be built or its checkpoint could not be loaded."""


class LayerNotFoundError(UserError):
    """A tapped layer path does not name a module of the model; ``candidates`` are the closest names."""

    def __init__(self, message: str, name: str = "", candidates: list[str] | None = None, **details):
        super().__init__(message, name=name, candidates=list(candidates or []), **details)
        self.name = name
        self.candidates = list(candidates or [])


class DataError(UserError):
    """A dataset could not be read or does not match what the spec says."""


class CacheError(KDError):
    """A feature cache is missing, incomplete or corrupted."""


class CacheMismatchError(UserError):
    """A cache exists but was built for another teacher, dataset, layer set or augmentation."""

    def __init__(self, message: str, field: str = "", expected: Any = None, found: Any = None, **details):
        super().__init__(message, field=field, expected=expected, found=found, **details)
        self.field = field
        self.expected = expected
        self.found = found


class TeacherError(KDError):
    """The teacher server failed to start or to answer."""


class TrainingError(KDError):
    """Student training failed."""
