"""Model configuration: one JSON file drives the model, the export and the Triton configs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

MASK_MODES = ("causal", "bidirectional", "full")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "ranker_causal.json"


class ConfigError(ValueError):
    """A model config that cannot describe a valid model."""


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the ranking transformer.

    Table sizes are hash-bucket counts: ids are arbitrary int64 values and are mapped into the
    tables by `id mod buckets` (floor modulo, so negative ids land in [0, buckets)). Prime bucket
    counts spread strided id patterns.
    """

    mask: str = "causal"
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 512
    max_history: int = 1024
    num_tasks: int = 2
    profile_dim: int = 16
    item_buckets: int = 100_003
    action_buckets: int = 31
    category_buckets: int = 10_007
    gap_buckets: int = 24
    head_hidden: int = 128
    seed: int = 0
    # Serving limits, written into the ONNX graphs as guards (export/guards.py) so that every
    # backend enforces them, and mirrored as Triton config parameters for clients: candidates
    # per request, and ranker_naive's attention cells per layer, N x (min(L, max_history) + 1)^2
    # (its memory grows with it: 2^24 cells is N = 15 at L = 1024, about 1.8 GiB of ORT memory).
    max_candidates: int = 20_000
    naive_max_work: int = 2**24
    task_names: tuple[str, ...] = ("click", "like")

    def __post_init__(self) -> None:
        if self.mask not in MASK_MODES:
            raise ConfigError(f"mask must be one of {MASK_MODES}, got {self.mask!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and f.name != "seed" and v <= 0:
                raise ConfigError(f"{f.name} must be a positive integer, got {v}")
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.gap_buckets < 2:
            raise ConfigError("gap_buckets must be >= 2 (bucket 0 means 'no previous event')")
        if len(self.task_names) != self.num_tasks:
            raise ConfigError(
                f"task_names has {len(self.task_names)} names but num_tasks is {self.num_tasks}"
            )

    @property
    def appends(self) -> bool:
        """Whether a returning user's K/V can be extended (user_encoder_append): only under the
        causal mask, and only with two layers or more (the append reads the cached K/V of every
        layer but the last)."""
        return self.mask == "causal" and self.num_layers >= 2

    def serving_plan(self, fp16: bool = False):  # -> export.split_contract.ServingPlan
        """What an export of this model writes (its declaration, limits, task names, the
        `ranker_base` baseline, fp16 state with `fp16`): export/split_contract.reference_plan,
        imported here so that this module stays torch-free."""
        from export.split_contract import reference_plan

        return reference_plan(self, fp16)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["task_names"] = list(self.task_names)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}; known keys: {sorted(known)}")
        data = dict(data)
        if "task_names" in data:
            data["task_names"] = tuple(data["task_names"])
        elif "num_tasks" in data:
            data["task_names"] = tuple(f"task{i}" for i in range(data["num_tasks"]))
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path | None = None) -> ModelConfig:
        path = Path(path) if path else DEFAULT_CONFIG
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"model config not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"model config {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)
