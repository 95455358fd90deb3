"""The dataset's CSV files, read so that every bad line is reported with its line number.

Cells are read as text (an id like 0012 stays 0012), blank lines are dropped, and each row keeps
`line`, its line in the file, for the messages.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.problems import Problems


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
    table = table.fillna("")
    table.columns = [c.strip() for c in table.columns]
    table["line"] = np.arange(len(table)) + 2  # file line of each row: the header is line 1
    blank = (table.drop(columns="line") == "").all(axis=1)
    return table[~blank].reset_index(drop=True)


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
    dupes = table[table[column].duplicated(keep=False) & (table[column] != "")]
    for image, rows in dupes.groupby(column, sort=True)["line"]:
        problems.add("duplicate ids", f"{path.name}: {column} {image} appears on lines "
                                      f"{', '.join(map(str, rows))}; keep one row per image")
