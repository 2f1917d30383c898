"""Any family by import path (export.family) and the conformance check users run (export.check):
the check passes on every shipped config and on a model from outside the package, fails a split
that is not exact, refuses a `full` history mask with its reason; every way an import path can go
wrong gets its own message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export import check, family
from export.config import CONFIG_DIR
from export.hstu import HSTUConfig, HSTUConfigError
from tests.conftest import SMALL

REPO_ROOT = Path(__file__).resolve().parent.parent
BYOM_DIR = REPO_ROOT / "tests" / "byom"
BYOM_CONFIG = BYOM_DIR / "byom_ranker.json"
SHIPPED = sorted(CONFIG_DIR.glob("*.json"))
FULL_MASK_REASON = "depends on which candidate is scored"


@pytest.fixture
def byom_path(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The outside model's folder on sys.path, as PYTHONPATH puts it for the commands."""
    monkeypatch.syspath_prepend(str(BYOM_DIR))
    return BYOM_DIR


def _config(tmp_path: Path, model: str | None, name: str = "family",
            **changes: object) -> Path:
    data = {k: v for k, v in json.loads(BYOM_CONFIG.read_text()).items() if k != "model"}
    if model is not None:
        data["model"] = model
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**data, **changes}))
    return path


# ----------------------------------------------------------------------------- export.check
@pytest.mark.parametrize("config", [*SHIPPED, BYOM_CONFIG], ids=lambda p: p.name)
def test_check_every_shipped_config(config: Path, byom_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """What CI runs: `python -m export.check --quick` on each shipped config passes, except a
    `full`-mask config, refused (exit 2) with check_contract's reason."""
    refused = json.loads(config.read_text()).get("mask") == "full"
    code = check.main(["--config", str(config), "--quick"])
    out, err = capsys.readouterr()
    if refused:
        assert code == 2 and FULL_MASK_REASON in err, err
        return
    assert code == 0, out[-3000:]
    assert " 0 failed" in out
    rows = [line for line in out.splitlines() if line.startswith(("L=", "append"))]
    for edge in ("L=0 N=0", "L=0 N=1", "L=1 N=1"):
        assert any(r.startswith(edge + " ") and r.endswith("pass") for r in rows), edge
    assert "must refuse" in out  # the length-1 broadcast and the max_candidates guards ran
    appends = [r for r in rows if r.startswith("append") and "must refuse" not in r]
    if family.load_family(config).contract.appendable:  # HSTU, the causal reference configs
        assert len(appends) == 4 and all(r.endswith("pass") for r in appends), appends
    else:
        assert not appends, appends
    max_history = family.load_family(config).contract.max_history
    if max_history + 2 <= check.QUICK_MAX_LENGTH:
        assert any(r.startswith(f"L={max_history + 2} N=1 ") for r in rows)
    else:
        assert "not run: above --max-length" in out


def test_check_fails_a_split_that_is_not_exact(tmp_path: Path, byom_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A split 1e-4 off its naive forward: every split row fails (exit 1), the ONNX naive graph
    still passes; a tolerance above the drift passes it."""
    config = _config(tmp_path, "broken:off_by_a_bit")
    grid = ["--lengths", "0", "9", "--candidates", "1", "4"]
    assert check.main(["--config", str(config), *grid]) == 1
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("L=")]
    assert all(r.endswith("FAIL") for r in rows if " split " in r), rows
    assert all(r.endswith("pass") for r in rows if "onnx naive" in r), rows
    assert check.main(["--config", str(config), *grid, "--tolerance", "1e-3"]) == 0


def test_check_fails_an_append_that_is_not_exact(tmp_path: Path, byom_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A causal reference model whose append's new K/V drift 1e-4 from a full encode: every
    append row fails (torch and ONNX, exit 1) while its split rows pass."""
    config = tmp_path / "append.json"
    config.write_text(json.dumps({**SMALL, "mask": "causal",
                                  "model": "broken:append_off_by_a_bit"}))
    assert check.main(["--config", str(config), "--quick", "--lengths", "5",
                       "--candidates", "2"]) == 1
    rows = capsys.readouterr().out.splitlines()
    appends = [r for r in rows if r.startswith("append P=") and "must refuse" not in r]
    assert len(appends) == 4 and all(r.endswith("FAIL") for r in appends), appends
    splits = [r for r in rows if r.startswith("L=")]
    assert splits and all(r.endswith("pass") for r in splits), splits


def test_check_fails_a_graph_the_native_backend_would_refuse(
        tmp_path: Path, byom_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exact scores, but float64 where the declaration says FP32: the native-rules rows fail."""
    config = _config(tmp_path, "broken:double_scores")
    assert check.main(["--config", str(config), "--quick", "--lengths", "3"]) == 1
    rows = [line for line in capsys.readouterr().out.splitlines()
            if "native backend rules" in line]
    assert [r.split()[3] for r in rows] == ["user_encoder", "target_fusion"]
    assert rows[0].endswith("pass") and "FAIL" in rows[1] and "scores" in rows[1], rows


def test_check_an_fp16_gpu_target_export(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """What scripts/gpu_check.sh --fp16 checks on a GPU, on the CPU EP: the fp16 export of the
    gpu target within 5e-3 of the fp32 torch model (and off it by fp16's rounding, so fp16 did
    run), its fp16 user state as the native backend's config declares it."""
    config = tmp_path / "small.json"
    config.write_text(json.dumps({**SMALL, "mask": "causal"}))
    assert check.main(["--config", str(config), "--quick", "--fp16", "--target", "gpu",
                       "--tolerance", "5e-3"]) == 0
    out = capsys.readouterr().out
    assert "(target gpu, fp16)" in out and " 0 failed" in out
    diffs = [float(line.split()[-3]) for line in out.splitlines()
             if line.startswith("L=") and " onnx split " in line]
    assert diffs and 1e-5 < max(diffs) <= 5e-3, diffs
    assert out.count("native backend rules") == 3  # user_encoder, target_fusion, the append


def test_check_refuses_a_full_mask_declaration(tmp_path: Path) -> None:
    """The real command on an outside model that declares a BST-style mask: exit 2, the reason,
    nothing exported."""
    config = _config(tmp_path, "broken:full_mask")
    result = subprocess.run([sys.executable, "-m", "export.check", "--config", str(config)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{BYOM_DIR}"})
    assert result.returncode == 2, result.stderr
    assert "history_mask 'full'" in result.stderr and FULL_MASK_REASON in result.stderr
    assert "exporting" not in result.stdout


# ----------------------------------------------------------------------------- import paths
IMPORT_ERRORS = {
    "no colon": ("byom_ranker", 'must be "package.module:factory"'),
    "not a string": (["byom_ranker", "build"], 'must be "package.module:factory"'),
    "module not found": ("no_such_module_anywhere:build",
                         "cannot import 'no_such_module_anywhere'"),
    "module fails to import": ("broken_import:build",
                               "No module named 'not_an_installed_dependency'"),
    "factory missing": ("byom_ranker:no_such_factory", "has no 'no_such_factory'"),
    "not callable": ("broken:not_callable", "is not callable"),
    "not a SplitModel": ("broken:not_a_model", "returned a dict, not a SplitModel"),
    "factory refuses the config": ("broken:refuses", "refused the config or checkpoint: "
                                   "d_model must be even"),
    "declaration refused": ("broken:full_mask", "the declaration of broken:full_mask is "
                            "refused"),
}


@pytest.mark.parametrize("case", sorted(IMPORT_ERRORS))
def test_import_path_errors(case: str, tmp_path: Path, byom_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    model, message = IMPORT_ERRORS[case]
    config = _config(tmp_path, model)
    assert family.main(["--config", str(config), "--output", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err, err
    assert not (tmp_path / "repo").exists()


def test_module_not_on_the_path_says_so(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The outside model's folder not on PYTHONPATH: the message says where to look."""
    config = _config(tmp_path, "not_on_the_path_module:build")
    assert family.main(["--config", str(config), "--output", str(tmp_path / "repo")]) == 2
    assert "on PYTHONPATH" in capsys.readouterr().err


def test_config_errors(tmp_path: Path, byom_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "unknown key": (_config(tmp_path, "byom_ranker:build", "a", d_modle=8), "d_modle"),
        "bad limit": (_config(tmp_path, "byom_ranker:build", "b", max_candidates=0),
                      "max_candidates must be a positive integer"),
        "no model key": (_config(tmp_path, None, "c"), "no \"model\" key: read as a config "
                         "of export.family:reference_model"),
    }
    for name, (path, message) in cases.items():
        assert family.main(["--config", str(path), "--output", str(tmp_path / "o")]) == 2, name
        err = capsys.readouterr().err
        assert message in err, (name, err)
        path.unlink()
    (tmp_path / "list.json").write_text("[1, 2]")
    assert check.main(["--config", str(tmp_path / "list.json")]) == 2
    assert "must be a JSON object" in capsys.readouterr().err
    assert check.main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "config not found" in capsys.readouterr().err


def test_checkpoint_reaches_the_factory(tmp_path: Path, byom_path: Path) -> None:
    """--checkpoint is the factory's: weights of another seed load over the config's init; a
    missing file is refused with the factory's error."""
    other = family.load_family(_config(tmp_path, "byom_ranker:build", "other", seed=99)).model
    path = tmp_path / "weights.pt"
    torch.save(other.state_dict(), path)
    loaded = family.load_family(BYOM_CONFIG, str(path)).model
    fresh = family.load_family(BYOM_CONFIG).model
    for name, value in other.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert not torch.equal(fresh.state_dict()["head.weight"], other.state_dict()["head.weight"])
    with pytest.raises(family.FamilyError, match="refused the config or checkpoint"):
        family.load_family(BYOM_CONFIG, str(tmp_path / "missing.pt"))


def test_family_config_loads_with_its_own_class_only() -> None:
    """The shipped HSTU config names its factory; its config class loads it, and refuses a
    config that names another model."""
    data = json.loads((CONFIG_DIR / "hstu_causal.json").read_text())
    assert data["model"] == HSTUConfig.factory == "export.hstu:from_config"
    assert HSTUConfig.from_dict(data).max_history == data["max_history"]
    with pytest.raises(HSTUConfigError, match="names the model 'byom_ranker:build'"):
        HSTUConfig.from_dict({**data, "model": "byom_ranker:build"})
    loaded = family.load_family(CONFIG_DIR / "hstu_causal.json")
    assert loaded.contract.family == "hstu" and loaded.plan.task_names == ("click", "like")
    assert loaded.plan.max_candidates == data["max_candidates"]
