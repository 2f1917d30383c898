"""Result CSVs -> pandas frames -> markdown tables and plots: the one analysis module, so every
committed report regenerates from its CSVs alone (`write_csv`, `read_csv`) with the same number
formats, target verdicts (`check`), machine description (`machine`) and plots (`figure`)."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import math
import os
import platform
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
LOCAL_SERVER = {"tritonserver": "2.51 (nvidia-pytriton wheel, local flavour: ONNX models in "
                                "python-backend stand-ins running ONNX Runtime)"}


def write_csv(path: Path, rows: Rows) -> None:
    """Rows (dicts, keys in first-seen order, or a DataFrame) to CSV: floats to 6 significant
    digits (the timings carry no more), None/NaN as an empty cell, CRLF line ends (RFC 4180)."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    frame = frame.map(lambda v: f"{v:.6g}" if isinstance(v, float) and not pd.isna(v) else v)
    frame.to_csv(path, index=False, lineterminator="\r\n")


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV as `write_csv` wrote it: only empty cells are missing ("n/a" stays a string)."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The frame as row dicts with None for missing values."""
    return df.astype(object).where(df.notna(), None).to_dict("records")


def pick(df: pd.DataFrame | Sequence[Mapping[str, Any]], column: str | None = None,
         **where: Any) -> Any:
    """The first row whose columns equal `where` (as a dict), or its `column` value; None if no
    row matches (or the value is missing)."""
    for row in records(df) if isinstance(df, pd.DataFrame) else df:
        if all(row.get(k) == v for k, v in where.items()):
            value = dict(row) if column is None else row.get(column)
            return None if np.ndim(value) == 0 and pd.isna(value) else value
    return None


def num(v: Any) -> float | None:
    """A number, or None for a missing/empty/non-numeric value."""
    x = pd.to_numeric(v, errors="coerce") if np.ndim(v) == 0 else None
    return None if x is None or pd.isna(x) else float(x)


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    """The q-th percentile of latencies in seconds, in ms (NaN for no samples)."""
    return float(np.percentile(np.asarray(seconds) * 1e3, q)) if len(seconds) else math.nan


def ratio(a: Any, b: Any) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    x, y = num(a), num(b)
    return x / y if x is not None and y else None


def fmt(v: Any, digits: int = 2, *, adaptive: bool = True, missing: str = MISSING) -> str:
    """A number for a table: thousands grouped; with `adaptive`, 0 decimals from 100 up and 1
    from 10 up (the digits that carry information in a noisy timing), else `digits` always."""
    x = num(v)
    if adaptive and x is not None and abs(x) >= 10:
        digits = 0 if abs(x) >= 100 else 1
    return missing if x is None else f"{x:,.{digits}f}"


def ms(us: Any) -> str:
    """Microseconds printed as milliseconds."""
    return fmt(ratio(us, 1e3), 2)


def count(v: Any) -> str:
    """A count (read back as a float where its column has gaps) as an integer."""
    return MISSING if num(v) is None else str(int(num(v)))


def pct(v: Any) -> str:
    """A fraction printed as a percentage."""
    return MISSING if num(v) is None else f"{100 * num(v):.1f} %"


def sci(v: Any) -> str:
    """A small difference (scores vs the oracle) in scientific notation."""
    return MISSING if num(v) is None else f"{num(v):.1e}"


def check(value: float | None, threshold: float, higher: bool = True) -> tuple[str, str]:
    """A target's verdict and margin: ("met", "+12 % headroom") or ("missed", "short by 5 %")."""
    if value is None:
        return "not measured", MISSING
    met = value >= threshold if higher else value <= threshold
    margin = 100 * abs((value / threshold - 1) if higher else (threshold / value - 1))
    return ("met", f"+{margin:.0f} % headroom") if met else ("missed", f"short by {margin:.0f} %")


def table(data: Rows | Sequence[Sequence[Any]], columns: Mapping[str, str] | Sequence[str]
          | None = None, formats: Mapping[str, Formatter] | None = None,
          missing: str = MISSING) -> str:
    """A markdown table of a DataFrame, row dicts, or row lists (then `columns` are the headers).
    `columns`: header -> column, or the columns to show (default: all); `formats`: column or
    header -> a callable or format string; else floats by `fmt`, missing cells as `missing`."""
    formats = formats or {}
    if isinstance(data, pd.DataFrame) or not data or isinstance(data[0], Mapping):
        frame = pd.DataFrame(data)
        rows, columns = frame.to_dict("records"), columns or list(frame.columns)
    else:
        rows = [dict(zip(columns, r, strict=True)) for r in data]
    pairs = list(columns.items()) if isinstance(columns, Mapping) else [(c, c) for c in columns]
    lines = ["| " + " | ".join(h for h, _ in pairs) + " |", "|" + "---|" * len(pairs)]
    lines += ["| " + " | ".join(_cell(row.get(src), formats.get(src, formats.get(h)), missing)
                                for h, src in pairs) + " |" for row in rows]
    return "\n".join(lines)


def _cell(v: Any, formatter: Formatter | None, missing: str) -> str:
    if callable(formatter):
        return formatter(v)
    if np.ndim(v) == 0 and pd.isna(v):  # a scalar missing value (a list cell is shown as it is)
        return missing
    if isinstance(formatter, str):
        return formatter.format(v)
    return fmt(v) if isinstance(v, float) else str(v)


class Progress:
    """Time-stamped progress lines: `Progress("bench")("x")` prints `[bench 01:02.3] x`."""

    def __init__(self, name: str = "bench", stream: Any = None) -> None:
        self.name, self.stream, self.t0 = name, stream, time.monotonic()

    def __call__(self, msg: str) -> None:
        elapsed = time.monotonic() - self.t0
        print(f"[{self.name} {int(elapsed // 60):02d}:{elapsed % 60:04.1f}] {msg}",
              file=self.stream or sys.stdout, flush=True)


def _version(*dists: str) -> str:
    for dist in dists:
        with contextlib.suppress(md.PackageNotFoundError):
            return md.version(dist)
    return "not installed"


def _gpu() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return "none" if isinstance(e, FileNotFoundError) else f"unknown ({type(e).__name__})"
    return out.stdout.strip().replace("\n", "; ") or "none"


def machine(**extra: str) -> dict[str, str]:
    """Where a result was measured: date, CPU (/proc/cpuinfo: psutil has no model name or flags),
    cores, GPU, available memory, OS and the versions that set the numbers; `extra` adds or
    overrides items (tritonserver, perf_analyzer, nginx; LOCAL_SERVER, the local server's)."""
    cpuinfo = Path("/proc/cpuinfo")
    first = cpuinfo.read_text().split("\n\n")[0] if cpuinfo.exists() else ""
    fields = dict(tuple(p.strip() for p in line.split(":", 1))
                  for line in first.splitlines() if ":" in line)
    flags = set(fields.get("flags", "").split())
    simd = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags)
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": fields.get("model name", "unknown"), "simd": simd or "none listed",
            "cores": str(os.cpu_count()), "gpu": _gpu(),
            "memory": f"{psutil.virtual_memory().available / 2**30:.1f} GiB available at start",
            "os": platform.platform(), "python": platform.python_version(),
            "torch": _version("torch"), "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
            "numpy": _version("numpy"), "tritonclient": _version("tritonclient"), **extra}


def machine_table(info: Mapping[str, Any]) -> str:
    """The machine description as an item | value markdown table."""
    return table([[k, str(v)] for k, v in info.items()], ["item", "value"])


@contextlib.contextmanager
def figure(path: Path, ncols: int = 1, size: tuple[float, float] = (6.5, 4.5),
           dpi: int = 110) -> Iterator[list[Any]]:
    """Axes of a one-row figure saved to `path` on exit (a bare Figure: no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    axes = fig.subplots(1, ncols, squeeze=False)
    yield list(axes[0])
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def loglog(ax: Any, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> None:
    """The common dress of a benchmark plot: log-log axes, labels, grid, legend."""
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)
