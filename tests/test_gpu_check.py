"""scripts/gpu_check.sh is only run for real where a GPU is lent: here its whole path (export.check
on the provider, then the timings) runs on the CPU EP (`--cpu`), so the script cannot rot between
GPU runs, and without a GPU it refuses with the reason instead of reporting CPU figures as GPU
ones."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import small_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_cpu_dry_run_checks_scores_every_guard_and_times(tmp_path: Path) -> None:
    config = tmp_path / "small.json"
    config.write_text(json.dumps(small_config("causal").to_dict()))
    out = tmp_path / "out"
    result = _run("--cpu", "--config", str(config), "--lengths", "0", "300",
                  "--candidates", "1", "40", "--repeats", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    report = (out / "export_check_cpu.txt").read_text()
    assert report in result.stdout  # shown as it is kept
    assert "(target gpu)" in report and " 0 failed (tolerance 0.0001)" in report
    for length in (0, 300):
        for n in (1, 40):
            assert re.search(rf"^L={length} N={n} +onnx split +torch naive +\S+ +\S+ +pass$",
                             report, re.MULTILINE), (length, n)
    refusals = re.findall(r"(\S+) +must refuse +- +- +(.+)$", report, re.MULTILINE)
    assert {graph for graph, _ in refusals} == {"user_encoder", "target_fusion", "ranker_naive",
                                                "user_encoder_append"}
    assert all(verdict == "refused (ok)" for _, verdict in refusals), refusals
    assert re.search(r"^execution provider .* cpu .* pass$", report, re.MULTILINE)
    rows = list(csv.DictReader((out / "gpu_check.csv").open()))
    assert [(r["L"], r["N"]) for r in rows] == [("0", "1"), ("0", "40"), ("300", "1"),
                                                ("300", "40")]
    assert all(float(r["user_encoder_p50_ms"]) > 0 and float(r["target_fusion_p50_ms"]) > 0
               for r in rows)
    state = [float(r["user_kv_mib"]) for r in rows]
    assert state[0] == state[1] < state[2] == state[3]  # grows with L, not with N
    md = (out / "gpu_check.md").read_text()
    assert "export_check_cpu.txt: passed" in md
    assert "| CPUExecutionProvider | 300 | 40 |" in md


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_refuses_without_a_gpu(tmp_path: Path) -> None:
    result = _run("--out", str(tmp_path))
    assert result.returncode == 2
    assert "no CUDA GPU here" in result.stderr and "--cpu" in result.stderr
    assert not list(tmp_path.iterdir())
