"""One command for every benchmark of the project: one table of ratios, written as Markdown.

    .venv/bin/python -m tests.bench.report            # full runs
    .venv/bin/python -m tests.bench.report --quick    # short runs (smoke / CI)
    .venv/bin/python -m tests.bench.report --only recovery,disk --out docs/BENCHMARKS.md

Imports every ``tests/bench/bench_*.py`` module and calls its ``measure(quick)``,
which returns rows ``{name, value, unit, anchor, anchor_value, ratio, target}``
(each ratio is value / an anchor measured side by side in the same run). A module
that fails to import or to measure gets one row carrying its error instead of
stopping the report. The table is printed and written as Markdown with the
machine (CPU model, cores, memory), Python/TensorFlow versions and the date; when
README.md holds the markers ``<!-- bench:start -->`` / ``<!-- bench:end -->`` the
text between them is replaced by the same table.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "docs" / "BENCHMARKS.md"
README = ROOT / "README.md"
MARK_START = "<!-- bench:start -->"
MARK_END = "<!-- bench:end -->"
COLUMNS = ("module", "name", "value", "unit", "anchor", "anchor_value", "ratio", "target", "meets")


def discover(only: Sequence[str] = ()) -> list[str]:
    """Module names of tests/bench/bench_*.py, sorted; `only` filters by topic (bench_<topic>)."""
    names = sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))
    if only:
        wanted = {o if o.startswith("bench_") else f"bench_{o}" for o in only}
        unknown = wanted - set(names)
        if unknown:
            raise SystemExit(f"report: unknown bench module(s): {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    return names


def _error_row(module: str, what: str, exc: BaseException) -> dict[str, Any]:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return {"module": module, "name": f"({what} failed)", "value": None, "unit": "", "anchor": "",
            "anchor_value": None, "ratio": None, "target": "", "error": last[:300]}


def run_module(name: str, quick: bool) -> tuple[list[dict[str, Any]], float]:
    """Rows of one bench module (or one error row) and the seconds it took."""
    started = time.monotonic()
    try:
        mod = importlib.import_module(f"tests.bench.{name}")
    except BaseException as exc:  # noqa: BLE001 - a broken module is reported, not fatal
        if isinstance(exc, KeyboardInterrupt):
            raise
        return [_error_row(name, "import", exc)], time.monotonic() - started
    measure = getattr(mod, "measure", None)
    if not callable(measure):
        err = AttributeError(f"tests.bench.{name} has no measure(quick) function")
        return [_error_row(name, "import", err)], time.monotonic() - started
    try:
        rows = list(measure(quick=quick))
    except BaseException as exc:  # noqa: BLE001 - one failing bench must not sink the report
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exc(file=sys.stderr)
        return [_error_row(name, "measure", exc)], time.monotonic() - started
    out = []
    for row in rows:
        if not isinstance(row, dict) or "name" not in row:
            out.append(_error_row(name, "row", ValueError(f"malformed row {row!r}")))
            continue
        out.append({"module": name, **row})
    return out, time.monotonic() - started


# "<= 1.05", "<= 50 ms", "<= 40 MB (supervisord ~25 MB)"; anything more complex is not judged.
_TARGET_RE = re.compile(r"^\s*(ratio|value)?\s*(<=|>=|<|>)\s*([0-9.eE+-]+)\s*([A-Za-z%]*)\s*(?:\(.*)?$")


def meets(row: dict[str, Any]) -> str:
    """'yes'/'no' when the target is a simple bound, else ''.

    "<= 1.05" bounds the ratio; "<= 50 ms" (a unit after the number) bounds the value.
    """
    target = str(row.get("target") or "")
    m = _TARGET_RE.match(target)
    if not m:
        return ""
    unit = m.group(4)
    field = m.group(1) or ("value" if unit and unit.lower() not in ("x",) else "ratio")
    got = row.get(field)
    if not isinstance(got, int | float) or isinstance(got, bool) or not math.isfinite(got):
        return ""
    try:
        bound = float(m.group(3))
    except ValueError:
        return ""
    ok = {"<=": got <= bound, ">=": got >= bound, "<": got < bound, ">": got > bound}[m.group(2)]
    return "yes" if ok else "no"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}".rstrip("0").rstrip(".") if "." in f"{value:.3f}" else f"{value}"
    return str(value).replace("|", "/").replace("\n", " ")


def cells(row: dict[str, Any]) -> list[str]:
    if row.get("error"):
        return [row["module"], row["name"], "-", "", "", "", "", "", f"error: {_fmt(row['error'])}"]
    return [_fmt(row.get("module")), _fmt(row.get("name")), _fmt(row.get("value")), _fmt(row.get("unit")),
            _fmt(row.get("anchor")), _fmt(row.get("anchor_value")), _fmt(row.get("ratio")),
            _fmt(row.get("target")), meets(row)]


def text_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table for the terminal."""
    body = [list(COLUMNS), *(cells(r) for r in rows)]
    widths = [min(max(len(line[i]) for line in body), 60) for i in range(len(COLUMNS))]
    lines = ["  ".join(c[:60].ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(out)


def machine() -> dict[str, str]:
    """CPU model, cores, memory, OS, Python and TensorFlow versions (what the numbers depend on)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    try:
        from importlib.metadata import version

        info["tensorflow"] = version("tensorflow-cpu")
    except Exception:  # noqa: BLE001 - metadata lookup only; fall back to the other dist name
        try:
            from importlib.metadata import version

            info["tensorflow"] = version("tensorflow")
        except Exception:  # noqa: BLE001 - not installed: say so in the header
            info["tensorflow"] = "not installed"
    try:
        load = os.getloadavg()
        info["load at start"] = f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    except OSError:
        pass
    return info


def markdown(rows: list[dict[str, Any]], info: dict[str, str], quick: bool, when: datetime,
             took: dict[str, float]) -> str:
    head = [
        "# Benchmarks",
        "",
        "Generated by `python -m tests.bench.report" + (" --quick" if quick else "") + "` "
        f"on {when.strftime('%Y-%m-%d %H:%M UTC')}. Every ratio is value / anchor, both measured "
        "side by side in the same run on the same machine; `meets` compares the ratio with the target.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()),
        "",
        markdown_table(rows),
        "",
        "Seconds per module: " + ", ".join(f"{k} {v:.0f}" for k, v in took.items()),
        "",
    ]
    return "\n".join(head)


def update_readme(table_md: str, readme: Path = README) -> bool:
    """Replace the README's text between the bench markers; False when there are none."""
    try:
        text = readme.read_text()
    except OSError:
        return False
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(MARK_START)] + "\n" + table_md.strip() + "\n" + text[end:]
    if new != text:
        readme.write_text(new)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.report", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs of every benchmark")
    p.add_argument("--only", default="", help="comma-separated topics, e.g. recovery,disk")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"Markdown file (default {DEFAULT_OUT})")
    p.add_argument("--no-readme", action="store_true", help="do not update README.md's bench section")
    args = p.parse_args(argv)
    names = discover([o.strip() for o in args.only.split(",") if o.strip()])
    when = datetime.now(timezone.utc)
    info = machine()
    print(f"bench: {len(names)} modules: {', '.join(names)}", flush=True)
    rows: list[dict[str, Any]] = []
    took: dict[str, float] = {}
    for name in names:
        print(f"bench: running {name} (quick={args.quick}) ...", flush=True)
        got, seconds = run_module(name, args.quick)
        took[name] = seconds
        rows.extend(got)
        print(text_table(got), flush=True)
    print("\n" + "; ".join(f"{k} {v}" for k, v in info.items()))
    print(text_table(rows))
    md = markdown(rows, info, args.quick, when, took)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    print(f"\nbench: wrote {out}")
    if not args.no_readme and update_readme(md.split("\n", 2)[2]):
        print(f"bench: updated {README}")
    failed = [r for r in rows if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
