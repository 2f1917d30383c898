"""scripts/gpu_check.sh is only run for real where a GPU is lent: here its whole path runs on the
CPU EP (`--cpu`), so the script cannot rot between GPU runs, and without a GPU it refuses with
the reason instead of reporting CPU figures as GPU ones."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import small_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_cpu_dry_run_checks_scores_and_every_guard(tmp_path: Path) -> None:
    config = tmp_path / "small.json"
    config.write_text(json.dumps(small_config("causal").to_dict()))
    out = tmp_path / "out"
    result = _run("--cpu", "--config", str(config), "--lengths", "0", "300",
                  "--candidates", "1", "40", "--repeats", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = list(csv.DictReader((out / "gpu_check.csv").open()))
    assert {(r["L"], r["N"]) for r in rows if r["check"] == "scores"} == {
        ("0", "1"), ("0", "40"), ("300", "1"), ("300", "40")}
    guards = [r for r in rows if r["check"] == "guard"]
    assert {r["graph"] for r in guards} == {"user_encoder", "target_fusion", "ranker_naive",
                                             "user_encoder_append"}
    assert all(r["ok"] == "True" for r in rows), rows
    assert "| CPUExecutionProvider | 300 | 40 |" in (out / "gpu_check.md").read_text()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_refuses_without_a_gpu(tmp_path: Path) -> None:
    result = _run("--out", str(tmp_path))
    assert result.returncode == 2
    assert "no CUDA GPU here" in result.stderr and "--cpu" in result.stderr
    assert not list(tmp_path.iterdir())
