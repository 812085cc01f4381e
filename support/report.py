"""Plumbing: the chapters' reports, as text tables and as files.

Guarantees: columns line up and numbers are formatted one way in every report: each cell is
written with a format spec (">10", "7.2f", "9.0%"), and each column is as wide as its spec or
its header, whichever is wider, so a header and its rows always share their columns. A report
is written as report.txt and analysis.json, each replaced whole, the JSON strict (a NaN is written
as null, and an infinity is an error, not a file other parsers refuse).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any, Iterable, Sequence

import numpy as np

from support import files


def width(spec: str) -> int:
    """The width a format spec asks for: ">10" → 10, "7.2f" → 7, "%" → 0."""
    digits = re.match(r"(?:.?[<>=^])?[-+ ]?#?0?(\d*)", spec).group(1)
    return int(digits or 0)


def row(values: Iterable[Any], specs: Sequence[str], indent: str = "   ",
        widths: Sequence[int] | None = None) -> str:
    """One line: each value formatted with its column's spec (then right-aligned to the column's
    width, where one is given), one space between columns."""
    cells = [format(value, spec) for value, spec in zip(values, specs)]
    return indent + " ".join(cell.rjust(w) for cell, w in zip(cells, widths or [0] * len(cells)))


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], specs: Sequence[str],
          indent: str = "   ") -> list[str]:
    """A header line, then one line per row; each column as wide as its spec asks, or as its
    header where that is wider, so a header and its rows always share their columns."""
    widths = [max(width(spec), len(name)) for name, spec in zip(header, specs)]
    return [row(header, [""] * len(specs), indent, widths),
            *(row(values, specs, indent, widths) for values in rows)]


def joined(values: Iterable[Any], spec: str, sep: str = " ") -> str:
    """Values formatted alike and joined: `joined([0.5, 0.25], "6.1%", "  ")` → ' 50.0%   25.0%'."""
    return sep.join(format(value, spec) for value in values)


def _strict(value):
    """`value` for strict JSON: arrays as lists, numpy scalars as Python ones, and every NaN (a
    measurement with nothing to measure) as None."""
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_strict(item) for item in value]
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and math.isnan(value) else value


def write(out_dir: str | os.PathLike, lines: Sequence[str], results: dict) -> pathlib.Path:
    """`lines` as out_dir/report.txt and `results` as out_dir/analysis.json; returns out_dir."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files.replace_file(out_dir / "report.txt", "\n".join(lines) + "\n")
    text = json.dumps(_strict(results), indent=1, default=str, allow_nan=False)
    files.replace_file(out_dir / "analysis.json", text + "\n")
    return out_dir
