"""`scripts/bench.sh --smoke`: a real tritonserver, the real perf_analyzer, one tiny point."""

from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "scripts" / "bench.sh"
MODELS = {"ranker", "ranker_naive", "ranker_base"}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _number(text: str) -> float:
    value = float(text)
    assert math.isfinite(value)
    return value


@pytest.mark.server
def test_bench_smoke_writes_numbers(tmp_path: Path, small_repository: Path) -> None:
    """On the small test model (exported by the fixture), so a fresh clone needs no export."""
    from tests.conftest import small_config

    config = tmp_path / "small_causal.json"
    config.write_text(json.dumps(small_config("causal").to_dict()))
    out = tmp_path / "bench"
    proc = subprocess.run([str(BENCH), "--smoke", "--out", str(out), "--config", str(config),
                           "--repository", str(small_repository)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[bench" in proc.stdout  # progress on every step

    points = _rows(out / "points.csv")
    assert {r["model"] for r in points} == MODELS
    for row in points:
        # unstable runs keep the last window's numbers; nothing else is acceptable here
        assert row["status"] in ("ok", "unstable"), row
        assert _number(row["p50_us"]) > 0
        assert _number(row["throughput"]) > 0

    (summary,) = _rows(out / "summary.csv")
    assert _number(summary["speedup_p50"]) > 0
    assert _number(summary["flop_bound"]) > 1
    assert _number(summary["ensemble_over_direct"]) > 0
    assert _number(summary["max_abs_diff"]) < 1e-4  # split == naive to float tolerance

    direct = {r["model"] for r in _rows(out / "direct.csv")}
    assert {"user_encoder", "target_fusion", "split", "ranker_naive", "ranker_base"} <= direct
    memory = _rows(out / "memory.csv")
    assert memory and all(r["status"] == "ok" for r in memory)
    assert all(_number(r["peak_delta_bytes"]) >= 0 for r in memory)

    report = (out / "report.md").read_text()
    for heading in ("## Machine and versions", "## Targets", "## Speedup vs the FLOP bound",
                    "## In LONGER's form (throughput drop)", "## Memory", "## Where the time goes"):
        assert heading in report
    png = (out / "speedup.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
