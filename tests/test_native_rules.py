"""export.native_rules: the production configs against freshly exported graphs, and honesty
checks that each rule of Triton's native onnxruntime backend is actually enforced.

The python backend of the local server checks none of these rules, so these tests are the only
place a config the production backend would refuse at load shows up before a deployment.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export import reference_features as c
from export.model import build_model
from export.native_rules import check_model, check_repositories, check_repository
from export.onnx_export import export_graph, graphs_for
from export.repositories import (
    EVALUATION_MODELS,
    copy_repositories,
    evaluation_beside,
    model_dir,
    onnx_path,
)
from export.triton_configs import build_configs, parse, to_text
from tests.conftest import small_config

REPO_ROOT = Path(__file__).resolve().parent.parent

# (mask, fp16): the small causal model is `small_repository`; the others are exported here.
VARIANTS = [("causal", False), ("bidirectional", False), ("causal", True)]
GRAPHS = graphs_for(small_config("causal"))  # every reference graph: the causal model has all


@pytest.fixture(scope="session")
def exported_variant(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str, bool], tuple[dict[str, mc.ModelConfig], Path]]:
    """(mask, fp16) -> (production configs, directory of <graph>/model.onnx), once a session."""
    cache: dict[tuple[str, bool], tuple[dict[str, mc.ModelConfig], Path]] = {}

    def get(mask: str, fp16: bool) -> tuple[dict[str, mc.ModelConfig], Path]:
        if (mask, fp16) not in cache:
            cfg = small_config(mask)
            model = build_model(cfg).half() if fp16 else build_model(cfg)
            directory = tmp_path_factory.mktemp(f"native_{mask}_{'fp16' if fp16 else 'fp32'}")
            for graph in graphs_for(cfg):
                export_graph(model, graph, directory / graph / "model.onnx", fp16=fp16)
            cache[mask, fp16] = (build_configs(cfg, fp16=fp16), directory)
        return cache[mask, fp16]

    return get


def _config(repo: Path, name: str) -> mc.ModelConfig:
    return parse((model_dir(repo, name) / "config.pbtxt").read_text())


def _onnx(repo: Path, name: str) -> Path:
    return onnx_path(repo, name)


def _tensor(ios: Iterable[mc.ModelInput | mc.ModelOutput], name: str) -> mc.ModelInput:
    return next(io for io in ios if io.name == name)


def _violations(repo: Path, name: str, mutate: Callable[[mc.ModelConfig], None]) -> list[str]:
    config = _config(repo, name)
    assert check_model(config, _onnx(repo, name)) == [] or name == "user_encoder"
    mutate(config)
    return check_model(config, _onnx(repo, name))


def _one_naming(violations: list[str], model: str, tensor: str, *words: str) -> str:
    """The violation that names `model` and `tensor` and says `words`; fails when none does."""
    hits = [v for v in violations
            if f"model '{model}'" in v and f"'{tensor}'" in v and all(w in v for w in words)]
    assert hits, f"no violation naming {model}/{tensor} with {words}: {violations}"
    return hits[0]


# --- the production configs pass -------------------------------------------------------------


@pytest.mark.parametrize("name", list(GRAPHS))
def test_small_repository_configs_pass(small_repository: Path, name: str) -> None:
    """The production flavour, as written by write_configs, against its own export (the
    traced graph once left last_event_timestamp symbolic where the config says [1])."""
    assert check_model(_config(small_repository, name), _onnx(small_repository, name)) == []


@pytest.mark.parametrize(("mask", "fp16"), VARIANTS)
def test_generated_configs_pass(exported_variant: Callable, mask: str, fp16: bool) -> None:
    """build_configs for each model flavour we ship (causal, bidirectional, fp16 user_kv)."""
    configs, directory = exported_variant(mask, fp16)
    graphs = graphs_for(small_config(mask))
    # the ONNX graphs, the two ensembles and user_cache (python backend: not the ORT backend's)
    assert sorted(configs) == sorted(["ranker", "ranker_cached", "user_cache", *graphs])
    violations = {name: check_model(configs[name], directory / name / "model.onnx")
                  for name in graphs}
    assert violations == {name: [] for name in graphs}


def test_check_repositories_covers_every_onnx_model(small_repository: Path) -> None:
    """Ensembles are skipped; every onnxruntime model of both repositories is checked (pass or
    fail): the serving models in the serving one, the oracle and baseline in the other."""
    evaluation = evaluation_beside(small_repository)
    assert sorted(check_repository(evaluation)) == sorted(EVALUATION_MODELS)
    assert sorted(check_repository(small_repository)) == sorted(
        set(GRAPHS) - set(EVALUATION_MODELS))
    assert check_repositories(small_repository) == {name: [] for name in GRAPHS}


def test_check_repositories_refuses_an_oracle_in_the_serving_repository(
    small_repository: Path, tmp_path: Path
) -> None:
    """The layout is a rule too: ranker_naive in the serving repository fails the check."""
    repo = copy_repositories(small_repository, tmp_path / "repo")
    (model_dir(repo, "ranker_naive")).rename(repo / "ranker_naive")
    results = check_repositories(repo)
    assert any("in the serving repository" in v for v in results["ranker_naive"]), results
    alone = tmp_path / "alone"
    alone.mkdir()
    assert "(evaluation repository)" in check_repositories(alone)


# --- honesty: each rule is enforced ------------------------------------------------------------


def test_wrong_fixed_input_dim(small_repository: Path) -> None:
    """user_profile is fixed [profile_dim] in the graph: a different config number is refused."""
    dim = small_config("causal").profile_dim

    def mutate(config: mc.ModelConfig) -> None:
        _tensor(config.input, c.USER_PROFILE).dims[:] = [dim + 1]

    v = _one_naming(_violations(small_repository, "ranker_base", mutate), "ranker_base",
                    c.USER_PROFILE, "the model expects 1 dimensions")
    assert f"(shape [{dim}])" in v and f"(shape [{dim + 1}])" in v


def test_dynamic_input_dim_accepts_any_number(small_repository: Path) -> None:
    """Inputs compare only fixed graph dims: a number where the graph has N is accepted."""

    def mutate(config: mc.ModelConfig) -> None:
        _tensor(config.input, c.CANDIDATE_ITEM_IDS).dims[:] = [7]

    assert _violations(small_repository, "ranker_base", mutate) == []


def test_wrong_input_dtype(small_repository: Path) -> None:
    def mutate(config: mc.ModelConfig) -> None:
        _tensor(config.input, c.USER_PROFILE).data_type = mc.TYPE_FP16

    _one_naming(_violations(small_repository, "target_fusion", mutate), "target_fusion",
                c.USER_PROFILE, "TYPE_FP16", "model provides TYPE_FP32")


def test_wrong_output_dtype(small_repository: Path) -> None:
    def mutate(config: mc.ModelConfig) -> None:
        _tensor(config.output, c.SCORES).data_type = mc.TYPE_FP16

    _one_naming(_violations(small_repository, "ranker_naive", mutate), "ranker_naive",
                c.SCORES, "datatype TYPE_FP16 for output", "model provides TYPE_FP32")


def test_unsupported_config_dtype(small_repository: Path) -> None:
    """TYPE_BF16 has no ONNX counterpart in the backend's mapping."""

    def mutate(config: mc.ModelConfig) -> None:
        _tensor(config.output, c.SCORES).data_type = mc.TYPE_BF16

    _one_naming(_violations(small_repository, "ranker_base", mutate), "ranker_base",
                c.SCORES, "unsupported datatype TYPE_BF16")


def test_renamed_input(small_repository: Path) -> None:
    def mutate(config: mc.ModelConfig) -> None:
        _tensor(config.input, c.USER_PROFILE).name = "user_profile_v2"

    _one_naming(_violations(small_repository, "target_fusion", mutate), "target_fusion",
                "user_profile_v2", "unexpected inference input", c.USER_PROFILE)


def test_renamed_output(small_repository: Path) -> None:
    def mutate(config: mc.ModelConfig) -> None:
        _tensor(config.output, c.SCORES).name = "score"

    _one_naming(_violations(small_repository, "ranker_base", mutate), "ranker_base", "score",
                "unexpected inference output")


def test_missing_config_input(small_repository: Path) -> None:
    """The graph needs an input the config lacks: the backend's input count check refuses it."""

    def mutate(config: mc.ModelConfig) -> None:
        kept = [io for io in config.input if io.name != c.REQUEST_TIMESTAMP]
        del config.input[:]
        config.input.extend(kept)

    v = _one_naming(_violations(small_repository, "target_fusion", mutate), "target_fusion",
                    c.REQUEST_TIMESTAMP, "configuration expects 5 inputs, model provides 6")
    assert "missing from the configuration" in v


def test_extra_graph_output_is_allowed(small_repository: Path) -> None:
    """Graph outputs the config leaves out are fine (no output count check)."""

    def mutate(config: mc.ModelConfig) -> None:
        kept = [io for io in config.output if io.name != c.USER_KV]
        del config.output[:]
        config.output.extend(kept)

    config = _config(small_repository, "user_encoder")
    before = check_model(config, _onnx(small_repository, "user_encoder"))
    mutate(config)
    assert check_model(config, _onnx(small_repository, "user_encoder")) == before


def test_output_minus_one_where_graph_is_fixed(small_repository: Path) -> None:
    """Outputs are compared exactly: scores' task dim is fixed in the graph, -1 is refused."""

    def mutate(config: mc.ModelConfig) -> None:
        _tensor(config.output, c.SCORES).dims[:] = [-1, -1]

    v = _one_naming(_violations(small_repository, "ranker_base", mutate), "ranker_base",
                    c.SCORES, "the model expects 2 dimensions")
    assert "(shape [-1,2])" in v and "(shape [-1,-1])" in v


def test_output_number_where_graph_is_symbolic(small_repository: Path) -> None:
    """scores' N is symbolic in the graph: a fixed number in the config is refused."""

    def mutate(config: mc.ModelConfig) -> None:
        _tensor(config.output, c.SCORES).dims[0] = 5

    v = _one_naming(_violations(small_repository, "ranker_naive", mutate), "ranker_naive",
                    c.SCORES, "the model expects 2 dimensions")
    assert "(shape [5,2])" in v


@pytest.mark.parametrize("kind", ["input", "output"])
def test_rank_mismatch(small_repository: Path, kind: str) -> None:
    def mutate(config: mc.ModelConfig) -> None:
        if kind == "input":
            _tensor(config.input, c.USER_KV).dims.append(1)
        else:
            del _tensor(config.output, c.SCORES).dims[-1]

    tensor, expects = (c.USER_KV, "5 dimensions") if kind == "input" else (c.SCORES, "2 dim")
    _one_naming(_violations(small_repository, "target_fusion", mutate), "target_fusion",
                tensor, f"the model expects {expects}", "but the model configuration specifies")


def test_batching_needs_a_dynamic_leading_graph_dim(small_repository: Path) -> None:
    """max_batch_size > 0 puts a batch dim in front; user_profile's graph shape [P] has none."""

    def mutate(config: mc.ModelConfig) -> None:
        config.max_batch_size = 8

    _one_naming(_violations(small_repository, "ranker_base", mutate), "ranker_base",
                c.USER_PROFILE, "first dimension must be -1")


# --- the command line --------------------------------------------------------------------------


def _cli(repository: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export.native_rules", "--repository", str(repository)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )


def test_cli_exits_0_on_the_exported_repository(small_repository: Path) -> None:
    good = _cli(small_repository)
    assert good.returncode == 0, good.stdout + good.stderr
    assert all(f"OK   {name}" in good.stdout for name in GRAPHS)


def test_cli_exits_1_on_a_broken_copy(small_repository: Path, tmp_path: Path) -> None:
    """A config the backend would refuse fails the command, naming the model and tensor."""
    broken = copy_repositories(small_repository, tmp_path / "repository")
    config = _config(broken, "ranker_base")
    _tensor(config.input, c.USER_PROFILE).data_type = mc.TYPE_FP16
    (model_dir(broken, "ranker_base") / "config.pbtxt").write_text(to_text(config))
    bad = _cli(broken)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL ranker_base" in bad.stdout and f"'{c.USER_PROFILE}'" in bad.stdout


def test_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "export.native_rules", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    assert "--repository" in out.stdout
