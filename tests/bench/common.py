"""What every benchmark module shares: the row format and the command line.

A row is {"name", "value", "unit", "anchor", "anchor_value", "ratio", "target"};
`ratio` is value / anchor_value, both measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

Row = dict[str, Any]
COLUMNS = ("name", "value", "unit", "anchor", "anchor_value", "ratio", "target")


def row(name: str, value: float | None, unit: str, anchor: str, anchor_value: float | None,
        target: str) -> Row:
    """One result beside its anchor; the ratio is computed here, never by hand."""
    ratio = value / anchor_value if value is not None and anchor_value else None
    return {"name": name, "value": None if value is None else round(value, 4), "unit": unit,
            "anchor": anchor, "anchor_value": None if anchor_value is None else round(anchor_value, 4),
            "ratio": None if ratio is None else round(ratio, 3), "target": target}


def settle() -> None:
    """Flush dirty pages and pause, so an earlier measurement's write-back lands outside the next."""
    os.sync()
    time.sleep(0.2)


def print_table(rows: list[Row]) -> None:
    """Rows as an aligned text table."""
    table = [COLUMNS] + [tuple("-" if r.get(k) is None else str(r[k]) for k in COLUMNS) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    for n, line in enumerate(table):
        print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
        if n == 0:
            print("-+-".join("-" * w for w in widths))


def main(measure: Callable[[bool], list[Row]], doc: str | None,
         setup: Callable[[], None] | None = None) -> int:
    """`python -m tests.bench.bench_X [--quick]`: measure and print the table."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    args = parser.parse_args()
    if setup is not None:
        setup()
    print_table(measure(args.quick))
    return 0
