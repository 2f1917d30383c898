"""Any model family from its config file: the model named by import path, and one command that
exports it into a servable pair of Triton repositories.

A family config is a JSON object. Its `"model"` key names the model's factory as
`"package.module:factory"`; the module must be importable (on PYTHONPATH, or installed), so a
user's own model is exported without editing this repository. The factory is called as

    factory(config: dict[str, Any], checkpoint: str | None) -> SplitModel

with every key of the file except `"model"`, and must return a `torch.nn.Module` that follows
the `SplitModel` protocol (export/split_contract.py) and whose declaration `check_contract`
accepts. Three keys are also read here, the serving limits the export writes into the graphs as
guards and into the Triton configs (`SERVING_KEYS`; a factory may use or ignore them):
`max_candidates` (default 20000), `naive_max_work` (N x (L'+1)^2 above which ranker_naive
refuses, default 2^24) and `task_names` (default task0..task{T-1}, T from the first output).

A config without `"model"` is the reference model's (export/config.py, `reference_model`), so
the shipped ranker_*.json configs work here unchanged; `python -m export` remains the reference
model's full export (ranker_cached, ranker_base, fp16).

`python -m export.family --config CONFIG [--checkpoint CKPT] --output DIR` writes DIR (serving:
user_encoder, target_fusion, the `ranker` ensemble, the user-state cache user_cache and the
`ranker_cached` ensemble, user_encoder_append when declared, which the cache then appends with)
and DIR_evaluation (ranker_naive), then holds every config against its graph with the native
onnxruntime backend's load-time rules (exit 1 on a violation). Every refusal (file, import path,
factory, declaration) exits 2 with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from export.native_rules import export_verdict
from export.repositories import EVALUATION_OPTION_HELP, evaluation_beside
from export.split_contract import (
    ContractError,
    ServingPlan,
    SplitContract,
    SplitModel,
    check_contract,
)
from export.split_export import GRAPHS, graphs_for
from export.split_repository import write_split_repositories
from export.triton_configs import config_source

MODEL_KEY = "model"
REFERENCE_MODEL = "export.family:reference_model"
DEFAULT_MAX_CANDIDATES = 20_000
DEFAULT_NAIVE_MAX_WORK = 2**24
SERVING_KEYS = ("max_candidates", "naive_max_work", "task_names")
COMMAND = "python -m export.family"


class FamilyError(ValueError):
    """A family config, import path, factory or declaration that cannot be exported; the
    message says which and why."""


def serving_plan(config: dict[str, Any], contract: SplitContract) -> ServingPlan:
    """The serving plan a family config states (export/split_contract.py's ServingPlan, as the
    reference model's ModelConfig builds it): its limits, the defaults for those it omits (task
    names: task0.. over the first output's second dim, when it has one)."""
    limits = {}
    for key, default in (("max_candidates", DEFAULT_MAX_CANDIDATES),
                         ("naive_max_work", DEFAULT_NAIVE_MAX_WORK)):
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FamilyError(f"{key} must be a positive integer, got {value!r}")
        limits[key] = value
    dims = contract.outputs[0].dims
    tasks = dims[1] if len(dims) == 2 and isinstance(dims[1], int) else 0
    names = config.get("task_names", [f"task{i}" for i in range(tasks)])
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise FamilyError(f"task_names must be a list of strings, got {names!r}")
    return ServingPlan(contract, task_names=tuple(names), **limits)


@dataclass(frozen=True)
class Family:
    """A model loaded from a family config: the model, its serving plan (its checked
    declaration and limits), the factory that built it."""

    model: SplitModel
    plan: ServingPlan
    factory: str

    @property
    def contract(self) -> SplitContract:
        return self.plan.contract


def reference_model(config: dict[str, Any], checkpoint: str | None = None) -> SplitModel:
    """Factory of the reference RankingTransformer (export/model.py) seen through the protocol."""
    from export.config import ModelConfig
    from export.model import build_model
    from export.split_contract import ReferenceSplitModel

    return ReferenceSplitModel(build_model(ModelConfig.from_dict(config), checkpoint))


def read_config(path: str | Path) -> dict[str, Any]:
    """The family config file as a dict (a JSON object), or FamilyError."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FamilyError(f"config not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FamilyError(f"config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise FamilyError(f"config {path} must be a JSON object, not {type(data).__name__}")
    return data


def resolve_factory(spec: Any) -> Any:
    """The callable named by `"package.module:factory"`, or FamilyError saying what is wrong."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise FamilyError(f'"{MODEL_KEY}" must be "package.module:factory", got {spec!r}')
    module_name, attribute = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        own = bool(e.name) and (module_name + ".").startswith(f"{e.name}.")
        where = " (is its folder on PYTHONPATH, or its package installed?)" if own else ""
        raise FamilyError(f"cannot import {module_name!r}, named by \"{MODEL_KEY}\": "
                          f"{e}{where}") from e
    except Exception as e:  # the user's module itself failed while importing
        raise FamilyError(f"importing {module_name!r}, named by \"{MODEL_KEY}\", failed: "
                          f"{type(e).__name__}: {e}") from e
    factory = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise FamilyError(f"module {module_name!r} has no {attribute!r} (named by "
                              f"\"{MODEL_KEY}\": {spec!r})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise FamilyError(f"{spec!r} is not callable: a factory(config, checkpoint) is expected")
    return factory


def build_family(config: dict[str, Any], checkpoint: str | None = None,
                 default_model: str = REFERENCE_MODEL) -> Family:
    """Call the config's factory and check what it returns: a SplitModel module whose
    declaration `check_contract` accepts. A config without "model" names `default_model`."""
    spec = config.get(MODEL_KEY, default_model)
    factory = resolve_factory(spec)
    params = {k: v for k, v in config.items() if k != MODEL_KEY}
    try:
        model = factory(params, checkpoint)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        hint = ("" if MODEL_KEY in config else f' (no "{MODEL_KEY}" key: read as a config of '
                f'{spec}; name your own model as "{MODEL_KEY}": "package.module:factory")')
        raise FamilyError(f"{spec} refused the config or checkpoint: {e}{hint}") from e
    if not isinstance(model, SplitModel):
        missing = [m for m in ("contract", "forward", "encode_user", "score_candidates",
                               "encode_append") if not callable(getattr(model, m, None))]
        raise FamilyError(f"{spec} returned a {type(model).__name__}, not a SplitModel "
                          f"(export/split_contract.py): it lacks {missing}")
    if not isinstance(model, nn.Module):
        raise FamilyError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module: "
                          "the export traces a module's parameters as the graph's weights")
    try:
        contract = model.contract()
    except Exception as e:  # the user's declaration code failed
        raise FamilyError(f"{spec}: contract() failed: {type(e).__name__}: {e}") from e
    if not isinstance(contract, SplitContract):
        raise FamilyError(f"{spec}: contract() returned a {type(contract).__name__}, not a "
                          "SplitContract")
    try:
        check_contract(contract)
    except ContractError as e:
        raise FamilyError(f"the declaration of {spec} is refused: {e}") from e
    return Family(model.eval(), serving_plan(config, contract), spec)


def load_family(path: str | Path, checkpoint: str | None = None,
                default_model: str = REFERENCE_MODEL) -> Family:
    """The family a config file names, built and checked (FamilyError otherwise)."""
    return build_family(read_config(path), checkpoint, default_model)


def write_family_repositories(family: Family, serving: Path, evaluation: Path | None = None,
                              graphs: tuple[str, ...] | None = None, source: str = "",
                              command: str = COMMAND, progress: bool = False) -> list[Path]:
    """The family's servable repository pair (export/split_repository.py), its limits as guards
    and config parameters."""
    plan = family.plan
    return write_split_repositories(family.model, serving, max_candidates=plan.max_candidates,
                                    naive_max_work=plan.naive_max_work,
                                    task_names=plan.task_names, evaluation=evaluation,
                                    graphs=graphs, source=source, command=command,
                                    progress=progress)


def describe(family: Family) -> str:
    """One line about what was loaded."""
    c = family.contract
    features = ", ".join(f"{f.name} ({f.axis})" for f in c.features)
    state = ", ".join(s.name for s in c.state)
    return (f"family {c.family} from {family.factory}: features {features}; user state {state}; "
            f"history mask {c.history_mask}; appendable {c.appendable}; "
            f"max_history {c.max_history}")


def main(argv: list[str] | None = None, prog: str = COMMAND,
         default_model: str = REFERENCE_MODEL) -> int:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export any split model family, named in its config by import path "
                    '("model": "package.module:factory"), into two Triton model repositories: '
                    "the serving one (user_encoder, target_fusion, the `ranker` ensemble, "
                    "the user-state cache user_cache and the `ranker_cached` ensemble, "
                    "user_encoder_append where the declaration allows appending) and the "
                    "evaluation one (ranker_naive, the exactness oracle), with production "
                    "configs derived from the model's declaration. A config without \"model\" "
                    f"names {default_model}. Check a family first with python -m export.check.")
    p.add_argument("--config", type=Path, required=True, help="family config JSON")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint passed to the factory (default: none, the factory's init)")
    p.add_argument("--output", type=Path, required=True, help="serving model repository")
    p.add_argument("--evaluation-output", type=Path, default=None, help=EVALUATION_OPTION_HELP)
    p.add_argument("--graphs", nargs="+", choices=GRAPHS, default=None,
                   help="graphs to export (default: every graph the declaration has); `ranker`, "
                        "user_cache and `ranker_cached` are written with user_encoder and "
                        "target_fusion")
    args = p.parse_args(argv)
    try:
        family = load_family(args.config, args.checkpoint, default_model)
        graphs = tuple(args.graphs or graphs_for(family.contract))
        if "user_encoder_append" in graphs and not family.contract.appendable:
            raise FamilyError(f"{family.contract.family} declares no append: it has no "
                              "user_encoder_append")
    except FamilyError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(describe(family), flush=True)
    evaluation = args.evaluation_output or evaluation_beside(args.output)
    write_family_repositories(family, args.output, evaluation, graphs,
                              config_source(args.config), command=prog, progress=True)
    return export_verdict(args.output, evaluation, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
