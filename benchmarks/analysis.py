"""Result CSVs -> markdown tables and plots: the one analysis module every benchmark writes with.

A benchmark writes its rows with `write_csv` and builds its report from them as DataFrames;
`read_csv` gives the same frame back from a committed CSV, so every report can be regenerated
without measuring. Beside them: `pick` (a row or value by column equality), number formats
(`num`, `ratio`, `fmt`, `ms`, `count`, `pct`, `sci`), `table` (markdown), `check` (a target's
verdict and margin), `machine`/`machine_table` (what every result states about its machine),
`figure`/`loglog` (matplotlib), `Progress` (time-stamped progress lines).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

MISSING = "–"
Formatter = Callable[[Any], str] | str
Rows = pd.DataFrame | Sequence[Mapping[str, Any]]

# --------------------------------------------------------------------------- CSV


def write_csv(path: Path, rows: Rows) -> None:
    """Rows (dicts, keys in first-seen order, or a DataFrame) to CSV: floats to 6 significant
    digits (the timings carry no more), None/NaN as an empty cell, CRLF line ends."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    frame = frame.astype(object).where(frame.notna(), None)
    frame = frame.map(lambda v: f"{v:.6g}" if isinstance(v, float) else v)
    frame.to_csv(path, index=False, lineterminator="\r\n")  # RFC 4180, as csv.writer writes


def read_csv(path: Path) -> pd.DataFrame:
    """A results CSV as written by `write_csv`: only empty cells are missing (a status such as
    "n/a" stays a string)."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The frame as row dicts with None for missing values (what the reports iterate over)."""
    return [{k: (None if _missing(v) else v) for k, v in row.items()}
            for row in df.to_dict("records")]


def pick(df: pd.DataFrame | Sequence[Mapping[str, Any]], column: str | None = None,
         **where: Any) -> Any:
    """The first row whose columns equal `where` (as a dict), or its `column` value; None if no
    row matches (or the value is missing)."""
    rows = records(df) if isinstance(df, pd.DataFrame) else df
    for row in rows:
        if all(_same(row.get(k), v) for k, v in where.items()):
            if column is None:
                return dict(row)
            value = row.get(column)
            return None if _missing(value) else value
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return a == b


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


# --------------------------------------------------------------------------- numbers


def num(v: Any) -> float | None:
    """A number, or None for a missing/empty/non-numeric value."""
    if _missing(v) or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    """The q-th percentile of latencies in seconds, in ms (NaN for no samples)."""
    return float(np.percentile(np.asarray(seconds) * 1e3, q)) if len(seconds) else math.nan


def ratio(a: Any, b: Any) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    x, y = num(a), num(b)
    return x / y if x is not None and y else None


def fmt(v: Any, digits: int = 2, unit: str = "", *, adaptive: bool = True,
        missing: str = MISSING) -> str:
    """A number for a table: thousands grouped; with `adaptive`, 0 decimals from 100 up and 1
    from 10 up (the digits that carry information in a noisy timing), else `digits` always."""
    x = num(v)
    if x is None:
        return missing
    if adaptive and abs(x) >= 100:
        s = f"{x:,.0f}"
    elif adaptive and abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:,.{digits}f}"
    return s + unit


def ms(us: Any) -> str:
    """Microseconds printed as milliseconds."""
    x = num(us)
    return MISSING if x is None else fmt(x / 1e3, 2)


def count(v: Any) -> str:
    """A count (read back as a float where its column has gaps) as an integer."""
    x = num(v)
    return MISSING if x is None else str(int(x))


def pct(v: Any) -> str:
    """A fraction printed as a percentage."""
    x = num(v)
    return MISSING if x is None else f"{100 * x:.1f} %"


def sci(v: Any) -> str:
    """A small difference (scores vs the oracle) in scientific notation."""
    x = num(v)
    return MISSING if x is None else f"{x:.1e}"


def check(value: float | None, threshold: float, higher: bool = True) -> tuple[str, str]:
    """A target's verdict and margin: ("met", "+12 % headroom") or ("missed", "short by 5 %")."""
    if value is None:
        return "not measured", MISSING
    met = value >= threshold if higher else value <= threshold
    margin = (value / threshold - 1) if higher else (threshold / value - 1)
    return ("met", f"+{100 * margin:.0f} % headroom") if met else \
        ("missed", f"short by {100 * abs(margin):.0f} %")


# --------------------------------------------------------------------------- markdown


def _cell(v: Any, formatter: Formatter | None, missing: str) -> str:
    if callable(formatter):
        return formatter(v)
    if _missing(v):
        return missing
    if isinstance(formatter, str):
        return formatter.format(v)
    return fmt(v) if isinstance(v, float) else str(v)


def table(data: Rows | Sequence[Sequence[Any]], columns: Mapping[str, str] | Sequence[str]
          | None = None, formats: Mapping[str, Formatter] | None = None,
          missing: str = MISSING) -> str:
    """A markdown table.

    `data`: a DataFrame, row dicts, or row lists (then `columns` is the list of headers).
    `columns`: header -> source column (a dict), or the columns to show under their own names;
    default: all columns. `formats`: source column (or header) -> a callable or a format string
    ("{:.2f}"); unformatted cells: strings and integers as they are, floats by `fmt`, missing
    ones as `missing`.
    """
    formats = formats or {}
    if not isinstance(data, pd.DataFrame) and data and not isinstance(data[0], Mapping):
        headers = list(columns or [])
        rows = [[_cell(v, formats.get(h), missing) for h, v in zip(headers, r, strict=True)]
                for r in data]  # type: ignore[arg-type]
    else:
        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data))
        pairs = (list(columns.items()) if isinstance(columns, Mapping) else
                 [(c, c) for c in (columns if columns is not None else frame.columns)])
        headers = [h for h, _ in pairs]
        rows = [[_cell(row.get(src), formats.get(src, formats.get(h)), missing)
                 for h, src in pairs] for row in frame.to_dict("records")]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- progress


class Progress:
    """Progress lines of a long run, stamped with the time since it started:
    `log = Progress("bench"); log("...")` prints `[bench 01:02.3] ...`."""

    def __init__(self, name: str = "bench", stream: Any = None) -> None:
        self.name, self.stream, self.t0 = name, stream, time.monotonic()

    def __call__(self, msg: str) -> None:
        elapsed = time.monotonic() - self.t0
        print(f"[{self.name} {int(elapsed // 60):02d}:{elapsed % 60:04.1f}] {msg}",
              file=self.stream or sys.stdout, flush=True)


# --------------------------------------------------------------------------- the machine


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


# The server the benchmarks start (local_server/): its line in a machine description.
LOCAL_SERVER = {"tritonserver": "2.51 (nvidia-pytriton wheel, local flavour: ONNX models in "
                                "python-backend stand-ins running ONNX Runtime)"}


def _gpu() -> str:
    if shutil.which("nvidia-smi") is None:
        return "none"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({type(e).__name__})"
    return out.stdout.strip().replace("\n", "; ") or "none"


def machine(**extra: str) -> dict[str, str]:
    """What every result file states about where it was measured: date, CPU model and SIMD
    flags, cores, GPU (nvidia-smi), available memory, OS and the versions that set the numbers;
    `extra` adds or overrides items (tritonserver, perf_analyzer, nginx; LOCAL_SERVER)."""
    cpu, flags = "unknown", set()
    # /proc/cpuinfo: psutil has no CPU model name or flags, and platform.processor() is empty
    # on Linux.
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    simd = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags)
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "simd": simd or "none listed",
        "cores": str(os.cpu_count()),
        "gpu": _gpu(),
        "memory": f"{psutil.virtual_memory().available / 2**30:.1f} GiB available at start",
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime-gpu") if _version("onnxruntime") == "not installed"
        else _version("onnxruntime"),
        "numpy": _version("numpy"),
        "tritonclient": _version("tritonclient"),
    }
    info.update(extra)
    return info


def machine_table(info: Mapping[str, Any]) -> str:
    """The machine description as an item | value markdown table."""
    return table([[k, str(v)] for k, v in info.items()], ["item", "value"])


# --------------------------------------------------------------------------- plots


@contextlib.contextmanager
def figure(path: Path, ncols: int = 1, size: tuple[float, float] = (6.5, 4.5),
           dpi: int = 110) -> Iterator[list[Any]]:
    """Axes of a one-row figure, saved to `path` (tight layout) and closed on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size, squeeze=False)
    try:
        yield list(axes[0])
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def loglog(ax: Any, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> None:
    """The common dress of a benchmark plot: log-log axes, labels, grid, legend."""
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)
