"""What a deep check found: problems (the job would not start) and notes (worth knowing, not fatal)."""

from __future__ import annotations

import threading

from dataclasses import dataclass, field

from kdcore.errors import Problem


@dataclass
class Report:
    """Problems (``kdcore.errors.Problem``: field path, message, value, fix) and notes (plain lines)."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, path: str, message: str, value=None, fix: str | None = None) -> None:
        self.problems.append(Problem(path, message, value, fix))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def merge(self, other: "Report", prefix: str = "") -> None:
        """Add ``other``'s problems (paths prefixed with ``prefix``) and notes, skipping repeats."""
        seen = {str(p) for p in self.problems}
        for p in other.problems:
            q = Problem(f"{prefix}{p.path}", p.message, p.value, p.fix) if prefix else p
            if str(q) not in seen:
                self.problems.append(q)
                seen.add(str(q))
        for n in other.notes:
            self.note(n)


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line: ``Type: first line of the message``."""
    text = next((line.strip() for line in str(getattr(e, "message", None) or e).splitlines() if line.strip()), "")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def short(e: BaseException, limit: int = 300) -> str:
    """An exception's message as one short line (no type name)."""
    text = next((line.strip() for line in str(getattr(e, "message", None) or e).splitlines() if line.strip()), "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def path_hint(value: str) -> str:
    """How to fix a local path that does not exist."""
    import os

    if os.path.isabs(os.path.expanduser(value)):
        return ("check the path: it must exist on the machine kd runs on (a path on a cluster volume is checked there; "
                "--schema-only skips file checks)")
    return f"check the path (relative paths are resolved from the directory kd is started in, {os.getcwd()})"


def with_timeout(fn, timeout: float):
    """``fn()`` in a daemon thread: (result, None), or (None, reason) on an error or after ``timeout``."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported as unreachable
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name="kd-validate-remote")
    t.start()
    t.join(timeout)
    if t.is_alive():
        return None, f"no answer in {timeout:.0f} s"
    if "error" in box:
        return None, first_line(box["error"], 200)
    return box.get("value"), None
