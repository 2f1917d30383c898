"""The benchmark's FLOP model and perf_analyzer output parsing (no server)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import perf_analyzer as pa
from benchmarks.flops import (
    FlopModel,
    seeds_model_speedup,
    seeds_scaled_drop,
    sequence_cost_ratio,
)
from export.config import ModelConfig

CFG = ModelConfig.load()


def test_projection_flops_are_24_d_squared_when_d_ff_is_4d() -> None:
    fm = FlopModel.from_config(CFG)
    assert fm.d_ff == 4 * fm.d
    assert fm.token_projections() == 24 * fm.d**2


def test_bound_matches_the_cost_model() -> None:
    fm = FlopModel.from_config(CFG)
    # one candidate vs one full encode: roughly 1/(L+1) of it, so bound(N) ~ N (L+1) / (N + L)
    for length in (256, 1000):
        for n in (5, 50):
            approx = n * (length + 1) / (n + length)
            assert 0.8 * approx < fm.bound(n, length) < 2.5 * approx
    assert fm.bound(1000, 1000) > fm.bound(50, 1000) > fm.bound(1, 1000) > 1


def test_user_kv_bytes_are_what_the_user_encoder_returns() -> None:
    """The memory model against the model itself: the K/V the user encoder returns for L events."""
    import numpy as np
    import torch

    from export import reference_features as c
    from export.model import build_model
    from tests.conftest import random_request, small_config

    cfg, length = small_config("causal"), 37
    request = random_request(np.random.default_rng(0), cfg, length, 1)
    history = (c.HISTORY_ITEM_IDS, c.HISTORY_ACTION_IDS, c.HISTORY_TIMESTAMPS)
    with torch.no_grad():
        user_kv, _ = build_model(cfg).encode_user(*(torch.from_numpy(request[k]) for k in history))
    assert user_kv.numel() * user_kv.element_size() == \
        FlopModel.from_config(cfg).user_kv_bytes(length)


def test_seeds_formulas() -> None:
    assert seeds_model_speedup(50) == pytest.approx(50 / (0.85 + 0.15 * 50))
    assert seeds_model_speedup(1) == pytest.approx(1.0)
    # LONGER's 40 % -> 6.8 % is a sequence module ~9x cheaper
    assert seeds_scaled_drop(0.1095) == pytest.approx(0.068, abs=1e-3)
    assert seeds_scaled_drop(1.0) == pytest.approx(0.40)
    # costs 1/thr: base 1 ms, naive 11 ms, shared 2 ms -> r = 1/10
    assert sequence_cost_ratio(1 / 2e-3, 1 / 11e-3, 1 / 1e-3) == pytest.approx(0.1)


def test_triton_statistics_become_per_model_averages() -> None:
    """Two snapshots of Triton's cumulative statistics -> per-request averages (us) of the
    models that served requests in between; overhead = latency - queue - compute."""
    before = {"user_encoder": {"count": 10.0, "success": 1e7, "queue": 1e6, "compute_input": 0.0,
                               "compute_infer": 8e6, "compute_output": 0.0},
              "ranker_base": {"count": 5.0, "success": 1e6, "queue": 0.0, "compute_input": 0.0,
                              "compute_infer": 1e6, "compute_output": 0.0}}
    after = {"user_encoder": {"count": 30.0, "success": 7e7, "queue": 3e6, "compute_input": 2e6,
                              "compute_infer": 5.6e7, "compute_output": 4e6},
             "ranker_base": dict(before["ranker_base"])}
    delta = pa.stats_delta(before, after)
    assert set(delta) == {"user_encoder"}  # ranker_base served nothing in between
    ue = delta["user_encoder"]
    assert ue["inference_count"] == 20
    # 6e7 ns over 20 requests = 3000 us; queue 100 us; compute 100 + 2400 + 200 us
    assert ue["avg_request_latency"] == pytest.approx(3000)
    assert ue["queue"] == pytest.approx(100) and ue["compute_infer"] == pytest.approx(2400)
    assert ue["compute"] == pytest.approx(2700) and ue["overhead"] == pytest.approx(200)


def test_unstable_windows_are_read_from_the_pass_lines() -> None:
    text = ("  Pass [1] throughput: 236.777 infer/sec. p50 latency: 3945 usec\n"
            "  Pass [2] throughput: 225.534 infer/sec. p50 latency: 4366 usec\n"
            "Failed to obtain stable measurement within 2 measurement windows")
    assert pa._PASS.findall(text)[-1] == ("225.534", "4366")


# --------------------------------------------------------------------------- benchmarks.analysis

def test_csv_round_trip_keeps_missing_cells_and_status_strings(tmp_path) -> None:
    from benchmarks import analysis as an

    rows = [{"model": "ranker", "n": 50, "p50_us": 1234.56789, "status": "ok"},
            {"model": "ranker_naive", "n": 50, "p50_us": None, "status": "n/a", "extra": 1.5}]
    an.write_csv(tmp_path / "r.csv", rows)
    text = (tmp_path / "r.csv").read_bytes().decode().split("\r\n")
    assert text[0] == "model,n,p50_us,status,extra"
    assert text[1] == "ranker,50,1234.57,ok,"  # 6 significant digits, missing = empty
    df = an.read_csv(tmp_path / "r.csv")
    assert an.pick(df, "status", model="ranker_naive") == "n/a"  # not read as NaN
    assert an.pick(df, "p50_us", model="ranker_naive") is None
    assert an.pick(df, "p50_us", model="ranker", n=50) == pytest.approx(1234.57)
    assert an.pick(df, model="ranker_base") is None


def test_number_formats() -> None:
    from benchmarks import analysis as an

    assert [an.fmt(x) for x in (1234.5, 12.345, 1.2345, None, "")] == \
        ["1,234", "12.3", "1.23", "–", "–"]
    assert an.fmt(1234.5, 1, adaptive=False, missing="-") == "1,234.5"
    assert an.fmt(None, missing="-") == "-"
    assert (an.ms(2500), an.pct(0.1234), an.sci(3.2e-7), an.count(56.0)) == \
        ("2.50", "12.3 %", "3.2e-07", "56")
    assert an.ratio(3, 2) == 1.5
    assert an.ratio(3, 0) is None and an.ratio(None, 2) is None and an.ratio("x", 2) is None


def test_check_verdicts_and_margins() -> None:
    from benchmarks import analysis as an

    assert an.check(1.2, 1.0) == ("met", "+20 % headroom")
    assert an.check(0.9, 1.0) == ("missed", "short by 10 %")
    assert an.check(1.5, 2.0, higher=False) == ("met", "+33 % headroom")
    assert an.check(None, 2.0) == ("not measured", "–")


def test_table_from_frames_dicts_and_lists() -> None:
    import pandas as pd

    from benchmarks import analysis as an

    df = pd.DataFrame({"n": [1, 50], "p50": [1234.5, float("nan")], "s": ["ok", "x"]})
    assert an.table(df, {"N": "n", "p50 ms": "p50"}, {"p50": an.ms}) == \
        "| N | p50 ms |\n|---|---|\n| 1 | 1.23 |\n| 50 | – |"
    assert an.table(df.to_dict("records"), ["n", "s"]) == \
        "| n | s |\n|---|---|\n| 1 | ok |\n| 50 | x |"
    assert an.table([[1, 2.5]], ["a", "b"], {"b": "{:.3f}"}) == \
        "| a | b |\n|---|---|\n| 1 | 2.500 |"
    assert an.machine_table({"cores": "2"}) == "| item | value |\n|---|---|\n| cores | 2 |"
    assert an.table([[[1, 2], None]], ["a", "b"]) == "| a | b |\n|---|---|\n| [1, 2] | – |"
    assert an.pick([{"a": 1, "b": [1, 2]}], "b", a=1) == [1, 2] and an.num([1, 2]) is None


def test_machine_and_figure(tmp_path) -> None:
    from benchmarks import analysis as an

    info = an.machine(tritonserver="2.51")
    assert info["cores"] == str(__import__("os").cpu_count()) and info["tritonserver"] == "2.51"
    assert info["onnxruntime"] != "not installed"
    with an.figure(tmp_path / "p.png", ncols=2) as axes:
        for ax in axes:
            ax.plot([1, 10], [1, 100], label="line")
            an.loglog(ax, "x", "y", "t")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- committed reports

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_committed_bench_report_is_the_generator_output(tmp_path: Path) -> None:
    """report.md and summary.csv of the committed run equal what benchmarks/report.py makes of
    the committed CSVs and run.json: the report holds no figure its files do not."""
    from benchmarks import report

    for name in ("run.json", *(f"{n}.csv" for n in report.CSVS)):
        shutil.copy(RESULTS / name, tmp_path / name)
    report.write(tmp_path)
    assert (tmp_path / "report.md").read_text() == (RESULTS / "report.md").read_text()
    assert (tmp_path / "summary.csv").read_text() == (RESULTS / "summary.csv").read_text()
    assert (tmp_path / "speedup.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_without_a_breakdown_still_gets_its_report(tmp_path: Path) -> None:
    """ensemble_breakdown.csv is empty when `ranker` gave perf_analyzer no statistics: the report
    is written all the same, its breakdown table empty."""
    from benchmarks import report

    for name in ("run.json", *(f"{n}.csv" for n in report.CSVS)):
        shutil.copy(RESULTS / "quick" / name, tmp_path / name)
    (tmp_path / "ensemble_breakdown.csv").write_text("")
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "| part |" in text and "client_p50" not in text and "## Memory" in text
    assert (tmp_path / "summary.csv").read_text() == (RESULTS / "quick" / "summary.csv").read_text()


@pytest.mark.parametrize("run", ["long_history", "long_history_bidirectional", "hstu",
                                 "hstu/reference_check"])
def test_committed_long_history_report_is_the_generator_output(run: str, tmp_path: Path) -> None:
    from benchmarks import long_history

    for f in (RESULTS / run).glob("long_*.*"):
        if f.suffix in (".csv", ".json"):
            shutil.copy(f, tmp_path / f.name)
    assert long_history.main(["--report-only", str(tmp_path)]) == 0
    assert (tmp_path / "long_history.md").read_text() == (RESULTS / run / "long_history.md"
                                                         ).read_text()


def test_rebuilding_a_report_from_a_folder_without_a_run_says_so(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture
                                                                  ) -> None:
    from benchmarks import long_history, report

    for main, argv, marker in ((report.main, [str(tmp_path)], "run.json"),
                               (long_history.main, ["--report-only", str(tmp_path)],
                                "long_facts.json")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert f"{marker} not found" in capsys.readouterr().err
