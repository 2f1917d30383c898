"""Plumbing every model family shares: its JSON config file and its PyTorch checkpoint.

A family's config is a frozen dataclass that inherits `JsonConfig`; `load_checkpoint` loads a
state_dict into a freshly built model and refuses one whose parameter names do not match. (The
reference model's export/config.py and export/model.py carry their own copies of both, written
before a second family existed.)
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn


class JsonConfig:
    """from_dict / load / to_dict for a frozen dataclass config: unknown keys are refused
    (a typo must not silently keep a default), `task_names` defaults to task0..task{T-1}.
    The family selector `"model": "package.module:factory"` (export/family.py) is accepted when
    it names this family's `factory`, so the family's config files load here too."""

    error: ClassVar[type[ValueError]] = ValueError
    kind: ClassVar[str] = "model"
    factory: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)  # type: ignore[call-overload]
        if "task_names" in data:
            data["task_names"] = list(data["task_names"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if "model" in data:
            if data["model"] != cls.factory:
                raise cls.error(f"this config names the model {data['model']!r}, not the "
                                f"{cls.kind} family's {cls.factory!r}")
            data = {k: v for k, v in data.items() if k != "model"}
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise cls.error(f"unknown {cls.kind} config keys: {unknown}; known keys: "
                            f"{sorted(known)}")
        data = dict(data)
        if "task_names" in data:
            data["task_names"] = tuple(data["task_names"])
        elif "num_tasks" in data and "task_names" in known:
            data["task_names"] = tuple(f"task{i}" for i in range(data["num_tasks"]))
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise cls.error(f"{cls.kind} config not found: {path}") from None
        except json.JSONDecodeError as e:
            raise cls.error(f"{cls.kind} config {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)


def load_checkpoint(model: nn.Module, checkpoint: str | Path) -> nn.Module:
    """A PyTorch state_dict (or {"state_dict": ...}) into `model`; every name must match."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint} does not match the model config: missing "
                         f"{sorted(missing)}, unexpected {sorted(unexpected)}")
    return model
