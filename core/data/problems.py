"""How a dataset's problems reach the user: all at once, one line each, naming the file and the fix;
and the dataset's CSV files, read so that every bad line is reported with its line number.

Reading a folder reports every problem it finds, because a dataset with 40 broken rows should
cost one round trip, not 40; lines are grouped by kind and capped per kind, so that 10k bad rows
stay readable. Cells are read as text (an id like 0012 stays 0012), blank lines are dropped, and
each row keeps `line`, its line in the file, for the messages.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

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


def read_csv(path: Path, problems: Problems) -> pd.DataFrame | None:
    """The rows as text cells plus `line`; None, with the problem added, for a file that is no CSV."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        problems.add("files", f"{path.name}: file is empty; restore it from the dataset download")
        return None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        problems.add("files", f"{path.name}: not a readable CSV ({str(err).strip()}); "
                              "restore it from the dataset download")
        return None
    long = _longer_rows(path, len(table.columns))
    if long:
        line, fields = long[0]
        problems.add("files", f"{path.name}: {len(long)} row(s) have more fields than the header's "
                              f"{len(table.columns)} (line {line} has {fields}); a trailing comma on each row? remove "
                              "it, or name the extra column in the header")
        return None
    table = table.fillna("")
    table.columns = [c.strip() for c in table.columns]
    table["line"] = np.arange(len(table)) + 2  # file line of each row: the header is line 1
    blank = (table.drop(columns="line") == "").all(axis=1)
    return table[~blank].reset_index(drop=True)


def _longer_rows(path: Path, width: int) -> list[tuple[int, int]]:
    """(line, fields) of the rows with more fields than the header: pandas would silently take the
    first column as an index and shift every name by one."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f)
        next(rows, None)
        return [(rows.line_num, len(row)) for row in rows if len(row) > width]


def check_columns(path: Path, table: pd.DataFrame, required: list[str], allowed: list[str] | None,
                   problems: Problems) -> bool:
    """Add a problem per missing, unknown or repeated column; True when every required one is there."""
    columns = [c for c in table.columns if c != "line"]
    missing = [c for c in required if c not in columns]
    unknown = [c for c in columns if allowed is not None and c not in allowed]
    header = f"the header must be {','.join(allowed)}" if allowed else f"the header needs {','.join(required)}"
    for c in missing:
        problems.add("columns", f"{path.name}: column '{c}' is missing; {header}")
    for c in unknown:
        problems.add("columns", f"{path.name}: unknown column '{c}'; {header}")
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    for c in dupes:
        problems.add("columns", f"{path.name}: column '{c}' appears more than once; keep one")
    return not missing


def check_ids(path: Path, table: pd.DataFrame, column: str, problems: Problems) -> None:
    """Add a problem per empty id and per id on several lines of `column`."""
    for line in table.loc[table[column].str.strip() == "", "line"]:
        problems.add("rows", f"{path.name} line {line}: empty {column}; fill it in or delete the row")
    suffixed = table[table[column].str.lower().str.endswith((".jpg", ".jpeg", ".png"))]
    for line, value in zip(suffixed["line"], suffixed[column]):
        problems.add("ids with an extension", f"{path.name} line {line}: {column} {value} ends in a file extension; "
                                              f"ids name the image without it ({Path(value).stem})")
    odd = table[table[column].str.contains(r"[\x00-\x1f\x7f]", regex=True)]
    for line, value in zip(odd["line"], odd[column]):
        problems.add("rows", f"{path.name} line {line}: {column} {value!r} holds a line break or another control "
                             "character; an id is one line of plain text (a file name without its extension)")
    dupes = table[table[column].duplicated(keep=False) & (table[column] != "")]
    for image, rows in dupes.groupby(column, sort=True)["line"]:
        problems.add("duplicate ids", f"{path.name}: {column} {image} appears on lines "
                                      f"{', '.join(map(str, rows))}; keep one row per image")
