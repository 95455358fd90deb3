"""How a dataset's problems reach the user: all at once, one line each, naming the file and the fix.

Reading a folder reports every problem it finds, because a dataset with 40 broken rows should
cost one round trip, not 40; lines are grouped by kind and capped per kind, so that 10k bad rows
stay readable.
"""
from __future__ import annotations

from pathlib import Path

MAX_LINES = 20  # listed lines per kind of problem; the rest are counted


class DataError(Exception):
    """A dataset that cannot be used; `problems` holds one line per culprit."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self):  # keep the list intact across process pools
        return type(self), (self.problems,)


class Problems:
    """Problems or warnings grouped by kind, capped per kind."""

    def __init__(self):
        self.kinds: dict[str, list[str]] = {}

    def add(self, kind: str, line: str) -> None:
        self.kinds.setdefault(kind, []).append(line)

    def lines(self) -> list[str]:
        out = []
        for kind, lines in self.kinds.items():
            out += lines[:MAX_LINES]
            if len(lines) > MAX_LINES:
                out.append(f"... and {len(lines) - MAX_LINES} more {kind}")
        return out


def plural(n: int, noun: str) -> str:
    """`1 image`, `2,000 images`."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def listing(names: list[str], limit: int = 5) -> str:
    """The first few names, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def relative(root: Path, path) -> str:
    """A path as the user knows it: inside the dataset folder when it is there."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)
